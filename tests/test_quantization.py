"""quantize_state: optimizer states stored in 8 bits, block-wise.

The two maps are bitsandbytes' (compared with its own, where it installs);
every value is coded as the nearest entry of its block's map (checked by
brute force), which bitsandbytes' CPU coder never beats, and its decoder
reads our codes as we do; the round trip's error stays within half a map
gap of the block's largest magnitude. The coded state takes under 27% of
float32, each slice of a stack is coded on its own, ``update`` is the inner
update on the decoded state, and 8-bit Adam trains like Adam. The fused
step is checked in test_fused.py, shardings and orbax resume in
test_sharding.py.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax._src import quantization

BLOCK = 256


def _maps(nonneg_blocks):
  """Per block row, the map it is coded with: (blocks, 256)."""
  signed, nonneg = (quantization.dynamic_map(s).astype(np.float64)
                    for s in (True, False))
  return np.where(nonneg_blocks[:, None], nonneg, signed)


def _nearest_codes(normalized, maps):
  """The index of the nearest map entry to each value (brute force)."""
  return np.abs(normalized[..., None] - maps[:, None]).argmin(axis=-1)


@functools.cache
def _coders(block_size, axis=None):
  quantize = jax.jit(lambda x: quantization.quantize(x, block_size, axis))
  dequantize = jax.jit(
      lambda c, s: quantization.dequantize(c, s, block_size))
  return quantize, dequantize


def _gaussian(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _blocked(x, axis, block_size):
  """(blocks, block_size) rows of ``x`` along ``axis``, zero-padded."""
  x = np.moveaxis(x, axis, -1)
  pad = -x.shape[-1] % block_size
  x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(-1, block_size)


@pytest.mark.parametrize('shape, block_size, axis', [
    ((8, 1024), 256, 1),
    ((6, 300), 64, 1),  # a partial last block
    ((512, 8), 64, 0),  # (m, r): blocks run down the long axis
    ((3, 40, 50), 16, 2),
])
@pytest.mark.parametrize('signed', [True, False], ids=['signed', 'nonneg'])
def test_codes_are_the_nearest_map_entry(shape, block_size, axis, signed):
  x = _gaussian(shape)
  x[(0,) * (x.ndim - 1)] *= 40  # an outlier row: its blocks scale up alone
  if not signed:
    x = x**2
  quantize, dequantize = _coders(block_size)
  assert quantization.block_axis(shape, block_size) == axis
  codes, scales = quantize(jnp.asarray(x))
  assert codes.dtype == jnp.uint8 and codes.shape == shape
  want_scales = shape[:axis] + (-(-shape[axis] // block_size),) + shape[
      axis + 1:]
  assert scales.shape == want_scales

  blocks = _blocked(x, axis, block_size).astype(np.float64)
  largest = np.abs(blocks).max(axis=1, keepdims=True)
  got_scales = _blocked(np.asarray(scales), axis, 1)[:, 0]
  # The sign of a scale says which map: negative for the non-negative one.
  np.testing.assert_array_equal(np.abs(got_scales), largest[:, 0])
  nonneg = (blocks >= 0).all(axis=1)
  np.testing.assert_array_equal(got_scales < 0, nonneg)
  assert nonneg.all() if not signed else not nonneg.all()
  normalized = blocks / largest
  maps = _maps(nonneg)
  nearest = _nearest_codes(normalized, maps)
  got_codes = _blocked(np.asarray(codes), axis, block_size).astype(int)
  size = shape[axis]
  real = (np.arange(blocks.size).reshape(blocks.shape) % (
      -(-size // block_size) * block_size)) < size  # not padding
  table = lambda codes: np.take_along_axis(maps, codes, axis=1)
  # The nearest, up to float32's rounding of x / A at a near tie.
  excess = (np.abs(normalized - table(got_codes))
            - np.abs(normalized - table(nearest)))
  assert (excess[real] <= 1e-7).all(), excess.max()
  assert (got_codes[real] != nearest[real]).mean() < 1e-3

  decoded = _blocked(np.asarray(dequantize(codes, scales)), axis, block_size)
  np.testing.assert_allclose(decoded[real], (table(got_codes) * largest)[real],
                             rtol=1e-6)


@pytest.mark.parametrize('signed', [True, False], ids=['signed', 'nonneg'])
def test_round_trip_error_is_within_half_a_map_gap(signed):
  """|x̂ - x| <= A·g/2, g the widest gap of the map: 0.9/64 signed (the
  top decade's 64 values), 0.9/128 for non-negative blocks."""
  x = _gaussian((64, 1024), seed=1) * np.logspace(-6, 2, 1024,
                                                  dtype=np.float32)
  x = x if signed else np.abs(x)
  quantize, dequantize = _coders(BLOCK)
  codes, scales = quantize(jnp.asarray(x))
  back = np.asarray(dequantize(codes, scales))
  largest = np.repeat(np.abs(np.asarray(scales)), BLOCK, axis=1)
  half_gap = (0.9 / 64 if signed else 0.9 / 128) / 2
  assert (np.abs(back - x) <= half_gap * largest * (1 + 1e-5)).all()
  assert (np.sign(back) * np.sign(x) >= 0).all()  # no sign flips
  # Each block's largest magnitude (when positive) and zeros are exact.
  at = np.abs(x).reshape(64, -1, BLOCK).argmax(-1)
  peaks = np.take_along_axis(x.reshape(64, -1, BLOCK), at[..., None], -1)
  peaks_back = np.take_along_axis(back.reshape(64, -1, BLOCK),
                                  at[..., None], -1)
  positive = peaks > 0
  np.testing.assert_array_equal(peaks_back[positive], peaks[positive])
  zeros = np.zeros((4, BLOCK), np.float32)
  np.testing.assert_array_equal(dequantize(*quantize(zeros)), zeros)


def test_maps_and_codes_match_bitsandbytes():
  """The oracle: bitsandbytes' block-wise quantization on CPU. Its maps
  are ours; its decoder reads our codes as we do; its coder agrees with
  ours almost everywhere, and where it does not, ours is the nearer."""
  torch = pytest.importorskip('torch')
  functional = pytest.importorskip('bitsandbytes.functional')
  for signed in (True, False):
    theirs = functional.create_dynamic_map(signed=signed).numpy()
    np.testing.assert_allclose(quantization.dynamic_map(signed), theirs,
                               rtol=0, atol=1e-7)
  quantize, dequantize = _coders(BLOCK)
  for signed in (True, False):
    x = _gaussian((16, 1024), seed=2)
    x = x if signed else x**2
    code = functional.create_dynamic_map(signed=signed)
    their_codes, state = functional.quantize_blockwise(
        torch.tensor(x), code=code, blocksize=BLOCK)
    our_codes, scales = quantize(jnp.asarray(x))
    ours = np.asarray(dequantize(our_codes, scales))
    np.testing.assert_array_equal(np.abs(np.asarray(scales)).ravel(),
                                  state.absmax.numpy())
    theirs = functional.dequantize_blockwise(
        torch.tensor(np.asarray(our_codes)), absmax=state.absmax, code=code,
        blocksize=BLOCK).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-12)
    theirs = functional.dequantize_blockwise(their_codes, state).numpy()
    assert (np.abs(ours - x) <= np.abs(theirs - x) + 2e-6).all()  # ties
    agree = (np.asarray(our_codes) == their_codes.numpy()).mean()
    assert agree > (0.99 if signed else 0.95), agree


