"""Which layers of stacked inputs each output of a traced function reads.

A scanned model stores the kernels of its L layers as one array whose axis
0 indexes layers (a ``(L, m, n)`` stack). Applying an optimizer's update one
layer at a time is only equal to the whole-tree update when that update
treats each layer slice on its own: slice l of every output must depend on
slice l of the stacks and nothing else of them. `optax.clip_by_global_norm`,
`optax.lamb` or `optax.adafactor`'s default block RMS clipping do not: they
reduce over the whole stacked leaf.

`layer_dependence` finds this out from the function's jaxpr, without
running it: an abstract interpretation gives every variable a status,

* CLEAN: independent of the stacked inputs;
* AXIS(k): axis k indexes layers; slice l depends only on slice l of the
  stacks;
* SLICE: inside the body of a scan over the layer axis (`jax.lax.map` over a
  stack), a value computed from the current layer's slice;
* MIXED: combines different layers; it remembers the first operation that
  did, for the error message of whoever refuses the function;

and whether it reads an input marked ``'rest'``. Unknown operations on a
stacked value are MIXED: the analysis may refuse a function that treats
layers apart (indexing a stack with a loop counter, `jax.lax.map` with a
``batch_size``, a reshape that merges the layer axis with another), but it
accepts none that does not, except in two documented ways:

* the predicate of a `jax.lax.cond` is control, not data: a branch chosen
  by a predicate over all layers (this library skips work with ``jnp.any``
  over a stack) is accepted when every branch is per-layer. The predicate
  of a `jax.lax.while_loop` is data: its trip count changes the values;
* a primitive this module does not know, without axis parameters and
  whose operands have the output's shape, is taken to be elementwise.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jax_core


@dataclasses.dataclass(frozen=True)
class Dependence:
  """How one output leaf of a traced function depends on its inputs.

  Attributes:
    layer_axis: the output axis that indexes layers: slice l of the output
      depends only on slice l of the stacked inputs. None when the output
      does not depend on any stacked input, or when it mixes layers.
    mixes_layers: None, or a short description of the first operation that
      combined different layers on the way to this output, e.g.
      ``'reduce_sum over the layer axis (optax/_src/clipping.py:123)'``.
    reads_rest: whether the output depends on an input marked ``'rest'``.
  """

  layer_axis: int | None
  mixes_layers: str | None
  reads_rest: bool


def layer_dependence(fn: Callable[..., Any], kinds: Any, *args: Any) -> Any:
  """How each output leaf of ``fn(*args)`` depends on stacked inputs.

  Nothing is computed: ``fn`` is only traced (`jax.make_jaxpr`), so the
  leaves of ``args`` may be `jax.ShapeDtypeStruct`.

  Args:
    fn: the function to analyse, e.g. an optimizer's ``update``.
    kinds: a pytree with the structure of ``args`` (the tuple of positional
      arguments), e.g. built with `jax.tree.map` over it, whose leaves are
      ``'layers'`` (axis 0 of that input leaf indexes layers), ``'rest'``
      (an input whose readers are reported by ``reads_rest``) or None.
    *args: the positional arguments of ``fn``.

  Returns:
    A pytree with the structure of ``fn``'s output whose leaves are
    `Dependence`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> stack = jax.ShapeDtypeStruct((4, 8, 8), jnp.float32)
    >>> layer_dependence(lambda x: x.sum(axis=(1, 2)), ('layers',), stack)
    Dependence(layer_axis=0, mixes_layers=None, reads_rest=False)
  """
  leaves, treedef = jax.tree.flatten(args)
  kind_leaves = treedef.flatten_up_to(kinds)
  inputs = [_input_status(kind, leaf)
            for kind, leaf in zip(kind_leaves, leaves, strict=True)]

  # A new function each time: jax caches traces by function, and a trace
  # made before in another context (e.g. outside
  # `compat.without_ordering_hints`) would be reused.
  def traced(*args):
    return fn(*args)

  closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*args)
  outputs = _run(closed.jaxpr, inputs)
  return jax.tree.unflatten(
      jax.tree.structure(out_shape), [_dependence(s) for s in outputs])


# Statuses. A layer state is CLEAN (None), AXIS(k) (the int k), SLICE or
# MIXED.


@dataclasses.dataclass(frozen=True)
class _Slice:
  """One layer's slice, inside the body of a scan over the layer axis."""


