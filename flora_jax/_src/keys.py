"""PRNG keys: what a transform accepts, and the key of each projection.

A transform keeps ONE typed key in its state. The key of a leaf's ``i``-th
projection is ``fold_in(fold_in(key, crc32(path)), i)``: projections are
never stored, the state holds no per-leaf key arrays, and a leaf keeps its
projections when the tree is wrapped by `optax.masked` or `optax.partition`.
The stacked slices ``s`` of a leaf (e.g. the layers of a scanned kernel
``(L, m, n)``) draw from ``fold_in(that key, s)``, each on its own, so that
one layer's projection can be drawn without the others' (what
`flora_jax.fused_train_step` does inside its backward pass).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

PRNGKeyLike = int | jax.Array | np.ndarray


def as_prng_key(key: PRNGKeyLike, name: str = 'key') -> jax.Array:
  """Converts a seed, a typed key or a raw uint32 key to a typed key.

  Accepts a Python or array integer seed (possibly traced, as under
  `optax.inject_hyperparams`), a scalar typed key from `jax.random.key`, or a
  raw ``uint32[2]`` key from the legacy `jax.random.PRNGKey`.
  """
  if isinstance(key, bool):
    raise TypeError(f'{name} must be an int seed or a PRNG key, got {key!r}.')
  if isinstance(key, numbers.Integral):
    try:
      return jax.random.key(int(key))
    except OverflowError:
      raise ValueError(
          f'{name} must be an int seed in [-2**63, 2**63), got {key}.'
      ) from None
  if isinstance(key, (jax.Array, np.ndarray)):
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(
            f'{name} must be a single (scalar) typed key, got shape'
            f' {key.shape}.'
        )
      return key
    if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
      return jax.random.key(key)
    if key.shape == (2,) and key.dtype == jnp.uint32:
      return jax.random.wrap_key_data(key)
  raise TypeError(
      f'{name} must be an int seed, a typed key from jax.random.key or a raw'
      f' uint32[2] key, got {type(key).__name__}'
      f' {getattr(key, "dtype", "")}{list(getattr(key, "shape", ()))}.'
  )


def path_id(path: str) -> int:
  """A stable 32-bit id of a leaf path (same in every process)."""
  return zlib.crc32(path.encode('utf-8'))


def projection_key(key: jax.Array, path: str, index: jax.Array) -> jax.Array:
  """The key of the ``index``-th projection of the leaf at ``path``.

  Args:
    key: the transform's base key (typed).
    path: the leaf's path, as `jax.tree_util.keystr` writes it.
    index: which projection (Flora: ``count // kappa``).

  Returns:
    A typed key; the same in every process and every run.

  Example:
    >>> import jax
    >>> from flora_jax import projections
    >>> key = jax.random.key(0)
    >>> first = projections.projection_key(key, "['w']", 0)
    >>> second = projections.projection_key(key, "['w']", 1)
    >>> bool((jax.random.key_data(first) != jax.random.key_data(second)).any())
    True
  """
  return jax.random.fold_in(jax.random.fold_in(key, path_id(path)), index)


# Set by `drawing_layer`: the layer whose slices the stacked draws are.
_LAYER: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    'flora_jax_layer', default=None)

STACKED_DRAWS = {'stacked_draws': 'per_slice'}
"""The setting recorded by states whose stacked projections are regenerated.

Before 0.5 a stacked leaf's projections came from one draw of the whole
stack; a state that holds data compressed with them (Flora's momentum and
accumulator, GaLore's ``'random'`` projector) records this setting, so that
such a checkpoint is refused rather than decoded with other projections.
"""


def stacked_draws_setting(plans: Any) -> dict[str, str]:
  """`STACKED_DRAWS` if a projected leaf of ``plans`` is stacked, else {}."""
  stacked = any(plan.projected and plan.batch_shape
                for plan in jax.tree.leaves(plans))
  return dict(STACKED_DRAWS) if stacked else {}


@contextlib.contextmanager
def drawing_layer(index: jax.Array) -> Iterator[None]:
  """Inside the block, stacked leaves are layer ``index`` of their stack.

  Their axis 0 has size 1 and `normal_per_slice` draws the slices of layer
  ``index`` of the full stack.
  """
  token = _LAYER.set(jnp.asarray(index, jnp.int32))
  try:
    yield
  finally:
    _LAYER.reset(token)


def normal_per_slice(
    key: jax.Array,
    batch_shape: tuple[int, ...],
    shape: tuple[int, ...],
    dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
  """Standard normals of shape ``batch_shape + shape``, one draw per slice.

  Slice ``s`` (counted row-major over ``batch_shape``) is
  ``normal(fold_in(key, s), shape)``; without ``batch_shape`` the draw is
  ``normal(key, shape)``. Inside `drawing_layer` the slices are those of
  the given layer (``batch_shape[0]`` must then be 1).
  """
  return per_slice(lambda k: jax.random.normal(k, shape, dtype), key,
                   batch_shape)


def per_slice(
    sample: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    batch_shape: tuple[int, ...],
) -> jax.Array:
  """``sample(fold_in(key, s))`` for every slice ``s`` of ``batch_shape``.

  Stacked along ``batch_shape``; ``sample(key)`` itself without it. The
  slices of `drawing_layer`'s layer inside that context.
  """
  if not batch_shape:
    return sample(key)
  draws = jax.vmap(lambda s: sample(jax.random.fold_in(key, s)))(
      slice_numbers(batch_shape))
  return draws.reshape(batch_shape + draws.shape[1:])


def slice_keys(key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """The key of each stacked slice, shape ``batch_shape``: ``fold_in(key, s)``.

  Those `per_slice` draws from (``s`` counted in the full stack also inside
  `drawing_layer`); ``key`` itself without a batch shape.
  """
  return per_slice(lambda k: k, key, batch_shape)


def slice_numbers(batch_shape: tuple[int, ...]) -> jax.Array:
  """The numbers ``s`` that `per_slice` folds into a stacked leaf's key.

  ``0, 1, ...`` row-major over ``batch_shape``; inside `drawing_layer`,
  those of its layer in the full stack (``batch_shape[0]`` must be 1).
  """
  first = 0
  layer = _LAYER.get()
  if layer is not None:
    if batch_shape[0] != 1:
      raise ValueError(
          f'Drawing one layer of a stack, but the leaf has {batch_shape[0]}'
          ' layers on its axis 0.'
      )
    first = layer * math.prod(batch_shape[1:])
  return first + jnp.arange(math.prod(batch_shape), dtype=jnp.int32)


def resample_phases(path: str, batch_shape: tuple[int, ...],
                    period: Any) -> jax.Array:
  """Each stacked slice's phase in ``[0, period)``, hashed.

  From the leaf's path and the slice's number (`slice_numbers`, so a layer
  drawn on its own inside `drawing_layer` gets its phases in the whole
  stack), nothing else: every part of a tree, and every process, agrees on
  them without storing them. Shape ``batch_shape``, int32.

  Example:
    >>> from flora_jax import projections
    >>> phases = projections.resample_phases("['w']", (4,), 1000)
    >>> phases.shape, bool(((0 <= phases) & (phases < 1000)).all())
    ((4,), True)
  """
  layer = _LAYER.get() if batch_shape else None
  if layer is None and isinstance(period, (int, np.integer)):
    # Constants of the compiled program: no hashing in it.
    h = _slice_hash(path, np.arange(math.prod(batch_shape), dtype=np.uint32))
    return jnp.asarray(
        (h % np.uint32(period)).astype(np.int32).reshape(batch_shape))
  slices = (slice_numbers(batch_shape).astype(jnp.uint32) if batch_shape
            else jnp.zeros([1], jnp.uint32))
  phases = _slice_hash(path, slices) % jnp.asarray(period).astype(jnp.uint32)
  return phases.astype(jnp.int32).reshape(batch_shape)


def _slice_hash(path: str, slices: _Bits) -> _Bits:
  """32 hashed bits per slice number, from it and the leaf's path."""
  return _mix(np.uint32(path_id(path)) ^ _mix(slices + np.uint32(0x9E3779B9)))


# ------------------------------------------------ hashed random numbers
#
# Elementwise functions of (an element's index, a key's words): no counter
# arrays for XLA's CPU backend to hold, and a few integer operations where
# a threefry draw compiles 20 rounds into each fusion that uses it.


# _mix hashes traced arrays and, for constants of the program, numpy ones.
_Bits = TypeVar('_Bits', jax.Array, np.ndarray)


def _mix(h: _Bits) -> _Bits:
  """A bijective mix of 32 bits (MurmurHash3's finalizer)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _hashed_bits(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """32 bits per element of ``shape``, hashed from its index and ``words``.

  The index is the element's within its matrix (the last two axes,
  row-major; it repeats beyond 2^32 elements); ``words[..., i]`` are
  broadcast against ``shape``.
  """
  ndim = len(shape)
  index = jnp.zeros(shape, jnp.uint32)
  if ndim:
    index = jax.lax.broadcasted_iota(jnp.uint32, shape, ndim - 1)
  if ndim > 1:
    index = index + jax.lax.broadcasted_iota(
        jnp.uint32, shape, ndim - 2) * np.uint32(shape[-1])
  h = index
  for i in range(words.shape[-1]):
    h = _mix(h ^ words[..., i])
  return h


def hashed_uniform(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform float32 in [0, 1), one per element of ``shape``.

  24 random bits per element, hashed from its index within its matrix and
  the key words ``words[..., i]`` (broadcast against ``shape``). Unlike
  `jax.random.uniform`, whose counters XLA's CPU backend holds in memory
  (16 bytes per element), it is elementwise and fuses into the code around
  it.
  """
  return (_hashed_bits(words, shape) >> 8).astype(jnp.float32) * np.float32(
      2.0**-24)


def hashed_normal(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Standard normals of a ``(rows, columns)`` shape, hashed from ``key``.

  Box-Muller on the two 16-bit halves of each entry's hashed bits (the
  radius's uniform at the centre of one of 2^16 bins, so ``|z| < 4.9``).
  For the test matrix of the range finder (`projectors.randomized_projector`):
  each refit is its own branch of the compiled update, with its own
  generator, and this one compiles in a fraction of `jax.random.normal`'s
  time (threefry's rounds and an inverse error function). The fits are
  stored, so no state needs these values again to be read.
  """
  words = jax.random.key_data(key).reshape(-1)
  bits = _hashed_bits(words, shape)
  radius = jnp.sqrt(-2 * jnp.log(
      ((bits >> 16).astype(jnp.float32) + np.float32(0.5))
      * np.float32(2.0**-16)))
  angle = (bits & np.uint32(0xFFFF)).astype(jnp.float32) * np.float32(
      2 * math.pi * 2.0**-16)
  return radius * jnp.cos(angle)
