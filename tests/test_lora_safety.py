"""LoRA never loses or corrupts a model.

A refused `lora_ga_init` leaves the model bitwise as it was; re-initialising
trained or LoRA-GA adapters keeps the model's function and its export; the
merge flag and what was merged are state: they reload, trace under
`nnx.jit`, and unmerging after optimizer steps restores the base weights.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flora_jax

VOCAB, DIM, HIDDEN, RANK = 16, 8, 16, 2
TARGETS = jax.random.normal(jax.random.key(42), (VOCAB, DIM))
TOKENS = jnp.arange(24) % VOCAB


class MLP(nnx.Module):
  """Embedding, a hidden layer with dropout, a linear output."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.hidden = nnx.Linear(DIM, HIDDEN, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, DIM, rngs=rngs)

  def __call__(self, tokens):
    return self.out(self.drop(jnp.tanh(self.hidden(self.embed(tokens)))))


def _batch(seed, poison=0.0):
  tokens = jax.random.randint(jax.random.key(seed), (32,), 0, VOCAB)
  return tokens, TARGETS[tokens], jnp.float32(poison)


def _loss(model, batch):
  tokens, targets, poison = batch
  # ``poison`` reaches the gradient of out's kernel only (0 · sum = 0).
  return (jnp.mean((model(tokens) - targets) ** 2)
          + poison * jnp.sum(model.out.base_module.kernel[...]))


def _adapted(train=False):
  base = MLP(nnx.Rngs(0))
  if not train:
    base.eval()  # deterministic outputs to compare
  model = nnx.clone(base)
  flora_jax.nnx.add_lora(model, 'embed|hidden|out', RANK, alpha=4.0,
                         rngs=nnx.Rngs(1))
  return base, model


