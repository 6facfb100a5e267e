"""LoRA adapters for NNX, merge/unmerge, LoRA-GA initialisation and export."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax._src import lora_ga

RANK = 3
VOCAB = 32
OUT = 16
# A regression target per token: the gradients of every kernel then have a
# full spectrum (a softmax over a few classes would cap their rank).
TARGETS = jax.random.normal(jax.random.key(42), (VOCAB, OUT))


class Block(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(12, 20, rngs=rngs)
    self.norm = nnx.LayerNorm(20, rngs=rngs)
    self.down = nnx.Linear(20, 12, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.norm(self.up(x))))


class TinyModel(nnx.Module):
  """Embedding, two residual MLP blocks in an nnx.List, a linear head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, 12, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.head = nnx.Linear(12, OUT, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for block in self.blocks:
      h = block(h)
    return self.head(h)


def _batch(seed, n=32):
  tokens = jax.random.randint(jax.random.key(seed), (n,), 0, VOCAB)
  return tokens, TARGETS[tokens]


def _loss(model, batch):
  tokens, targets = batch
  return jnp.mean((model(tokens) - targets) ** 2)


BLOCK_LAYERS = r'blocks/\d+/(up|down)'


def _adapted(targets=BLOCK_LAYERS, rank=RANK, **kwargs):
  base = TinyModel(nnx.Rngs(0))
  model = nnx.clone(base)
  paths = flora_jax.nnx.add_lora(model, targets, rank, rngs=nnx.Rngs(1),
                                 **kwargs)
  return base, model, paths


# ------------------------------------------------------------- adapters


def test_add_lora_wraps_matching_layers_and_keeps_the_output():
  base, model, paths = _adapted(BLOCK_LAYERS + '|embed')
  assert paths == ('blocks/0/down', 'blocks/0/up', 'blocks/1/down',
                   'blocks/1/up', 'embed')
  assert isinstance(model.blocks[0].up, flora_jax.nnx.ScaledLoRA)
  assert isinstance(model.embed, flora_jax.nnx.ScaledLoRAEmbed)
  assert isinstance(model.head, nnx.Linear)
  factors = nnx.state(model, nnx.LoRAParam)
  assert factors['blocks'][0]['up']['lora_a'].shape == (12, RANK)
  assert factors['blocks'][0]['up']['lora_b'].shape == (RANK, 20)
  assert factors['embed']['lora_embedding_a'].shape == (VOCAB, RANK)
  tokens = _batch(0)[0]
  np.testing.assert_array_equal(model(tokens), base(tokens))


@pytest.mark.parametrize('alpha,rslora,scale', [
    (None, False, 1.0), (6.0, False, 2.0), (6.0, True, 6.0 / np.sqrt(RANK)),
])
def test_adapter_computes_base_plus_scaled_product(alpha, rslora, scale):
  _, model, _ = _adapted(alpha=alpha, rslora=rslora)
  layer = model.blocks[0].up
  assert layer.scale == pytest.approx(scale)
  layer.lora_b[...] = jax.random.normal(jax.random.key(2), (RANK, 20))
  x = jax.random.normal(jax.random.key(3), (5, 12))
  kernel = layer.base_module.kernel[...]
  want = x @ (kernel + scale * layer.lora_a[...] @ layer.lora_b[...])
  want = want + layer.base_module.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)


def test_embedding_adapter_lookup_and_attend():
  _, model, _ = _adapted('embed', alpha=6.0)
  embed = model.embed
  embed.lora_embedding_a[...] = jax.random.normal(jax.random.key(2),
                                                 (VOCAB, RANK))
  table = (embed.base_module.embedding[...]
           + 2.0 * embed.lora_embedding_a[...] @ embed.lora_embedding_b[...])
  tokens = jnp.array([0, 3, 9, 3])
  np.testing.assert_allclose(embed(tokens), table[tokens], rtol=1e-5,
                             atol=1e-6)
  query = jax.random.normal(jax.random.key(3), (2, 12))
  np.testing.assert_allclose(embed.attend(query), query @ table.T, rtol=1e-5,
                             atol=1e-5)


def test_merge_and_unmerge_round_trip():
  base, model, _ = _adapted(BLOCK_LAYERS + '|embed')
  for path, factor in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    factor[...] = jax.random.normal(jax.random.key(len(path)), factor.shape)
  tokens = _batch(0)[0]
  before = model(tokens)
  kernel = np.asarray(model.blocks[1].down.base_module.kernel[...])
  flora_jax.nnx.merge_lora(model)
  assert model.blocks[1].down.merged
  assert not np.allclose(model.blocks[1].down.base_module.kernel[...], kernel)
  np.testing.assert_allclose(model(tokens), before, rtol=1e-5, atol=1e-5)
  flora_jax.nnx.unmerge_lora(model)
  np.testing.assert_allclose(model.blocks[1].down.base_module.kernel[...],
                             kernel, atol=1e-6)
  np.testing.assert_allclose(model(tokens), before, rtol=1e-5, atol=1e-5)
  assert not np.allclose(before, base(tokens))  # the adapters did something


