"""LoRA+: the official grouping, the learning-rate ratio, and NNX use."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax


class Classifier(nnx.Module):
  """Embedding, linear layers with biases, a LayerNorm and a head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(16, 8, rngs=rngs)
    self.hidden = nnx.Linear(8, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, tokens):
    h = jax.nn.gelu(self.hidden(self.embed(tokens)))
    return self.head(self.norm(h))


def _model():
  model = Classifier(nnx.Rngs(0))
  flora_jax.nnx.add_lora(model, 'hidden|embed', 2, rngs=nnx.Rngs(1))
  return model


def _loss(model, tokens):
  return jnp.mean(model(tokens) ** 2)


TRAIN_HEAD_AND_NORM = lambda path, _: path.startswith(('head', 'norm'))


def test_group_membership_follows_the_official_grouping():
  labels = flora_jax.nnx.lora_plus_labels(nnx.state(_model(), nnx.Param),
                                      trainable=TRAIN_HEAD_AND_NORM)
  flat = {'/'.join(map(str, path)): label
          for path, label in jax.tree.leaves_with_path(labels)
          for path in [[k.key for k in path]]}
  assert flat == {
      'embed/base_module/embedding': 'frozen',
      'embed/lora_embedding_a': 'lora_embedding',
      'embed/lora_embedding_b': 'lora_embedding',
      'hidden/base_module/bias': 'frozen',
      'hidden/base_module/kernel': 'frozen',
      'hidden/lora_a': 'lora_a',
      'hidden/lora_b': 'lora_b',
      'head/bias': 'lora_b_no_decay',  # 1-D: lambda * lr, and no decay
      'head/kernel': 'lora_a',  # other trainable matrices: lr
      'norm/bias': 'lora_b_no_decay',
      'norm/scale': 'lora_b_no_decay',
  }
  # Without `trainable`, only the factors are trained.
  labels = flora_jax.nnx.lora_plus_labels(nnx.state(_model(), nnx.Param))
  assert jax.tree.leaves(labels).count('frozen') == 7


def _flat_params():
  keys = jax.random.split(jax.random.key(0), 5)
  return {
      'layer': {'lora_a': jax.random.normal(keys[0], (6, 2)),
                'lora_b': jax.random.normal(keys[1], (2, 5)),
                'bias': jax.random.normal(keys[2], (5,))},
      'norm': {'scale': jnp.ones(5), 'bias': jnp.zeros(5)},
      'head': {'kernel': jax.random.normal(keys[3], (5, 3))},
  }


def _run(tx, params, grads_seq):
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = []
  for grads in grads_seq:
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _gradients(params, steps=6):
  return [jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape),
                       params) for t in range(steps)]


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)


def test_b_steps_are_ratio_times_a_steps_under_a_schedule():
  params = _flat_params()
  ones = [jax.tree.map(jnp.ones_like, params)] * 6
  updates = _run(flora_jax.lora_plus(SCHEDULE, ratio=8.0,
                                     scale_by=optax.identity()),
                 params, ones)
  for step, u in enumerate(updates):
    lr = float(SCHEDULE(step))
    np.testing.assert_allclose(u['layer']['lora_a'], -lr, rtol=1e-6)
    np.testing.assert_allclose(u['layer']['lora_b'], -8.0 * lr, rtol=1e-6)
    np.testing.assert_array_equal(u['head']['kernel'], 0.0)  # frozen
  assert float(SCHEDULE(3)) > 0  # the schedule did move the rates


def test_ratio_one_is_adamw_bit_for_bit():
  params = _flat_params()
  everything = lambda path, _: True
  ours = _run(flora_jax.lora_plus(SCHEDULE, 1.0, weight_decay=0.1,
                                  trainable=everything),
              params, _gradients(params))
  decay_mask = jax.tree.map_with_path(
      lambda p, _: not flora_jax.nnx.is_bias_or_norm(
          jax.tree_util.keystr(p, simple=True, separator='/'), None), params)
  theirs = _run(optax.adamw(SCHEDULE, weight_decay=0.1, mask=decay_mask),
                params, _gradients(params))
  for a, b in zip(ours, theirs, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_decay_skips_biases_and_norms():
  params = _flat_params()
  zero = [jax.tree.map(jnp.zeros_like, params)] * 2
  updates = _run(flora_jax.lora_plus(1e-2, 4.0, weight_decay=0.5,
                                     trainable=lambda p, _: True),
                 params, zero)[0]
  # Zero gradients: the whole update is the decay -lr * wd * p.
  np.testing.assert_allclose(updates['layer']['lora_a'],
                             -5e-3 * params['layer']['lora_a'], rtol=1e-6)
  np.testing.assert_allclose(updates['layer']['lora_b'],
                             -2e-2 * params['layer']['lora_b'], rtol=1e-6)
  for leaf in (updates['layer']['bias'], updates['norm']['scale']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_clip_is_global_over_the_trained_leaves_only():
  params = _flat_params()
  grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), params)
  grads['head']['kernel'] = 1e6 * jnp.ones((5, 3))  # frozen: must not count
  sgd = dict(scale_by=optax.identity(), max_grad_norm=1.0)
  updates = _run(flora_jax.lora_plus(1.0, 1.0, **sgd), params, [grads])[0]
  factors = [updates['layer']['lora_a'], updates['layer']['lora_b']]
  norm = np.sqrt(sum(float(jnp.sum(u**2)) for u in factors))
  np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
  np.testing.assert_array_equal(updates['head']['kernel'], 0.0)


@pytest.mark.parametrize('wrt', [nnx.LoRAParam, nnx.Param])
def test_nnx_optimizer_trains_factors_and_freezes_the_base(wrt):
  model = _model()
  frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  factors = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  tx = flora_jax.lora_plus(1e-2, 16.0, embedding_learning_rate=1e-3,
                           weight_decay=0.01, max_grad_norm=1.0)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  tokens = jnp.arange(12) % 16
  for _ in range(2):
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))(model, tokens)
    optimizer.update(model, grads)
  jax.tree.map(np.testing.assert_array_equal, frozen,
               nnx.state(model, nnx.Not(nnx.LoRAParam)))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), factors,
                       nnx.state(model, nnx.LoRAParam))
  assert all(jax.tree.leaves(moved))


def test_bad_inputs():
  with pytest.raises(ValueError, match='no LoRA factor'):
    flora_jax.lora_plus(1e-3).init({'dense': {'kernel': jnp.ones((4, 4))}})
  with pytest.raises(ValueError, match='ratio'):
    flora_jax.lora_plus(1e-3, ratio=0.0)
  with pytest.raises(ValueError, match='max_grad_norm'):
    flora_jax.lora_plus(1e-3, max_grad_norm=-1.0)
  with pytest.raises(TypeError, match='scale_by'):
    flora_jax.lora_plus(1e-3, scale_by=optax.adam)
