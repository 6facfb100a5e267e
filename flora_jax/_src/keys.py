"""PRNG keys: what a transform accepts, and the key of each projection.

A transform keeps ONE typed key in its state. The key of a leaf's ``i``-th
projection is ``fold_in(fold_in(key, crc32(path)), i)``: projections are
never stored, the state holds no per-leaf key arrays, and a leaf keeps its
projections when the tree is wrapped by `optax.masked` or `optax.partition`.
"""

from __future__ import annotations

import numbers
import zlib

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