# -------------------------------------------------------------- LoRA-GA


def _kernel_gradients(base, batches):
  """The averaged gradient of every block kernel of the un-adapted model."""
  grads = [nnx.grad(_loss)(base, b) for b in batches]
  mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  return {
      (i, name): mean['blocks'][i][name]['kernel'][...]
      for i in range(2) for name in ('up', 'down')
  }


def _best_rank(g, k):
  u, s, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.fixture(scope='module')
def lora_ga_model():
  base, model, _ = _adapted(alpha=6.0, rslora=True)
  batches = [_batch(s) for s in range(3)]
  spectra = flora_jax.nnx.lora_ga_init(model, _loss, iter(batches))
  return base, model, batches, spectra


def test_lora_ga_keeps_the_initial_output(lora_ga_model):
  base, model, _, _ = lora_ga_model
  tokens = _batch(7)[0]
  np.testing.assert_allclose(model(tokens), base(tokens), rtol=1e-5,
                             atol=1e-5)
  assert np.linalg.norm(model.blocks[0].up.lora_b[...]) > 0.1


def test_lora_ga_factors_are_scaled_singular_vectors(lora_ga_model):
  base, model, batches, spectra = lora_ga_model
  grads = _kernel_gradients(base, batches)
  for (i, name), g in grads.items():
    layer = getattr(model.blocks[i], name)
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    c = g.shape[1] ** 0.25 / 4.0  # stable scale, gamma 16
    np.testing.assert_allclose(a.T @ a, c**2 * np.eye(RANK), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, c**2 * np.eye(RANK), atol=1e-5)
    # A spans the top-r left vectors, B the next r right ones: A^T G B^T = 0
    # and ||A^T G||, ||G B^T|| carry the first and the next r singular values.
    s = np.linalg.svd(np.asarray(g), compute_uv=False)
    np.testing.assert_allclose(spectra[f'blocks/{i}/{name}'], s[:2 * RANK],
                               rtol=1e-4)
    assert np.abs(a.T @ g @ b.T).max() < 1e-5 * c**2 * s[0]
    np.testing.assert_allclose(np.linalg.norm(a.T @ g),
                               c * np.linalg.norm(s[:RANK]), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(g @ b.T),
                               c * np.linalg.norm(s[RANK:2 * RANK]), rtol=1e-4)


def _one_sgd_step_weight_change(model, batch, lr):
  """Effective weight change of each block layer after one SGD step."""
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
  changes = {}
  for i in range(2):
    for name in ('up', 'down'):
      layer = getattr(model.blocks[i], name)
      g = grads['blocks'][i][name]
      # float64: the change is ~lr times smaller than A B itself.
      a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a,
                                                       layer.lora_b))
      a_new = a - lr * np.asarray(g['lora_a'][...], np.float64)
      b_new = b - lr * np.asarray(g['lora_b'][...], np.float64)
      changes[(i, name)] = (layer.scale * (a_new @ b_new - a @ b), a, b)
  return changes


@pytest.mark.parametrize('direction', ['ArB2r', 'A2rBr', 'ArBr', 'random'])
def test_first_sgd_step_is_the_best_rank_2r_gradient_step(direction):
  """The paper's claim: after one SGD step of learning rate eta,
  s(A'B' - AB) = -eta s^2 c^2 G_2r + eta^2 s^3 G B^T A^T G, exactly; the
  second-order term vanishes as eta -> 0. Every direction uses the first 2r
  singular pairs, so all of them give G_2r."""
  base, model, _ = _adapted(alpha=6.0)
  batch = _batch(11, n=64)
  flora_jax.nnx.lora_ga_init(model, _loss, [batch], direction=direction)
  grads = _kernel_gradients(base, [batch])
  for lr in (1e-1, 1e-4):
    changes = _one_sgd_step_weight_change(model, batch, lr)
    for key, (change, a, b) in changes.items():
      g = np.asarray(grads[key], np.float64)
      s = getattr(model.blocks[key[0]], key[1]).scale
      c2 = g.shape[1] ** 0.5 / 16.0
      first_order = -lr * s**2 * c2 * _best_rank(g, 2 * RANK)
      second_order = lr**2 * s**3 * (g @ b.T) @ (a.T @ g)
      np.testing.assert_allclose(change, first_order + second_order,
                                 rtol=2e-3,
                                 atol=1e-3 * np.abs(first_order).max())
      if lr == 1e-4:
        err = np.linalg.norm(change - first_order) / np.linalg.norm(first_order)
        assert err < 2e-3, (key, err)


def test_lora_ga_scales_and_shape_of_the_offset():
  base, model, _ = _adapted()
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)], factor_scale='unit')
  a = model.blocks[0].up.lora_a[...]
  np.testing.assert_allclose(a.T @ a, np.eye(RANK), atol=1e-5)
  offset = (base.blocks[0].up.kernel[...]
            - model.blocks[0].up.base_module.kernel[...])
  np.testing.assert_allclose(offset, a @ model.blocks[0].up.lora_b[...],
                             atol=1e-6)
  _, model, _ = _adapted()
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)], factor_scale=0.5)
  a = model.blocks[0].up.lora_a[...]
  np.testing.assert_allclose(a.T @ a, 0.25 * np.eye(RANK), atol=1e-5)


