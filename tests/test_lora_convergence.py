"""LoRA-GA and LoRA+ against vanilla LoRA on a real task: rotated digits.

The LoRA, LoRA-GA and LoRA+ rows of ``examples/lora_digits.py --quick``
(same settings and seeds, so the same numbers; the example adds full
fine-tuning, a control and a learning-rate sweep). An MLP 64-128-128-10
pretrained with AdamW on scikit-learn's bundled 8x8 digits (97% test
accuracy) is fine-tuned on the same digits rotated by 90 degrees, where it
starts at chance. Rank-4
adapters on all three linear layers, everything else frozen; every method
gets the same pretrained model, the same mini-batches and the same peak
learning rate, 5e-3 (AdamW, cosine decay over the 1000 steps). The loss is
measured on the whole rotated training set every 10 steps.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets
from sklearn import model_selection

import flora_jax

STEPS = 1000
BATCH_SIZE = 64
EVAL_EVERY = 10
RANK = 4
LEARNING_RATE = 5e-3
PRETRAIN_STEPS = 1000
PRETRAIN_LEARNING_RATE = 1e-3
LORA_GA_BATCHES = 4
LORA_PLUS_RATIO = 16.0


@functools.cache
def _digits():
  """(upright, rotated) ``(train_x, train_y, test_x, test_y)``, x in [0, 1]."""
  digits = datasets.load_digits()
  images = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  upright = model_selection.train_test_split(
      images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  train_x, test_x, train_y, test_y = upright

  def rotate(x):
    squares = np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2))
    return np.ascontiguousarray(squares).reshape(-1, 64)

  return ((train_x, train_y, test_x, test_y),
          (rotate(train_x), train_y, rotate(test_x), test_y))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
    self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.hidden1(x))
    return self.head(jax.nn.gelu(self.hidden2(x)))


def _cross_entropy(model, batch):
  images, labels = batch
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


OPTIMIZERS = {
    'adamw': lambda lr: optax.adamw(lr, weight_decay=0.0),
    'lora_plus': lambda lr: flora_jax.lora_plus(lr, LORA_PLUS_RATIO),
}


@functools.partial(jax.jit, static_argnames=('graphdef', 'optimizer', 'steps'))
def _train(trained, frozen, peak_lr, key, images, labels, *, graphdef,
           optimizer, steps):
  """All the steps in one lax.scan; the training-set loss every 10 steps.

  Returns the trained leaves and the loss on the whole training set at
  steps 0, 10, ..., ``steps``. ``peak_lr`` is traced (it scales a unit
  cosine schedule), so each method compiles once for both seeds.
  """
  unit = optax.cosine_decay_schedule(1.0, steps)
  tx = OPTIMIZERS[optimizer](lambda count: peak_lr * unit(count))
  loss = lambda trained, batch: _cross_entropy(
      nnx.merge(graphdef, trained, frozen), batch)

  def step(carry, key):
    trained, state = carry
    rows = jax.random.randint(key, (BATCH_SIZE,), 0, images.shape[0])
    grads = jax.grad(loss)(trained, (images[rows], labels[rows]))
    updates, state = tx.update(grads, state, trained)
    return (optax.apply_updates(trained, updates), state), None

  def steps_then_evaluate(carry, keys):
    carry, _ = jax.lax.scan(step, carry, keys)
    return carry, loss(carry[0], (images, labels))

  keys = jax.random.split(key, steps).reshape(-1, EVAL_EVERY)
  initial = loss(trained, (images, labels))
  (trained, _), losses = jax.lax.scan(
      steps_then_evaluate, (trained, tx.init(trained)), keys)
  return trained, jnp.concatenate([initial[None], losses])


def _train_in_place(model, wrt, optimizer, peak_lr, key, data, steps):
  graphdef, trained, frozen = nnx.split(model, wrt, ...)
  trained, losses = _train(trained, frozen, peak_lr, key, data[0], data[1],
                           graphdef=graphdef, optimizer=optimizer, steps=steps)
  nnx.update(model, trained)
  return np.asarray(losses)


@functools.cache
def _loss_curves(seed):
  """{method: training-set losses every EVAL_EVERY steps} on rotated digits."""
  upright, rotated = _digits()
  base = MLP(nnx.Rngs(seed))
  _train_in_place(base, nnx.Param, 'adamw', PRETRAIN_LEARNING_RATE,
                  jax.random.key(1000 + seed), upright, PRETRAIN_STEPS)
  order = np.random.default_rng(seed).permutation(len(rotated[1]))
  lora_ga_batches = [
      (rotated[0][rows], rotated[1][rows])
      for rows in order[:LORA_GA_BATCHES * BATCH_SIZE].reshape(
          LORA_GA_BATCHES, BATCH_SIZE)
  ]
  curves = {}
  for method in ('LoRA', 'LoRA-GA', 'LoRA+'):
    model = nnx.clone(base)
    flora_jax.nnx.add_lora(model, 'hidden1|hidden2|head', RANK,
                           rngs=nnx.Rngs(3000 + seed))
    if method == 'LoRA-GA':
      flora_jax.nnx.lora_ga_init(model, _cross_entropy, lora_ga_batches)
    curves[method] = _train_in_place(
        model, nnx.LoRAParam, 'lora_plus' if method == 'LoRA+' else 'adamw',
        LEARNING_RATE, jax.random.key(2000 + seed), rotated, STEPS)
  return curves


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1])
def test_lora_ga_reaches_lora_final_loss_in_half_the_steps(seed):
  """Measured (seeds 0 / 1): LoRA ends at 0.0865 / 0.0906; LoRA-GA is there
  by step 380 / 340 (of the 500 allowed; seeds 0-5: 340-400) and ends at
  0.0379 / 0.0358.

  The gradient's directions are what pass this: LoRA-GA's scale and offset
  with random orthonormal factors instead (the control of the example)
  needs 560 / 510 steps, and a no-op `lora_ga_init` 1000.
  """
  curves = _loss_curves(seed)
  lora_final = curves['LoRA'][-1]
  reached = np.flatnonzero(curves['LoRA-GA'] <= lora_final)
  assert reached.size, (lora_final, curves['LoRA-GA'][-1])
  steps_to_reach = int(reached[0]) * EVAL_EVERY
  assert steps_to_reach <= STEPS // 2, (steps_to_reach, lora_final)


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1])
def test_lora_plus_ends_at_least_as_low_as_lora(seed):
  """Measured (seeds 0 / 1): LoRA+ ends at 0.0034 / 0.0023, LoRA at
  0.0865 / 0.0906.

  Strictly below: LoRA+ at ratio 1 is AdamW bit for bit, so a LoRA+ that
  lost its ratio would tie with LoRA and must not pass.
  """
  curves = _loss_curves(seed)
  assert curves['LoRA+'][-1] < curves['LoRA'][-1], (
      curves['LoRA+'][-1], curves['LoRA'][-1])