def _abstract(shapes):
  return {name: jax.ShapeDtypeStruct(shape, jnp.float32)
          for name, shape in shapes.items()}


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('inner', [
    lambda: optax.adamw(1e-3),
    lambda: flora_jax.flora(1e-3, rank=8, min_dim=64),
    lambda: flora_jax.galore(1e-3, 32, min_dim=64),
], ids=['adamw', 'flora', 'galore'])
def test_coded_leaves_take_under_27_percent_of_float32(inner):
  params = _abstract({'w': (1024, 768), 'tall': (2048, 300),
                      'stack': (3, 500, 700), 'bias': (768,)})
  state = jax.eval_shape(flora_jax.quantize_state(inner()).init, params)
  plain = jax.eval_shape(inner().init, params)
  ours = jax.tree.leaves_with_path(state.inner_state)
  theirs = jax.tree.leaves(plain)
  coded = [(leaf, state.scales[jax.tree_util.keystr(path)], original)
           for (path, leaf), original in zip(ours, theirs, strict=True)
           if jax.tree_util.keystr(path) in state.scales]
  assert len(coded) >= 3 and len(coded) == len(state.scales)
  assert (_bytes([(c, s) for c, s, _ in coded])
          <= 0.27 * _bytes([o for _, _, o in coded]))
  for code, _, original in coded:
    assert code.shape == original.shape and code.dtype == jnp.uint8
  # Nothing else changed: the other leaves are the inner state's own.
  for (path, leaf), original in zip(ours, theirs, strict=True):
    if jax.tree_util.keystr(path) not in state.scales:
      assert (leaf.shape, leaf.dtype) == (original.shape, original.dtype)