@dataclasses.dataclass(frozen=True)
class _Mixed:
  """Combines layers; ``why`` names the first operation that did."""

  why: str


_SLICE = _Slice()
_Layers = int | _Slice | _Mixed | None


# What a rule of a first-order operation sees of each operand: its layer
# axis, or None when it is not stacked (nor a slice, nor mixed).
_Axes = list[int | None]
_Rule = Callable[[Any, _Axes], _Layers]


class _Status(NamedTuple):
  layers: _Layers = None
  rest: bool = False


_CLEAN = _Status()


def _input_status(kind: Any, leaf: Any) -> _Status:
  if kind is None:
    return _CLEAN
  if isinstance(kind, str) and kind == 'rest':
    return _Status(rest=True)
  if isinstance(kind, str) and kind == 'layers':
    if not getattr(leaf, 'shape', ()):
      raise ValueError(
          "An input marked 'layers' needs an axis 0 to index layers; got"
          f' shape {getattr(leaf, "shape", ())}.')
    return _Status(0)
  raise ValueError(
      f"kinds leaves must be 'layers', 'rest' or None; got {kind!r}.")


def _dependence(status: _Status) -> Dependence:
  layers = status.layers
  # A SLICE never leaves the scan that made it (its ys become AXIS(0)).
  assert not isinstance(layers, _Slice), status
  if isinstance(layers, _Mixed):
    return Dependence(None, layers.why, status.rest)
  return Dependence(layers, None, status.rest)


# The interpreter.


def _run(jaxpr: jax_core.Jaxpr, inputs: Sequence[_Status]) -> list[_Status]:
  """The statuses of ``jaxpr``'s outputs; its constants are CLEAN."""
  env: dict[Any, _Status] = dict(zip(jaxpr.invars, inputs, strict=True))

  def read(v: Any) -> _Status:
    return _CLEAN if isinstance(v, jax_core.Literal) else env.get(v, _CLEAN)

  for eqn in jaxpr.eqns:
    outputs = _equation(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outputs, strict=True))
  return [read(v) for v in jaxpr.outvars]


def _equation(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """The statuses of ``eqn``'s outputs, given those of its operands."""
  handler = _HIGHER_ORDER.get(eqn.primitive.name)
  if handler is None or all(s == _CLEAN for s in inputs):
    return _everywhere(eqn, _layers(eqn, [s.layers for s in inputs]), inputs)
  token = _CALLS.set(_CALLS.get() + (eqn,))
  try:
    outputs = handler(eqn, inputs)
  except (AttributeError, IndexError, KeyError, TypeError, ValueError):
    outputs = None
  finally:
    _CALLS.reset(token)
  if outputs is None or len(outputs) != len(eqn.outvars):
    # Parameters laid out differently in some jax version: refuse.
    return _everywhere(eqn, _unknown(eqn), inputs)
  return outputs


def _everywhere(
    eqn: Any, layers: _Layers, inputs: list[_Status]
) -> list[_Status]:
  """``layers`` for every output, reading rest if any input does."""
  rest = any(s.rest for s in inputs)
  return [_Status(layers, rest)] * len(eqn.outvars)


def _layers(eqn: Any, inputs: list[_Layers]) -> _Layers:
  """The layer state of a first-order equation's outputs."""
  stacked = [x for x in inputs if x is not None]
  if not stacked:
    return None
  for x in stacked:
    if isinstance(x, _Mixed):
      return x
  if any(isinstance(x, _Slice) for x in stacked):
    # Any operation on the current layer's values alone stays in that layer.
    if all(isinstance(x, _Slice) for x in stacked):
      return _SLICE
    return _mixed(eqn, "of one layer's slice with a whole stack")
  rule = _RULES.get(eqn.primitive.name)
  if rule is None and _is_elementwise(eqn):
    rule = _elementwise
  if rule is None:
    return _unknown(eqn)
  axes = [x if isinstance(x, int) else None for x in inputs]  # All are now.
  try:
    layers = rule(eqn, axes)
  except (AttributeError, IndexError, KeyError, TypeError, ValueError):
    return _unknown(eqn)
  # Axes computed from parameters may be numpy integers.
  return int(layers) if isinstance(layers, numbers.Integral) else layers


def _mixed(eqn: Any, what: str) -> _Mixed:
  return _Mixed(f'{eqn.primitive.name} {what} ({_where(eqn)})')


def _unknown(eqn: Any) -> _Mixed:
  return _Mixed(f'unknown primitive {eqn.primitive.name} ({_where(eqn)})')


def _where(eqn: Any) -> str:
  """``file:line`` of the user code that emitted ``eqn``, if known.

  The equations of a jitted library function (e.g. `jnp.linalg.norm`) have
  only the library's frames: they are located by the call that reached them.
  """
  for e in (eqn, *reversed(_CALLS.get())):
    location = _own_location(e)
    if location is not None:
      return location
  return 'unknown location'


# The higher-order equations being followed, innermost last.
_CALLS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    'flora_jax_layer_dependence_calls', default=())


