"""8-bit block-wise storage of optimizer states (`quantize_state`).

Adam keeps two float32 numbers per weight; stored in 8 bits each, with one
float32 scale per block of 256, they take a little over a quarter of that.
Each block is divided by its largest magnitude and every value is replaced
by the index of the nearest entry of a 256-value map that is dense near
zero, so that the small moments, which decide Adam's step size, keep their
relative precision (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_jax._src import flora
from flora_jax._src import subspace
from flora_jax._src import tree_util
from flora_jax._src import validation


class QuantizedState(NamedTuple):
  """State of `quantize_state`."""

  # The wrapped transformation's state, each coded leaf replaced by uint8
  # codes of the leaf's own shape (and path); the other leaves as they are.
  inner_state: optax.OptState
  # {coded leaf's path in inner_state (jax.tree_util.keystr): f32 scales},
  # the leaf's shape with its block axis cut to the number of blocks along
  # it; each the block's largest magnitude, negated (sign bit set) when the
  # block is coded with the non-negative map. A dict, not a mirror of
  # inner_state, so that optax.tree_utils.tree_get / tree_set (of
  # inject_hyperparams' learning rate, say) find each field once.
  scales: dict[str, jax.Array]


# The maps: seven decades, 10^(d-6)·[0.1, 1] for d = 0..6; decade d holds
# the midpoints of 2^(d+f) equal intervals of [0.1, 1], f = 0 for the signed
# map (which mirrors them below zero) and 1 for the non-negative one (the
# sign bit becomes a fraction bit); then 0 and 1. Everything below is
# arithmetic on the codes, not table lookups: elementwise, so that XLA can
# fuse it into the update around it (it does not fuse a gather on CPU).
_DECADES = 7


def _power_of_ten(decade: jax.Array) -> jax.Array:
  """``10^(decade - 6)`` in float32, exactly as rounded from float64."""
  value = jnp.zeros(decade.shape, jnp.float32)
  for d in range(_DECADES):
    value = jnp.where(decade == d, np.float32(10.0 ** (d - 6)), value)
  return value


def _magnitude(k: jax.Array, fraction: jax.Array) -> jax.Array:
  """Value ``k`` (from 0, ascending) of a map's positive part.

  With ``n = k + 2^f``, the first set bit of ``n`` is at ``d + f``: the
  decade; the bits below it number the interval ``j`` within it.
  """
  n = k + jnp.left_shift(1, fraction)
  top = 31 - jax.lax.clz(n)  # d + f
  j = n - jnp.left_shift(1, top)
  within = jnp.ldexp(j.astype(jnp.float32) + 0.5, -top)  # (j + 1/2) / 2^top
  return _power_of_ten(top - fraction) * (0.1 + 0.9 * within)


# Codes per map: signed 0..126 are -v(126 - c), 127 is 0, 128..254 are
# v(c - 128), 255 is 1; non-negative 0 is 0, 1..254 are v(c - 1), 255 is 1.
_LAST = {True: 126, False: 253}  # the last index of the positive part


def _decode_normalized(codes: jax.Array, nonneg: jax.Array) -> jax.Array:
  """The map value of each code, in [-1, 1]."""
  codes = codes.astype(jnp.int32)
  fraction = nonneg.astype(jnp.int32)
  positive = nonneg | (codes >= 128)
  k = jnp.where(nonneg, codes - 1, jnp.where(positive, codes - 128,
                                             126 - codes))
  k = jnp.clip(k, 0, jnp.where(nonneg, _LAST[False], _LAST[True]))
  magnitude = _magnitude(k, fraction)
  value = jnp.where(positive, magnitude, -magnitude)
  zero = jnp.where(nonneg, codes == 0, codes == 127)
  return jnp.where(zero, 0.0, jnp.where(codes == 255, 1.0, value))


def _nearest_codes(values: jax.Array, nonneg: jax.Array) -> jax.Array:
  """The code of the map entry nearest to each value (``|value| <= 1``).

  The decade from ``log10``, the interval within it by division; rounding
  there can only be off by one entry, so the entries either side, 0 and
  (for non-negative values) 1 are compared too.
  """
  size = jnp.abs(values)
  fraction = nonneg.astype(jnp.int32)
  last = jnp.where(nonneg, _LAST[False], _LAST[True])
  decade = jnp.clip(jnp.floor(jnp.log10(size)) + _DECADES, 0,
                    _DECADES - 1).astype(jnp.int32)
  top = decade + fraction
  within = (size / _power_of_ten(decade) - 0.1) / 0.9
  j = jnp.clip(jnp.floor(jnp.ldexp(within, top)), 0,
               jnp.left_shift(1, top) - 1).astype(jnp.int32)
  guess = jnp.left_shift(1, top) - jnp.left_shift(1, fraction) + j
  best_k = jnp.clip(guess, 0, last)
  best = jnp.abs(size - _magnitude(best_k, fraction))
  for step in (-1, 1):
    k = jnp.clip(guess + step, 0, last)
    distance = jnp.abs(size - _magnitude(k, fraction))
    best_k = jnp.where(distance < best, k, best_k)
    best = jnp.minimum(distance, best)
  negative = values < 0
  codes = jnp.where(nonneg, best_k + 1, jnp.where(negative, 126 - best_k,
                                                  128 + best_k))
  # 0 and 1 (1 only for values >= 0: the signed map has no -1).
  codes = jnp.where(size < best, jnp.where(nonneg, 0, 127), codes)
  best = jnp.minimum(size, best)
  return jnp.where(~negative & (1.0 - size < best), 255, codes)


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
  """The 256 sorted values of the dynamic quantization map, in [-1, 1].

  Signed: ``2^d`` values in decade ``d`` (``10^(d-6)·[0.1, 1]``, d = 0..6),
  their negatives, 0 and 1. Non-negative: ``2^(d+1)`` values per decade,
  0 and 1. The smallest non-zero magnitude is about ``5e-7`` (``3e-7``
  non-negative) of the block's largest.

  Args:
    signed: the map of signed values (first moments), else of non-negative
      ones (second moments).

  Returns:
    float32[256], sorted; code ``c`` stands for entry ``c``.
  """
  codes = jnp.arange(256)
  values = np.asarray(_decode_normalized(
      codes, jnp.full(codes.shape, not signed)))
  assert (np.diff(values) > 0).all()
  return values


def block_axis(shape: tuple[int, ...], block_size: int,
               stacked: int = 0) -> int:
  """The axis blocks run along: the last, or the longer of the last two.

  The last axis, unless it is shorter than a block and the one before is
  longer (a compressed momentum ``(m, r)``, say), so that few blocks are
  partial. The ``stacked`` leading axes are never blocked: each slice of a
  stack is coded on its own, as the fused step updates it.
  """
  last = len(shape) - 1
  if (last - 1 >= stacked and shape[last] < block_size
      and shape[last - 1] > shape[last]):
    return last - 1
  return last


def _coded_axis(codes_shape: tuple[int, ...],
                scales_shape: tuple[int, ...]) -> int:
  """The block axis of codes, read off where their scales' shape differs.

  Where none differs every block holds one value, along an axis of size 1
  (or any axis, with blocks of one): each such axis decodes the same.
  """
  pairs = list(zip(codes_shape, scales_shape, strict=True))
  for axis, (a, b) in enumerate(pairs):
    if a != b:
      return axis
  ones = [axis for axis, (a, _) in enumerate(pairs) if a == 1]
  return ones[0] if ones else len(codes_shape) - 1


def _blocks(x: jax.Array, axis: int, block_size: int) -> jax.Array:
  """``x`` as ``(..., blocks, block_size)``, ``axis`` split, zero-padded."""
  x = jnp.moveaxis(x, axis, -1)
  size = x.shape[-1]
  count = -(-size // block_size)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, count * block_size - size)]
  return jnp.pad(x, pad).reshape(x.shape[:-1] + (count, block_size))


def _unblock(blocks: jax.Array, axis: int, size: int) -> jax.Array:
  x = blocks.reshape(blocks.shape[:-2] + (-1,))[..., :size]
  return jnp.moveaxis(x, -1, axis)


def block_scales(x: jax.Array, block_size: int, axis: int) -> jax.Array:
  """The scale of each block of ``x`` along ``axis`` (see `quantize`)."""
  blocks = _blocks(x.astype(jnp.float32), axis, block_size)
  largest = jnp.max(jnp.abs(blocks), axis=-1)
  nonneg = jnp.min(blocks, axis=-1) >= 0
  return jnp.moveaxis(jnp.where(nonneg, -largest, largest), -1, axis)


def encode(x: jax.Array, scales: jax.Array, block_size: int) -> jax.Array:
  """The codes of ``x`` in blocks of the given `block_scales`.

  A value beyond its block's scale (computed apart, a rounding away) codes
  as the nearest end of the map; a negative one in a non-negative block as
  0.
  """
  axis = _coded_axis(x.shape, scales.shape)
  blocks = _blocks(x.astype(jnp.float32), axis, block_size)
  scales = jnp.moveaxis(scales, axis, -1)[..., None]
  largest, nonneg = jnp.abs(scales), jnp.signbit(scales)
  normalized = jnp.clip(blocks / jnp.where(largest > 0, largest, 1.0),
                        jnp.where(nonneg, 0.0, -1.0), 1.0)
  codes = _nearest_codes(normalized, nonneg).astype(jnp.uint8)
  return _unblock(codes, axis, x.shape[axis])


def quantize(x: jax.Array, block_size: int,
             axis: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Block-wise 8-bit codes of ``x``: `encode` with its `block_scales`.

  Each block of ``block_size`` consecutive values along ``axis`` is
  divided by its largest magnitude ``A`` and each value replaced by the
  index of the nearest entry of `dynamic_map` — the non-negative map when
  the block holds no negative value, else the signed map.

  Args:
    x: a floating array.
    block_size: values per block.
    axis: the axis blocks run along; None for `block_axis` of ``x``.

  Returns:
    ``(codes, scales)``: uint8 codes shaped like ``x``; float32 scales,
    ``x``'s shape with the block axis cut to the number of blocks, ``A``
    for a signed block, ``-A`` for a non-negative one.
  """
  axis = block_axis(x.shape, block_size) if axis is None else axis % x.ndim
  scales = block_scales(x, block_size, axis)
  return encode(x, scales, block_size), scales