def test_stack_slices_are_coded_on_their_own():
  """The fused step updates one slice of a stack at a time: a stacked
  leaf's codes are those of its slices, coded one by one."""
  x = _gaussian((4, 40, 8))
  x[2] *= 1000
  stacked = quantization.block_axis(x.shape, 64, stacked=1)
  assert stacked == 1  # down the 40 rows, never across the stack
  codes, scales = quantization.quantize(jnp.asarray(x), 64, stacked)
  for s in range(4):
    c, sc = quantization.quantize(jnp.asarray(x[s]), 64, 0)
    np.testing.assert_array_equal(codes[s], c)
    np.testing.assert_array_equal(scales[s], sc)
  # A state leaf of a stacked parameter is blocked within its slices.
  params = {'stack': jnp.zeros((4, 64, 300))}
  tx = flora_jax.quantize_state(optax.scale_by_factored_rms(
      min_dim_size_to_factor=4), min_size=256, block_size=64)
  state = jax.eval_shape(tx.init, params)
  assert state.scales[".v_col['stack']"].shape == (4, 5)  # (L, blocks of n)
  assert ".v_row['stack']" not in state.scales  # 64 values a slice


def test_what_keeps_its_precision():
  params = {'embed': jnp.zeros((256, 64)), 'w': jnp.zeros((64, 256)),
            'b': jnp.zeros((256,))}
  tx = flora_jax.quantize_state(
      flora_jax.galore(1e-3, 8, min_dim=64), min_size=2048,
      mask=lambda p: {name: name != 'embed' for name in p})
  state = tx.init(params)
  galore = state.inner_state[0]
  inner = galore.inner_state
  assert inner.mu['w'].dtype == jnp.uint8  # (8, 256): 2048 values
  assert inner.mu['embed'].dtype == jnp.float32  # masked out
  assert inner.mu['b'].dtype == jnp.float32  # too small
  assert galore.projectors['w'].dtype == jnp.float32  # a basis, not coded
  assert inner.count.dtype == jnp.int32
  assert set(state.scales) == {"[0].inner_state.mu['w']",
                                "[0].inner_state.nu['w']"}
  # Flora's stored projectors too: its momentum is read back through them.
  stored = flora_jax.quantize_state(
      flora_jax.flora(1e-3, 8, min_dim=64, store_projectors=True),
      min_size=512).init(params)
  flora_state = stored.inner_state[1]
  assert flora_state.momentum['w'].dtype == jnp.uint8  # (64, 8)
  assert flora_state.projectors['w'].dtype == jnp.float32  # (256, 8)
  assert not any('projectors' in path for path in stored.scales)


def _decoded(state, block_size=BLOCK):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: quantization.dequantize(
          x, state.scales[jax.tree_util.keystr(path)], block_size)
      if jax.tree_util.keystr(path) in state.scales else x,
      state.inner_state)