def _own_location(eqn: Any) -> str | None:
  try:
    from jax._src import source_info_util
    for frame in source_info_util.user_frames(eqn.source_info.traceback):
      if frame.file_name != __file__:  # Not `layer_dependence`'s wrapper.
        return f'{_short_path(frame.file_name)}:{frame.start_line}'
  except Exception:
    # Only for messages: a jax without this private helper must not fail.
    pass
  return None


@functools.lru_cache(maxsize=256)
def _short_path(path: str) -> str:
  """``path`` from its top-level package (``'optax/_src/alias.py'``)."""
  for name, module in list(sys.modules.items()):
    if getattr(module, '__file__', None) == path:
      # A module a.b.c is in a/b/c.py or a/b/c/__init__.py.
      depth = name.count('.') + (os.path.basename(path) == '__init__.py')
      root = path
      for _ in range(depth + 1):
        root = os.path.dirname(root)
      return os.path.relpath(path, root)
  return path


def _shape(v: Any) -> tuple[int, ...] | None:
  shape = getattr(v.aval, 'shape', None)
  return None if shape is None else tuple(shape)


def _ndim(v: Any) -> int:
  return len(_shape(v) or ())


def _agreed(eqn: Any, inputs: _Axes) -> int | _Mixed:
  """The one layer axis of several stacked operands."""
  axes = {x for x in inputs if x is not None}
  if len(axes) != 1:
    return _mixed(eqn, 'of stacks with different layer axes')
  (axis,) = axes
  assert isinstance(axis, int)
  return axis


def _one_operand(
    rule: Callable[[Any, int], _Layers]
) -> _Rule:
  """A rule for operations with one stacked array operand, the first."""

  @functools.wraps(rule)
  def wrapped(eqn, inputs):
    axis, others = inputs[0], inputs[1:]
    if not isinstance(axis, int) or any(x is not None for x in others):
      return _mixed(eqn, 'with a stacked index or extra operand')
    return rule(eqn, axis)

  return wrapped


# Elementwise operations.

_ELEMENTWISE = frozenset((
    'abs', 'acos', 'acosh', 'add', 'add_any', 'and', 'asin', 'asinh',
    'atan', 'atan2', 'atanh', 'bessel_i0e', 'bessel_i1e', 'cbrt', 'ceil',
    'clamp', 'clz', 'complex', 'conj', 'convert_element_type', 'copy',
    'copy_p', 'cos', 'cosh', 'digamma', 'div', 'eq', 'erf', 'erf_inv',
    'erfc', 'exp', 'exp2', 'expm1', 'floor', 'ge', 'gt', 'igamma',
    'igamma_grad_a', 'igammac', 'imag', 'integer_pow', 'is_finite', 'le',
    'lgamma', 'log', 'log1p', 'logistic', 'lt', 'max', 'min', 'mul',
    'mulhi', 'ne', 'neg', 'nextafter', 'not', 'or', 'polygamma',
    'population_count', 'pow', 'random_clone', 'random_fold_in',
    'random_gamma_grad', 'real', 'reduce_precision',
    'regularized_incomplete_beta', 'rem', 'round', 'rsqrt', 'select_n',
    'shift_left', 'shift_right_arithmetic', 'shift_right_logical', 'sign',
    'sin', 'sinh', 'sqrt', 'square', 'stop_gradient', 'sub', 'tan', 'tanh',
    'threefry2x32', 'xor', 'zeta',
))