def test_gradient_estimate_streams_one_accumulator_per_weight(monkeypatch):
  """One jitted step per batch, each consuming the batch just yielded; the
  accumulator holds exactly one float32 buffer per target kernel and is
  donated (updated in place) at each step; no recompilation per batch."""
  _, model, _ = _adapted()
  yielded = []

  def batches():
    for seed in range(4):
      yielded.append(seed)
      yield _batch(seed)

  original = lora_ga._accumulate_gradient
  calls = []

  def spy(total, *args):
    leaves = jax.tree.leaves(total)
    calls.append((len(yielded), [x.shape for x in leaves]))
    out = original(total, *args)
    assert all(x.is_deleted() for x in leaves)  # donated
    return out

  monkeypatch.setattr(lora_ga, '_accumulate_gradient', spy)
  compiled_before = original._cache_size()
  flora_jax.nnx.lora_ga_init(model, _loss, batches())
  assert [n for n, _ in calls] == [1, 2, 3, 4]
  kernel_shapes = sorted([(12, 20), (20, 12)] * 2)
  assert all(sorted(shapes) == kernel_shapes for _, shapes in calls)
  assert original._cache_size() - compiled_before <= 1


def test_export_applies_to_the_untouched_base_model():
  """Train after LoRA-GA, export, add the delta to the ORIGINAL weights."""
  base, model, _ = _adapted(alpha=6.0)
  flora_jax.nnx.lora_ga_init(model, _loss, [_batch(s) for s in range(2)])
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  diff = nnx.DiffState(0, nnx.LoRAParam)
  for step in range(5):
    optimizer.update(model, nnx.grad(_loss, argnums=diff)(model, _batch(step)))
  deltas = flora_jax.nnx.lora_delta(model)
  assert deltas['blocks/0/up'].a.shape == (12, 2 * RANK)  # [A, -A0]
  restored = nnx.clone(base)
  flora_jax.nnx.apply_lora_delta(restored, deltas)
  tokens = _batch(9)[0]
  np.testing.assert_allclose(restored(tokens), model(tokens), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(base(tokens), model(tokens), atol=1e-3)
  flora_jax.nnx.merge_lora(model)  # merging does not change the export
  for name, delta in flora_jax.nnx.lora_delta(model).items():
    np.testing.assert_allclose(delta.dense(), deltas[name].dense(), atol=1e-6)


def test_plain_adapters_export_their_product():
  base, model, _ = _adapted('head', rank=2, alpha=4.0)
  model.head.lora_b[...] = jnp.ones((2, OUT))
  delta = flora_jax.nnx.lora_delta(model)['head']
  np.testing.assert_allclose(delta.dense(),
                             2.0 * model.head.lora_a[...] @ jnp.ones((2, OUT)))
  flora_jax.nnx.apply_lora_delta(base, {'head': delta})
  tokens = _batch(1)[0]
  np.testing.assert_allclose(base(tokens), model(tokens), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ bad input


def test_bad_inputs_are_refused_with_the_offending_layer():
  model = TinyModel(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'rank 13 exceeds layer blocks/0/'):
    flora_jax.nnx.add_lora(model, BLOCK_LAYERS, 13, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"match no nnx.Linear.*'head'"):
    flora_jax.nnx.add_lora(model, 'attention/.*', 2, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match='targets'):
    flora_jax.nnx.add_lora(model, 3, 2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='rank'):
    flora_jax.nnx.add_lora(model, 'head', 0, rngs=nnx.Rngs(1))
  flora_jax.nnx.add_lora(model, 'head', 2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='head already has a LoRA adapter'):
    flora_jax.nnx.add_lora(model, 'head', 2, rngs=nnx.Rngs(1))


def test_bad_lora_ga_inputs():
  _, model, _ = _adapted()
  with pytest.raises(ValueError, match='batches yielded no batch'):
    flora_jax.nnx.lora_ga_init(model, _loss, iter([]))
  with pytest.raises(ValueError, match='direction'):
    flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)], direction='BrA2r')
  with pytest.raises(ValueError, match='factor_scale'):
    flora_jax.nnx.lora_ga_init(model, _loss, [_batch(0)], factor_scale=-1.0)
  _, wide, _ = _adapted(rank=7)  # 2r = 14 > 12
  with pytest.raises(ValueError, match=r'blocks/0/down .* 2r = 14'):
    flora_jax.nnx.lora_ga_init(wide, _loss, [_batch(0)])
  with pytest.raises(ValueError, match='no adapters'):
    flora_jax.nnx.lora_ga_init(TinyModel(nnx.Rngs(0)), _loss, [_batch(0)])
  with pytest.raises(ValueError, match='not an nnx.Linear'):
    flora_jax.nnx.apply_lora_delta(TinyModel(nnx.Rngs(0)), {
        'blocks/0': flora_jax.nnx.LoRADelta(jnp.ones((12, 1)),
                                            jnp.ones((1, 20)), 1.0)})