@pytest.mark.parametrize('recompute', [True, False])
def test_update_is_the_inner_update_of_the_decoded_state(recompute):
  params = {'w': jnp.asarray(_gaussian((64, 512))),
            'b': jnp.zeros((512,))}
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx = flora_jax.quantize_state(inner, recompute=recompute)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(3):
    grads = jax.tree.map(lambda p, t=t: jnp.asarray(
        _gaussian(p.shape, seed=10 + t)), params)
    want_updates, want_inner = inner.update(grads, _decoded(state), params)
    updates, state = update(grads, state, params)
    np.testing.assert_allclose(updates['w'], want_updates['w'], rtol=1e-5,
                               atol=1e-8)
    np.testing.assert_allclose(updates['b'], want_updates['b'], rtol=1e-5,
                               atol=1e-8)
    codes, scales = quantization.quantize(want_inner[0].nu['w'], BLOCK)
    got_codes = np.asarray(state.inner_state[0].nu['w'], int)
    # Equal codes, but for a value at a threshold that float rounding of
    # the compiled update tips to the neighbouring code.
    assert (np.abs(got_codes - np.asarray(codes, int)) <= 1).all()
    assert (got_codes != np.asarray(codes)).mean() < 1e-3
    np.testing.assert_allclose(state.scales["[0].nu['w']"], scales,
                               rtol=1e-6)
    assert jnp.signbit(state.scales["[0].nu['w']"]).all()  # non-negative
    params = optax.apply_updates(params, updates)


def test_optax_tree_utils_find_one_value():
  """The scales are a dict by path, not a mirror of the inner state
  (whose MaskedNodes optax would find too): tree_get / tree_set, as used
  with inject_hyperparams, see one learning rate."""
  tx = flora_jax.quantize_state(optax.inject_hyperparams(optax.adam)(
      learning_rate=1e-3))
  params = {'w': jnp.ones((64, 128))}
  state = tx.init(params)
  assert float(optax.tree_utils.tree_get(state, 'learning_rate')) == (
      pytest.approx(1e-3))
  state = optax.tree_utils.tree_set(state, learning_rate=0.5)
  updates, _ = tx.update({'w': jnp.ones((64, 128))}, state, params)
  np.testing.assert_allclose(updates['w'], -0.5, rtol=1e-5)


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(32, 128, rngs=rngs)
    self.out = nnx.Linear(128, 32, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.hidden(x)))


@functools.cache
def _regression_losses(bits):
  """200 Adam steps of a small MLP in an nnx.Optimizer, 32- or 8-bit."""
  x = jnp.asarray(_gaussian((256, 32), seed=3))
  teacher = jnp.asarray(_gaussian((32, 32), seed=4)) / 6
  y = jnp.tanh(x @ teacher) + 0.5 * jnp.sin(3 * x)
  model = _MLP(nnx.Rngs(0))
  tx = optax.adam(3e-3)
  if bits == 8:
    tx = flora_jax.quantize_state(tx)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return np.array([float(step(model, optimizer)) for _ in range(200)])


def test_8bit_adam_trains_like_adam_in_an_nnx_optimizer():
  full, coded = _regression_losses(32), _regression_losses(8)
  assert full[-1] < 0.2 * full[0]  # it learns
  assert abs(coded[-1] - full[-1]) < 0.1 * full[-1], (coded[-1], full[-1])


def test_bad_arguments_are_refused():
  with pytest.raises(TypeError, match='inner'):
    flora_jax.quantize_state(optax.adam)
  with pytest.raises(ValueError, match='block_size'):
    flora_jax.quantize_state(optax.adam(1e-3), block_size=0)
  with pytest.raises(ValueError, match='min_size'):
    flora_jax.quantize_state(optax.adam(1e-3), min_size=-1)
  tx = flora_jax.quantize_state(optax.adam(1e-3))
  params = {'w': jnp.zeros((64, 64))}
  with pytest.raises(TypeError, match='QuantizedState'):
    tx.update(params, optax.adam(1e-3).init(params))