# Parameters that say an operation is not elementwise: it has axes.
_STRUCTURAL_PARAMS = frozenset((
    'axes', 'axis', 'axis_name', 'broadcast_dimensions', 'dimension',
    'dimension_numbers', 'dimensions', 'fft_lengths', 'k', 'new_sizes',
    'padding_config', 'permutation', 'reps', 'shape', 'sizes', 'slice_sizes',
    'start_indices', 'window_dimensions',
))


def _is_elementwise(eqn: Any) -> bool:
  """Whether ``eqn`` computes each output element from the same element.

  Known elementwise primitives, and unknown ones without axis parameters,
  whose operands all have the output's shape (jax >= 0.10 also broadcasts
  size-1 axes of an operand of the same rank, and scalars).
  """
  name = eqn.primitive.name
  if name not in _ELEMENTWISE and _STRUCTURAL_PARAMS & set(eqn.params):
    return False
  shape = _shape(eqn.outvars[0])
  if shape is None or any(_shape(v) != shape for v in eqn.outvars):
    return False
  return all(_broadcasts_to(_shape(v), shape) for v in eqn.invars)


def _broadcasts_to(shape: tuple[int, ...] | None, out: tuple[int, ...]):
  if shape is None:
    return False
  return not shape or (len(shape) == len(out) and all(
      d in (1, o) for d, o in zip(shape, out, strict=True)))


def _elementwise(eqn: Any, inputs: _Axes) -> _Layers:
  axis = _agreed(eqn, inputs)
  out = _shape(eqn.outvars[0]) or ()
  if isinstance(axis, int) and any(
      x is not None and (_shape(v) or ())[axis] != out[axis]
      for v, x in zip(eqn.invars, inputs, strict=True)):
    return _mixed(eqn, 'broadcasting one layer to all')
  return axis


# Structural operations: where the layer axis goes.


@_one_operand
def _broadcast_in_dim(eqn: Any, axis: int) -> _Layers:
  new_axis = int(eqn.params['broadcast_dimensions'][axis])
  size = (_shape(eqn.invars[0]) or ())[axis]
  if size != (_shape(eqn.outvars[0]) or ())[new_axis]:
    return _mixed(eqn, 'broadcasting one layer to all')
  return new_axis


@_one_operand
def _reshape(eqn: Any, axis: int) -> _Layers:
  """The axis that keeps the layer axis's size and the product before it."""
  old = _shape(eqn.invars[0]) or ()
  order = eqn.params.get('dimensions')
  if order is not None:  # Transposed first.
    axis = list(order).index(axis)
    old = tuple(old[d] for d in order)
  new = tuple(eqn.params['new_sizes'])
  before = math.prod(old[:axis])
  for new_axis, size in enumerate(new):
    if size == old[axis] and math.prod(new[:new_axis]) == before:
      return new_axis
  return _mixed(eqn, 'merging or splitting the layer axis')


@_one_operand
def _transpose(eqn: Any, axis: int) -> _Layers:
  return list(eqn.params['permutation']).index(axis)


def _removing(param: str, what: str) -> _Rule:
  """A rule for operations that act along (and may drop) ``param`` axes."""

  @_one_operand
  def rule(eqn, axis):
    dims = eqn.params[param]
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if axis in dims:
      return _mixed(eqn, what)
    # Reductions and squeeze drop their axes; rev, split and cumsum keep them.
    if _ndim(eqn.outvars[0]) == _ndim(eqn.invars[0]):
      return axis
    return axis - sum(d < axis for d in dims)

  return rule


@_one_operand
def _top_k(eqn: Any, axis: int) -> _Layers:
  last = _ndim(eqn.invars[0]) - 1
  if axis == eqn.params.get('axis', last) % (last + 1):
    return _mixed(eqn, 'along the layer axis')
  return axis