def dequantize(codes: jax.Array, scales: jax.Array,
               block_size: int) -> jax.Array:
  """The float32 values that `quantize` coded as ``(codes, scales)``."""
  axis = _coded_axis(codes.shape, scales.shape)
  blocks = _blocks(codes.astype(jnp.int32), axis, block_size)
  scales = jnp.moveaxis(scales, axis, -1)[..., None]
  values = _decode_normalized(blocks, jnp.signbit(scales))
  return _unblock(values * jnp.abs(scales), axis, codes.shape[axis])


def _exact_leaves(state: Any) -> Any:
  """A tree like ``state``: True where a leaf must keep its precision.

  Stored projectors (GaLore's, Fira's, Flora's with ``store_projectors``):
  the stored moments are coordinates in the subspace they span, to be read
  back with the same basis (and GaLore's must stay orthonormal).
  """
  def mark(node):
    if isinstance(node, subspace.GaLoreState):
      return jax.tree.map(lambda _: False, node)._replace(
          projectors=jax.tree.map(lambda _: True, node.projectors),
          inner_state=_exact_leaves(node.inner_state))
    if isinstance(node, flora.FloraStoredMomentumState):
      return jax.tree.map(lambda _: False, node)._replace(
          projectors=jax.tree.map(lambda _: True, node.projectors))
    return False

  stores_projectors = (subspace.GaLoreState, flora.FloraStoredMomentumState)
  return jax.tree.map(mark, state,
                      is_leaf=lambda x: isinstance(x, stores_projectors))