def _set_factors(model, seed):
  """Random factors, as if trained."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  for i, (_, factor) in enumerate(flat):
    key = jax.random.key(100 * seed + i)
    factor[...] = 0.3 * jax.random.normal(key, factor.shape)


def _host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # the dropout RNG
    x = jax.random.key_data(x)
  return np.array(x)


def _copy(model):
  graphdef, state = nnx.split(model)
  return graphdef, jax.tree.map(_host, state)


def _assert_bitwise(model, copy):
  graphdef, state = nnx.split(model)
  assert graphdef == copy[0]  # no variable added (initial_a), none removed
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(_host(x), y),
               state, copy[1])


def _assert_exports(base, model):
  """`lora_delta` added to the original weights computes ``model``."""
  restored = nnx.clone(base)
  flora_jax.nnx.apply_lora_delta(restored, flora_jax.nnx.lora_delta(model))
  np.testing.assert_allclose(restored(TOKENS), model(TOKENS), atol=1e-5)


# -------------------------------------------------- a refused LoRA-GA


@pytest.mark.parametrize('poison,train', [
    (np.nan, False), (np.inf, False),
    (np.nan, True),  # the loss advances the dropout RNG: not written back
])
def test_lora_ga_refuses_a_non_finite_gradient_leaving_the_model(poison,
                                                                 train):
  _, model = _adapted(train)
  before = _copy(model)
  batches = [_batch(s, poison if s == 2 else 0.0) for s in range(4)]
  with pytest.raises(ValueError,
                     match=r'batch 2 \(.*1 of 4.* at the adapters out:'
                     ) as error:
    flora_jax.nnx.lora_ga_init(model, _loss, batches)
  assert 'hidden' not in str(error.value)  # only out's gradient is bad
  _assert_bitwise(model, before)  # base, factors and RNG counts


def test_lora_ga_refuses_non_finite_factors_leaving_the_model():
  """Finite gradients whose sum overflows: the factors would be NaN."""
  _, model = _adapted()
  before = _copy(model)
  batches = [_batch(s, 3e38) for s in range(2)]
  with pytest.raises(ValueError, match=r'adapters out are NaN or infinite'):
    flora_jax.nnx.lora_ga_init(model, _loss, batches)
  _assert_bitwise(model, before)


def test_lora_ga_refuses_a_merged_model_leaving_it():
  _, model = _adapted()
  flora_jax.nnx.merge_lora(model)
  before = _copy(model)
  with pytest.raises(ValueError, match='hidden, out are merged.*unmerge'):
    flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)])
  _assert_bitwise(model, before)


def test_lora_ga_with_dropout_advances_the_rng_as_the_loss_did():
  _, model = _adapted(train=True)
  count = int(model.drop.rngs.count[...])
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(s) for s in range(3)])
  assert int(model.drop.rngs.count[...]) == count + 3


# ---------------------------------------- LoRA-GA keeps the function


def test_lora_ga_on_trained_adapters_keeps_the_function_and_export():
  base, model = _adapted()
  _set_factors(model, 1)  # trained plain adapters
  want = model(TOKENS)
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)])
  np.testing.assert_allclose(model(TOKENS), want, atol=1e-5)
  _assert_exports(base, model)
  assert model.out.initial_a.shape == (HIDDEN, 2 * RANK)  # [-A, A1]

  _set_factors(model, 2)  # trained after LoRA-GA
  want = model(TOKENS)
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(1)])
  np.testing.assert_allclose(model(TOKENS), want, atol=1e-5)
  _assert_exports(base, model)
  assert model.out.initial_a.shape == (HIDDEN, 4 * RANK)


def test_lora_ga_twice_in_a_row_keeps_the_function_and_rank_r():
  base, model = _adapted()
  for seed in range(2):
    flora_jax.nnx.lora_ga_init(model, _loss, [_batch(seed)])
    np.testing.assert_allclose(model(TOKENS), base(TOKENS), atol=1e-5)
    assert model.out.initial_a.shape == (HIDDEN, RANK)
    np.testing.assert_array_equal(model.out.initial_a[...],
                                  model.out.lora_a[...])
  _set_factors(model, 3)
  _assert_exports(base, model)


# ------------------------------------------------ the merge is state


def test_merge_records_are_state_but_not_parameters():
  _, model = _adapted()
  records = nnx.state(model, flora_jax.nnx.LoRAMergeRecord)
  assert set(records['out']) == {'merged', 'merged_a', 'merged_b'}
  assert records['out']['merged_a'].shape == (HIDDEN, RANK)
  assert set(records['embed']) == {'merged', 'merged_a', 'merged_b'}
  for kind in (nnx.Param, nnx.LoRAParam):
    names = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, kind))}
    assert not names & {'merged', 'merged_a', 'merged_b'}, kind
  labels = flora_jax.nnx.lora_plus_labels(nnx.state(model, nnx.Param))
  assert set(labels['out']) == {'base_module', 'lora_a', 'lora_b'}
  assert not model.out.merged
  flora_jax.nnx.merge_lora(model)
  assert model.out.merged and model.embed.merged


def test_merged_state_reloads_into_a_fresh_model(tmp_path):
  _, model = _adapted()
  _set_factors(model, 1)
  want = model(TOKENS)
  query = jax.random.normal(jax.random.key(5), (3, DIM))
  want_attend = model.embed.attend(query)
  flora_jax.nnx.merge_lora(model)
  state = nnx.state(model)

  fresh = _adapted()[1]
  nnx.update(fresh, state)
  np.testing.assert_allclose(fresh(TOKENS), want, atol=1e-5)
  np.testing.assert_allclose(fresh.embed.attend(query), want_attend,
                             atol=1e-5)
  merged = nnx.merge(nnx.graphdef(_adapted()[1]), state)
  np.testing.assert_allclose(merged(TOKENS), want, atol=1e-5)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'merged', state)
  checkpointer.wait_until_finished()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _adapted()[1]))
  restored = nnx.merge(graphdef,
                       checkpointer.restore(tmp_path / 'merged', abstract))
  np.testing.assert_allclose(restored(TOKENS), want, atol=1e-5)
  flora_jax.nnx.unmerge_lora(restored)
  np.testing.assert_allclose(restored.out.base_module.kernel[...],
                             _adapted()[1].out.base_module.kernel[...],
                             atol=1e-6)


def _kernels(model):
  return {name: np.array(getattr(model, name).base_weight[...])
          for name in ('embed', 'hidden', 'out')}


@nnx.jit
def _train_step(model, optimizer, batch):
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model,
                                                                    batch)
  optimizer.update(model, grads)


def test_optimizer_steps_while_merged_do_not_move_the_base():
  """Adam's momentum and weight decay move the factors while merged."""
  _, model = _adapted()
  _set_factors(model, 1)
  kernels = _kernels(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-1, weight_decay=0.5),
                            wrt=nnx.LoRAParam)
  _train_step(model, optimizer, _batch(0))
  want = model(TOKENS)
  flora_jax.nnx.merge_lora(model)
  factors = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
  for seed in range(2):
    _train_step(model, optimizer, _batch(seed))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), factors,
                       nnx.state(model, nnx.LoRAParam))
  assert all(jax.tree.leaves(moved))
  # Merged, the model still computes with the factors as merged.
  np.testing.assert_allclose(model(TOKENS), want, atol=1e-5)
  flora_jax.nnx.unmerge_lora(model)
  for name, kernel in _kernels(model).items():
    np.testing.assert_allclose(kernel, kernels[name], atol=1e-6, err_msg=name)
  # Unmerged, it computes with the factors as trained.
  layer = model.out
  hidden = jnp.tanh(model.hidden(model.embed(TOKENS)))  # dropout is off
  np.testing.assert_allclose(
      model(TOKENS), layer.base_module(hidden) + layer.scale * hidden
      @ layer.lora_a[...] @ layer.lora_b[...], atol=1e-5)


def test_merge_flag_is_traced_under_jit():
  """One compiled forward serves merged and unmerged models alike, and
  merge_lora / unmerge_lora work inside nnx.jit."""
  _, model = _adapted()
  _set_factors(model, 1)
  traces = []

  @nnx.jit
  def forward(model, tokens):
    traces.append(None)
    return model(tokens)

  want = model(TOKENS)
  np.testing.assert_allclose(forward(model, TOKENS), want, atol=1e-5)
  flora_jax.nnx.merge_lora(model)
  np.testing.assert_allclose(forward(model, TOKENS), want, atol=1e-5)
  assert len(traces) == 1  # the flag is data, not structure

  kernels = _kernels(model)
  nnx.jit(flora_jax.nnx.unmerge_lora)(model)
  assert not model.out.merged
  np.testing.assert_allclose(model(TOKENS), want, atol=1e-5)
  nnx.jit(flora_jax.nnx.merge_lora)(model)
  nnx.jit(flora_jax.nnx.merge_lora)(model)  # merging twice adds once
  assert model.out.merged
  for name, kernel in _kernels(model).items():
    np.testing.assert_allclose(kernel, kernels[name], atol=1e-6, err_msg=name)
  np.testing.assert_allclose(model(TOKENS), want, atol=1e-5)