@_one_operand
def _fft(eqn: Any, axis: int) -> _Layers:
  if axis >= _ndim(eqn.invars[0]) - len(eqn.params['fft_lengths']):
    return _mixed(eqn, 'along the layer axis')
  return axis


@_one_operand
def _tile(eqn: Any, axis: int) -> _Layers:
  if eqn.params['reps'][axis] != 1:
    return _mixed(eqn, 'repeating the layer axis')
  return axis


@_one_operand
def _slice(eqn: Any, axis: int) -> _Layers:
  start = eqn.params['start_indices'][axis]
  limit = eqn.params['limit_indices'][axis]
  strides = eqn.params.get('strides')
  stride = 1 if strides is None else strides[axis]
  if (start, limit, stride) != (0, (_shape(eqn.invars[0]) or ())[axis], 1):
    return _mixed(eqn, 'of part of the layer axis')
  return axis


@_one_operand
def _dynamic_slice(eqn: Any, axis: int) -> _Layers:
  # A slice as long as the axis starts at 0 whatever the start index.
  if eqn.params['slice_sizes'][axis] != (_shape(eqn.invars[0]) or ())[axis]:
    return _mixed(eqn, 'of part of the layer axis')
  return axis


@_one_operand
def _pad(eqn: Any, axis: int) -> _Layers:
  if tuple(eqn.params['padding_config'][axis]) != (0, 0, 0):
    return _mixed(eqn, 'of the layer axis')
  return axis


def _dynamic_update_slice(eqn: Any, inputs: _Axes) -> _Layers:
  operand, update = inputs[0], inputs[1]
  if any(x is not None for x in inputs[2:]):
    return _mixed(eqn, 'at a stacked index')
  if update is None:  # Slice l is operand slice l, partly overwritten.
    return operand
  full = (_shape(eqn.invars[1]) or ())[update] == (
      _shape(eqn.invars[0]) or ())[update]
  if operand not in (None, update) or not full:
    return _mixed(eqn, 'into part of the layer axis')
  return update


def _stack_or_concatenate(eqn: Any, inputs: _Axes) -> _Layers:
  """``concatenate`` (along ``dimension``), ``stack`` (a new ``axis``)."""
  axis = _agreed(eqn, inputs)
  if not isinstance(axis, int):
    return axis
  if 'dimension' in eqn.params:
    if axis == eqn.params['dimension']:
      return _mixed(eqn, 'along the layer axis')
    return axis
  return axis + (eqn.params['axis'] <= axis)


def _sort(eqn: Any, inputs: _Axes) -> _Layers:
  axis = _agreed(eqn, inputs)
  if axis == eqn.params['dimension']:
    return _mixed(eqn, 'along the layer axis')
  return axis


def _reduce(eqn: Any, inputs: _Axes) -> _Layers:
  """The variadic ``reduce``: operands, then as many initial values."""
  half = len(inputs) // 2
  if any(x is not None for x in inputs[half:]):
    return _mixed(eqn, 'from a stacked initial value')
  axis = _agreed(eqn, inputs[:half])
  if not isinstance(axis, int):
    return axis
  if axis in eqn.params['axes']:
    return _mixed(eqn, 'over the layer axis')
  return axis - sum(d < axis for d in eqn.params['axes'])