def _stacked_axes(state_leaves: list[tuple[Any, Any]], params: Any,
                  mask: Any) -> list[int | None]:
  """Per state leaf: its parameter's stacked axes, None where it is masked.

  A state leaf belongs to the parameter whose path ends its own (see
  `tree_util.parameter_matcher`); the axes before the parameter's last two
  are a stack of matrices. Leaves of no parameter have none.
  """
  param_leaves = jax.tree.leaves_with_path(params)
  lead: dict[tuple[str, ...], int | None] = {
      tree_util.path_parts(path): max(np.ndim(p) - 2, 0)
      for path, p in param_leaves}
  if mask is not None:
    flags = mask(params) if callable(mask) else mask
    for path, flag in jax.tree.leaves_with_path(flags):
      if not flag:
        lead[tree_util.path_parts(path)] = None
  parameter_of = tree_util.parameter_matcher(lead)
  stacked = []
  for key_path, _ in state_leaves:
    param_path = parameter_of(key_path)
    stacked.append(0 if param_path is None else lead[param_path])
  return stacked


def _coded_update(inner, block_size: int, recompute: bool, inputs,
                  extra_args) -> tuple[Any, QuantizedState]:
  """`quantize_state`'s update of ``inputs = (updates, state, params)``."""
  state = inputs[1]
  paths, treedef = jax.tree.flatten_with_path(state.inner_state)
  names = [jax.tree_util.keystr(path) for path, _ in paths]
  unknown = set(state.scales) - set(names)
  if unknown:
    raise ValueError(f'quantize_state: scales for {sorted(unknown)}, which'
                     ' the inner state does not have: a state of other'
                     ' settings or another transformation.')

  def inner_update(inputs):
    updates, state, params = inputs
    decoded = [
        dequantize(leaf, state.scales[name], block_size)
        if name in state.scales else leaf
        for name, leaf in zip(names, treedef.flatten_up_to(
            state.inner_state), strict=True)
    ]
    new_updates, new_state = inner.update(
        updates, treedef.unflatten(decoded), params, **extra_args)
    return new_updates, treedef.flatten_up_to(new_state)

  new_updates, new_leaves = inner_update(inputs)
  new_scales = {
      name: block_scales(leaf, block_size, _coded_axis(
          np.shape(old), state.scales[name].shape))
      for name, (_, old), leaf in zip(names, paths, new_leaves, strict=True)
      if name in state.scales
  }
  if recompute:
    # The update again, for the updates, then again for the codes: each
    # pass uses the new state once, so that XLA can fuse it into that use
    # rather than hold it for the next. The barriers keep the passes apart
    # (not merged back into one) and in order.
    inputs, _ = jax.lax.optimization_barrier((inputs, new_scales))
    new_updates, _ = inner_update(inputs)
    inputs, _ = jax.lax.optimization_barrier((inputs, new_updates))
    _, new_leaves = inner_update(inputs)
  codes = [
      encode(leaf, new_scales[name], block_size)
      if name in new_scales else leaf
      for name, leaf in zip(names, new_leaves, strict=True)
  ]
  return new_updates, QuantizedState(treedef.unflatten(codes), new_scales)


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    mask: Any = None,
    recompute: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Stores the large floating leaves of ``inner``'s state in 8 bits.

  Each floating state leaf with at least ``min_size`` values per slice of
  its parameter's stack (the whole leaf when the parameter has at most two
  axes, or the leaf belongs to none) is kept as uint8
  codes plus one float32 scale per block of ``block_size`` values along
  one axis (`block_axis`): the block's largest magnitude ``A``. A value
  ``x`` of the block is coded as the nearest entry of a 256-value map
  :math:`q` (`dynamic_map`),

  .. math::

    \mathrm{code}(x) = \arg\min_c |q_c - x / A|, \qquad
    \hat x = A\, q_{\mathrm{code}(x)},

  the non-negative map for a block without negative values (Adam's second
  moments: twice the resolution), else the signed one. The map is
  logarithmic in the magnitude: its top decade, ``A/10`` to ``A``, holds
  64 values (an error of at most 0.7% of ``A``), each decade below half as
  many, down to about ``5e-7·A``, so small moments keep their order of
  magnitude. With 256-value blocks a coded leaf takes
  ``1 + 4/256`` bytes per value: 25.4% of float32.

  ``update`` decodes the state to float32, runs ``inner.update`` and codes
  the new state, so any optax transformation works inside: `optax.adam`,
  the compressed momentum of `flora_jax.flora`, the inner state of
  `flora_jax.galore` and `flora_jax.fira`. Counters, keys, small leaves
  (norm scales, biases) and stored projectors (GaLore's, Flora's) keep
  their own precision.
  The codes have their leaf's shape and path, so
  `flora_jax.state_shardings`, `flora_jax.memory_report`, orbax and
  `flora_jax.fused_train_step` treat them as the leaves they replace; a
  stacked leaf's blocks never cross its matrices. A NaN or infinity in a
  state leaf makes its whole block NaN (``optax.apply_if_finite`` around
  the optimizer keeps such steps out).

  Args:
    inner: the transformation whose state is stored in 8 bits.
    block_size: values per block (the paper's block-wise quantization: an
      outlier costs precision to its own block only).
    min_size: matrices smaller than this keep their precision (the paper's
      4096).
    mask: like `optax.masked`'s: a tree like the parameters (or a function
      of them returning one) of bools; the state of a parameter marked
      False keeps its precision (the paper keeps embeddings in 32 bits).
      None codes every large leaf.
    recompute: run ``inner.update`` three times per step (for the new
      state's block scales, for the updates, for the codes), so that each
      pass uses the new state once and XLA can fuse it into that use
      instead of holding it. False runs it once: faster for an update that
      costs more than its memory traffic (GaLore's SVD refresh). Measured
      for Adam in an ordinary step on CPU, whose reductions read their
      input from memory: 10 bytes of temporaries per parameter, 20 with
      False; `flora_jax.fused_train_step` holds one layer's.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is
    `QuantizedState`.

  Example:
    >>> import jax.numpy as jnp, optax, flora_jax
    >>> params = {'w': jnp.ones((128, 256)), 'b': jnp.zeros(256)}
    >>> tx = flora_jax.quantize_state(optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> mu = state.inner_state[0].mu
    >>> mu['w'].dtype, mu['b'].dtype  # the bias is too small to code
    (dtype('uint8'), dtype('float32'))
    >>> updates, state = tx.update({'w': jnp.ones((128, 256)),
    ...                             'b': jnp.ones(256)}, state)
    >>> round(float(updates['w'][0, 0]), 6)  # Adam's first: -lr·sign(g)
    -0.001

  References:
    Dettmers et al., 2022, https://arxiv.org/abs/2110.02861
  """
  validation.check_transformation('inner', inner)
  block_size = validation.check_positive_int('block_size', block_size)
  min_size = validation.check_positive_int('min_size', min_size)
  recompute = validation.check_bool('recompute', recompute)
  inner = optax.with_extra_args_support(inner)

  def coded_axis(leaf, exact: bool, stacked: int | None) -> int | None:
    """The block axis of a leaf to code, None for a leaf kept as it is."""
    if exact or stacked is None:
      return None
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return None
    if np.ndim(leaf) <= stacked or np.prod(leaf.shape[stacked:]) < min_size:
      return None
    return block_axis(leaf.shape, block_size, stacked)

  def init_fn(params):
    state = inner.init(params)
    # Named without NNX Variables, as `update` sees the state (nnx.Optimizer
    # passes Variables to init, arrays to update); returned with them.
    pure = tree_util.unwrap_variables(state)
    leaves, treedef = jax.tree.flatten_with_path(pure)
    exact = treedef.flatten_up_to(_exact_leaves(pure))
    stacked = _stacked_axes(leaves, tree_util.unwrap_variables(params), mask)
    codes, scales = [], {}
    for (path, leaf), keep, lead in zip(leaves, exact, stacked, strict=True):
      axis = coded_axis(leaf, keep, lead)
      if axis is None:
        codes.append(leaf)
      else:
        code, scales[jax.tree_util.keystr(path)] = quantize(
            leaf, block_size, axis)
        codes.append(code)
    return QuantizedState(jax.tree.structure(state).unflatten(codes), scales)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, QuantizedState):
      raise TypeError('quantize_state: the state must be the QuantizedState'
                      f' of its init, got {type(state).__name__}.')
    return _coded_update(inner, block_size, recompute,
                         (updates, state, params), extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
