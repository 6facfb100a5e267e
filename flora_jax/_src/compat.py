"""Workarounds for the runtime this library is tested on, in one place."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax


# XLA_FLAGS entry that makes conditionals with collectives safe on simulated
# CPU devices (see `cond`).
SEQUENTIAL_CPU_SCHEDULER = (
    '--xla_cpu_enable_concurrency_optimized_scheduler=false'
)


def safe_increment(count: jax.Array) -> jax.Array:
  """`optax.safe_increment`, typed as the array it returns."""
  return jnp.asarray(optax.safe_increment(count))


def after(value: jax.Array, anchor: jax.Array) -> jax.Array:
  """``value`` unchanged, but available only once ``anchor`` is computed.

  XLA starts an operation as soon as its inputs exist. The up-projection
  of a leaf's stored momentum depends only on the optimizer state, so the
  compiler may compute that of every leaf at the start of the step and
  hold them all through the backward pass (with the projectors: at
  LLaMA-60M ~110 MiB, 12%, more temporary memory than AdamW's step).
  Deriving it from a value that depends on the leaf's update makes it wait
  for the update and die with it. `jax.lax.optimization_barrier` does not do
  this: the CPU compiler removes it before scheduling. The zero added here
  comes from one element of ``anchor`` (``x * 0`` is not folded for floats,
  and XLA converts NaN to 0), so it is 0 for every value, infinities and
  NaN included.

  Under Explicit sharding no element of a sharded array can be taken
  without a collective, and ``value`` is returned as it is: there the
  ordering is left to the compiler.
  """
  if not _ORDERING_HINTS.get() or any(
      axis is not None for axis in explicit_spec(anchor)):
    return value
  zero = (anchor[(0,) * anchor.ndim] * 0).astype(jnp.int32)
  return value + zero.astype(value.dtype)


# Off inside `without_ordering_hints`.
_ORDERING_HINTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    'flora_jax_ordering_hints', default=True)


@contextlib.contextmanager
def without_ordering_hints() -> Iterator[None]:
  """Traces inside the block get no `after` hints.

  For analyses of a traced update (`flora_jax.fused_train_step` checks
  which layers each output depends on): the hint reads one element of the
  anchor, a dependency in the program's data flow although not in its
  values.
  """
  token = _ORDERING_HINTS.set(False)
  try:
    yield
  finally:
    _ORDERING_HINTS.reset(token)


def explicit_spec(x: jax.Array) -> tuple[Any, ...]:
  """The mesh axes of each axis of ``x`` in its type (Explicit sharding).

  One entry per axis; None for an axis that is not sharded, and for every
  axis outside Explicit sharding (Auto axes are not part of the type).
  """
  spec = tuple(getattr(jax.typeof(x).sharding, 'spec', ()) or ())
  return spec + (None,) * (x.ndim - len(spec))


def laid_out_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` in the dtype, and the Explicit sharding, of ``like``."""
  x = x.astype(like.dtype)
  spec = explicit_spec(like)
  if all(axis is None for axis in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


def several_cpu_devices() -> bool:
  """Whether this process simulates a mesh on CPU devices."""
  return len(jax.devices('cpu')) > 1


def cond(
    pred: jax.Array,
    true_fn: Callable[..., Any],
    false_fn: Callable[..., Any],
    *operands: Any,
) -> Any:
  """`jax.lax.cond`, made safe where several CPU devices share this process.

  There (``--xla_force_host_platform_device_count``, how multi-device code
  is tested without accelerators) XLA's CPU scheduler in jaxlib 0.10 may
  order a conditional that contains collectives differently from the
  step's other collectives on different devices, and the step deadlocks.
  Unless XLA_FLAGS holds ``SEQUENTIAL_CPU_SCHEDULER``, which prevents that,
  both branches are then computed and the result selected, so that every
  collective is unconditional (correct, but a GaLore refresh then costs an
  SVD at every step). Accelerators and a one-device CPU process always get
  the real branch.
  """

  def branch():
    return jax.lax.cond(pred, true_fn, false_fn, *operands)

  def select():
    taken, not_taken = true_fn(*operands), false_fn(*operands)
    return jax.tree.map(
        lambda a, b: jax.lax.select(pred, a, b), taken, not_taken
    )

  if (not several_cpu_devices()
      or SEQUENTIAL_CPU_SCHEDULER in os.environ.get('XLA_FLAGS', '')):
    return branch()
  return jax.lax.platform_dependent(cpu=select, default=branch)


def each_matrix(
    fn: Callable[..., jax.Array], *arrays: jax.Array
) -> jax.Array:
  """``fn`` applied to every stacked matrix of ``arrays`` (leading axes alike).

  For the decompositions (SVD, QR) of a projector fit. The slices run one
  after another (`jax.lax.map`): the fit of a stacked ``(L, m, n)`` leaf
  then holds one slice's intermediates at a time, not the stack's (at
  LLaMA-7B a 5.4 GiB stack; GaLore's float32 step kept 9 GiB more
  temporaries than AdamW's with a batched SVD, none with this).

  Where a leading axis is sharded (Explicit sharding) the stack runs
  batched, so that each device keeps its own slices; except where several
  CPU devices share this process: jaxlib's batched LAPACK kernels (0.10)
  fan a batch out over the intra-op thread pool and block waiting for it,
  so when every device enters one at once the pool starves and the step
  deadlocks.
  """
  batch_shape = arrays[0].shape[:-2]
  if not batch_shape:
    return fn(*arrays)

  def one_at_a_time(*xs):
    flat = [x.reshape((-1,) + x.shape[len(batch_shape):]) for x in xs]
    out = jax.lax.map(lambda slices: fn(*slices), flat)
    return out.reshape(batch_shape + out.shape[1:])

  sharded = any(axis is not None for array in arrays
                for axis in explicit_spec(array)[:len(batch_shape)])
  if not sharded:
    return one_at_a_time(*arrays)
  if not several_cpu_devices():
    return fn(*arrays)
  return jax.lax.platform_dependent(*arrays, cpu=one_at_a_time, default=fn)


def each_slice_where(
    take: jax.Array, fn: Callable[..., jax.Array], *arrays: jax.Array
) -> jax.Array:
  """``fn`` on each stacked slice where ``take``; ``arrays[-1]`` elsewhere.

  ``take`` has the stack's batch shape, the leading axes of every array.
  One branch per slice (`jax.lax.map` of `cond`), so a step that changes
  one slice of an ``(L, ...)`` stack computes ``fn`` once, not ``L`` times
  (where `cond` selects instead of branching, on every slice).
  """
  def keep(*slices):
    return slices[-1]

  batch = take.shape
  flat = [x.reshape((-1,) + x.shape[len(batch):]) for x in arrays]
  out = jax.lax.map(lambda xs: cond(xs[0], fn, keep, *xs[1:]),
                    (take.reshape(-1), *flat))
  return out.reshape(arrays[-1].shape)


def read_layer(stack: jax.Array, index: jax.Array) -> jax.Array:
  """Slice ``index`` of a stacked leaf, read inside a loop over its layers.

  Through an optimization barrier tied to the index. XLA's CPU backend has
  no bfloat16 slicing: it widens the whole stack to float32 to read a
  slice, then hoists that widening out of the loop as loop-invariant, which
  holds a float32 copy of the stack for the whole loop (at LLaMA-7B, 25 GiB
  for 12.5 GiB of bfloat16 weights). Tied to the index, the widening stays
  in the loop, fused into the read of one slice. Elsewhere the barrier
  costs nothing.
  """
  stack, index = jax.lax.optimization_barrier((stack, index))
  return jax.lax.dynamic_index_in_dim(stack, index, 0, keepdims=False)


def write_layer(stack: jax.Array, value: jax.Array,
                index: jax.Array) -> jax.Array:
  """``stack`` with slice ``index`` replaced by ``value``, in place.

  A dynamic-update-slice; but XLA's CPU backend widens a bfloat16 or
  float16 one to float32 and writes the whole stack anew, a copy per
  layer. There a select between the stack and the broadcast slice, which
  is elementwise and so done in place, takes its place: no memory, but a
  pass over the whole stack per layer written (CPU only; accelerators
  update the slice).
  """
  value = value.astype(stack.dtype)

  def update_slice():
    return jax.lax.dynamic_update_index_in_dim(stack, value, index, 0)

  def select():
    shape = (stack.shape[0],) + (1,) * (stack.ndim - 1)
    at = jax.lax.broadcasted_iota(jnp.int32, shape, 0) == index
    return jnp.where(at, value[None], stack)

  narrow_float = (jnp.issubdtype(stack.dtype, jnp.floating)
                  and jnp.finfo(stack.dtype).bits <= 16)
  if not narrow_float:
    return update_slice()
  return jax.lax.platform_dependent(cpu=select, default=update_slice)