def _dot_general(eqn: Any, inputs: _Axes) -> _Layers:
  """Output axes: the batch axes, the lhs free axes, the rhs free axes."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = (
      eqn.params['dimension_numbers'])
  lhs_free = [d for d in range(_ndim(eqn.invars[0]))
              if d not in lhs_contract and d not in lhs_batch]
  rhs_free = [d for d in range(_ndim(eqn.invars[1]))
              if d not in rhs_contract and d not in rhs_batch]
  sides = ((inputs[0], lhs_contract, lhs_batch, lhs_free, 0),
           (inputs[1], rhs_contract, rhs_batch, rhs_free, len(lhs_free)))
  positions = set()
  for axis, contract, batch, free, offset in sides:
    if axis is None:
      continue
    if axis in contract:
      return _mixed(eqn, 'contracting the layer axis')
    if axis in batch:
      positions.add(list(batch).index(axis))
    else:
      positions.add(len(lhs_batch) + offset + free.index(axis))
  if len(positions) != 1:
    return _mixed(eqn, 'pairing every layer of one stack with each of another')
  return positions.pop()


def _gather(eqn: Any, inputs: _Axes) -> _Layers:
  """Per-layer gathers: the layer axis batched or kept whole in each slice.

  The output axes not in ``offset_dims`` are the index batch axes (all but
  the last axis of the indices), in order.
  """
  operand, indices = inputs
  dims = eqn.params['dimension_numbers']
  offset_dims = tuple(dims.offset_dims)
  batch_positions = [d for d in range(_ndim(eqn.outvars[0]))
                     if d not in offset_dims]
  positions = set()
  if indices is not None:
    if indices == _ndim(eqn.invars[1]) - 1:
      return _mixed(eqn, 'with stacked index vectors')
    positions.add(batch_positions[indices])
  if operand is not None:
    if operand in dims.operand_batching_dims:
      i = list(dims.operand_batching_dims).index(operand)
      paired = dims.start_indices_batching_dims[i]
      if indices not in (None, paired):
        return _mixed(eqn, 'across the layer axis')
      positions.add(batch_positions[paired])
    else:
      kept = [d for d in range(_ndim(eqn.invars[0]))
              if d not in dims.collapsed_slice_dims
              and d not in dims.operand_batching_dims]
      whole = (eqn.params['slice_sizes'][operand]
               == (_shape(eqn.invars[0]) or ())[operand])
      if operand in dims.start_index_map or operand not in kept or not whole:
        return _mixed(eqn, 'across the layer axis')
      positions.add(offset_dims[kept.index(operand)])
  if len(positions) != 1:
    return _mixed(eqn, 'across the layer axis')
  return positions.pop()


def _scatter(eqn: Any, inputs: _Axes) -> _Layers:
  """Per-layer scatters into ``operand`` (its axes are the output's).

  A stacked operand alone keeps its axis: its slice l is only overwritten
  or combined with unstacked data. Otherwise every stacked operand must
  pair with the same operand axis: a batching axis, or a window axis that
  the updates cover whole.
  """
  operand, indices, updates = inputs[:3]
  if indices is None and updates is None:
    return operand
  dims = eqn.params['dimension_numbers']
  operand_shape = _shape(eqn.invars[0]) or ()
  update_shape = _shape(eqn.invars[2]) or ()
  window_operand_dims = [
      d for d in range(len(operand_shape))
      if d not in dims.inserted_window_dims
      and d not in dims.operand_batching_dims]
  scatter_update_dims = [d for d in range(len(update_shape))
                         if d not in dims.update_window_dims]
  pairs = {}  # operand axis -> (indices axis, updates axis)
  for d, u in zip(window_operand_dims, dims.update_window_dims,
                  strict=True):
    if (d not in dims.scatter_dims_to_operand_dims
        and update_shape[u] == operand_shape[d]):
      pairs[d] = (None, u)
  for d, j in zip(dims.operand_batching_dims,
                  dims.scatter_indices_batching_dims, strict=True):
    pairs[d] = (j, scatter_update_dims[j])
  for d, (j, u) in pairs.items():
    if operand in (None, d) and indices in (None, j) and updates in (None, u):
      return d
  return _mixed(eqn, 'across the layer axis')


# Batched matrix operations: how many trailing axes of each operand form
# one matrix (2 unless listed); the leading axes are batch axes, shared by
# every output.
_MATRIX_RANKS = {
    'cholesky': (2,), 'cholesky_update': (2, 1), 'eig': (2,), 'eigh': (2,),
    'geqp3': (2, 1), 'geqrf': (2,), 'hessenberg': (2,),
    'householder_product': (2, 1), 'lu': (2,),
    'lu_pivots_to_permutation': (1,), 'qr': (2,), 'schur': (2,),
    'svd': (2,), 'triangular_solve': (2, 2), 'tridiagonal': (2,),
    'tridiagonal_solve': (1, 1, 1, 2),
}


def _batched_matrices(eqn: Any, inputs: _Axes) -> _Layers:
  ranks = _MATRIX_RANKS[eqn.primitive.name]
  for i, (v, axis) in enumerate(zip(eqn.invars, inputs, strict=True)):
    rank = ranks[i] if i < len(ranks) else 2
    if isinstance(axis, int) and axis >= _ndim(v) - rank:
      return _mixed(eqn, 'on matrices that span the layer axis')
  return _agreed(eqn, inputs)


@_one_operand
def _leading_axes(eqn: Any, axis: int) -> _Layers:
  """Operations that keep the leading axes and change the trailing ones.

  ``random_bits``, ``random_split``, ``random_wrap`` (keys from their data)
  and back, and bitcasts between widths.
  """
  old, new = _shape(eqn.invars[0]) or (), _shape(eqn.outvars[0]) or ()
  if axis >= len(new) or old[:axis + 1] != new[:axis + 1]:
    return _mixed(eqn, 'of the layer axis')
  return axis


_RULES: dict[str, _Rule] = {
    'bitcast_convert_type': _leading_axes,
    'broadcast_in_dim': _broadcast_in_dim,
    'concatenate': _stack_or_concatenate,
    'dot_general': _dot_general,
    'dynamic_slice': _dynamic_slice,
    'dynamic_update_slice': _dynamic_update_slice,
    'fft': _fft,
    'gather': _gather,
    'pad': _pad,
    'reduce': _reduce,
    'reshape': _reshape,
    'rev': _removing('dimensions', 'of the layer axis'),
    'slice': _slice,
    'sort': _sort,
    'split': _removing('axis', 'along the layer axis'),
    'squeeze': _removing('dimensions', 'of the layer axis'),
    'stack': _stack_or_concatenate,
    'tile': _tile,
    'top_k': _top_k,
    'transpose': _transpose,
    'unstack': _removing('axis', 'of the layer axis'),
    **dict.fromkeys(
        ('argmax', 'argmin', 'reduce_and', 'reduce_max', 'reduce_min',
         'reduce_or', 'reduce_prod', 'reduce_sum', 'reduce_xor'),
        _removing('axes', 'over the layer axis')),
    **dict.fromkeys(
        ('cumlogsumexp', 'cummax', 'cummin', 'cumprod', 'cumsum'),
        _removing('axis', 'along the layer axis')),
    **dict.fromkeys(
        ('scatter', 'scatter-add', 'scatter_add', 'scatter-mul',
         'scatter_mul', 'scatter-min', 'scatter_min', 'scatter-max',
         'scatter_max'),
        _scatter),
    **dict.fromkeys(_MATRIX_RANKS, _batched_matrices),
    **dict.fromkeys(
        ('random_bits', 'random_seed', 'random_split', 'random_unwrap',
         'random_wrap'),
        _leading_axes),
}


# Higher-order primitives, followed into their jaxprs with full statuses
# (so that each output reads rest only if it does).


def _join(eqn: Any, a: _Status, b: _Status) -> _Status:
  """What is known of a value that is either ``a`` or ``b``."""
  return _Status(_join_layers(eqn, a.layers, b.layers), a.rest or b.rest)


def _join_layers(eqn: Any, a: _Layers, b: _Layers) -> _Layers:
  # A MIXED keeps its description: joins then only go up a lattice of
  # height 2 (CLEAN, then AXIS or SLICE, then MIXED).
  if a == b or b is None or isinstance(a, _Mixed):
    return a
  if a is None or isinstance(b, _Mixed):
    return b
  return _mixed(eqn, 'joining values with different layer axes')


def _open(jaxpr: Any) -> jax_core.Jaxpr:
  return jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr


def _identity(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """Sharding annotations and barriers: each output is its operand."""
  del eqn
  return list(inputs)


def _call(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  for name in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if name in eqn.params:
      return _run(_open(eqn.params[name]), inputs)
  raise KeyError(f'no jaxpr in {eqn.primitive.name}')


def _cond(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """Every branch may run: the join of their outputs.

  The index only chooses a branch (see the module docstring): its layers
  count only when it is the current layer's slice (so is the choice then).
  """
  index, operands = inputs[0], inputs[1:]
  branches = [_run(_open(b), operands) for b in eqn.params['branches']]
  choice = _Status(_SLICE if isinstance(index.layers, _Slice) else None,
                   index.rest)
  return [functools.reduce(functools.partial(_join, eqn), outputs, choice)
          for outputs in zip(*branches, strict=True)]


def _while(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """The carries' fixpoint; unlike `_cond`'s, the predicate is data.

  A trip count decided from several layers repeats every layer's update
  that many times: the carries then mix layers.
  """
  params = eqn.params
  n_cond, n_body = params['cond_nconsts'], params['body_nconsts']
  cond_consts = inputs[:n_cond]
  body_consts = inputs[n_cond:n_cond + n_body]
  carry = inputs[n_cond + n_body:]
  # Each carry's status can only go up (`_join`), and at most 3 times (its
  # layers twice, its rest once): this terminates.
  while True:
    (trips,) = _run(_open(params['cond_jaxpr']), cond_consts + carry)
    body = _run(_open(params['body_jaxpr']), body_consts + carry)
    new = [_join(eqn, _join(eqn, c, b), trips)
           for c, b in zip(carry, body, strict=True)]
    if new == carry:
      return carry
    carry = new


def _scan(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """The carries' fixpoint, then the stacked outputs.

  A scan over axis 0 of a stack (`jax.lax.map` over layers) gives its body
  one layer's SLICE at a time; its outputs stacked again index layers on
  axis 0, but a carry computed from a slice reaches the next layers.
  """
  params = eqn.params
  n_consts, n_carry = params['num_consts'], params['num_carry']
  consts = inputs[:n_consts]
  carry = inputs[n_consts:n_consts + n_carry]
  xs = inputs[n_consts + n_carry:]
  over_layers = any(x.layers == 0 for x in xs)
  if over_layers and any(isinstance(s.layers, _Slice) for s in inputs):
    # Two iterations over layers in one another: not followed.
    return _everywhere(eqn, _mixed(eqn, 'over layers inside another'), inputs)
  body_xs = [_Status(_in_body(x.layers), x.rest) for x in xs]
  while True:  # Terminates as in `_while`.
    outputs = _run(_open(params['jaxpr']), consts + carry + body_xs)
    new = [_join(eqn, c, _carried(eqn, out, over_layers))
           for c, out in zip(carry, outputs[:n_carry], strict=True)]
    if new == carry:
      break
    carry = new
  ys = [_Status(_stacked(y.layers, over_layers), y.rest)
        for y in outputs[n_carry:]]
  return carry + ys


def _in_body(layers: _Layers) -> _Layers:
  """What the scan body sees of one element of ``xs``."""
  if layers == 0:
    return _SLICE
  return layers - 1 if isinstance(layers, int) else layers


def _carried(eqn: Any, out: _Status, over_layers: bool) -> _Status:
  if over_layers and isinstance(out.layers, _Slice):
    return _Status(_mixed(eqn, 'carrying a value across layers'), out.rest)
  return out


def _stacked(layers: _Layers, over_layers: bool) -> _Layers:
  """What the scan's ``ys`` are, stacked from the body's outputs."""
  if isinstance(layers, _Slice) and over_layers:
    return 0
  return layers + 1 if isinstance(layers, int) else layers


def _linear_solve(eqn: Any, inputs: list[_Status]) -> list[_Status]:
  """`jax.lax.custom_linear_solve` computes ``solve(*consts, *b)``."""
  lengths = eqn.params['const_lengths']
  start = lengths.matvec + lengths.vecmat
  consts = inputs[start:start + lengths.solve]
  b = inputs[sum(lengths):]
  return _run(_open(eqn.params['jaxprs'].solve), consts + b)


_HIGHER_ORDER: dict[
    str, Callable[[Any, list[_Status]], list[_Status]]] = {
    'cond': _cond,
    'custom_linear_solve': _linear_solve,
    'scan': _scan,
    'while': _while,
    **dict.fromkeys(
        ('checkpoint', 'closed_call', 'core_call', 'custom_jvp_call',
         'custom_vjp_call', 'custom_vjp_call_jaxpr', 'jit', 'named_call',
         'pjit', 'remat', 'shard_map'),
        _call),
    **dict.fromkeys(
        ('device_put', 'layout_constraint', 'mesh_cast', 'optimization_barrier',
         'pcast', 'pvary', 'reshard', 'sharding_constraint'),
        _identity),
}
