"""Measuring optimizer memory without allocating it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def state_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree``.

  Works on real arrays and on the `jax.ShapeDtypeStruct` leaves that
  `jax.eval_shape` returns, so an optimizer state can be measured without
  allocating it. A typed PRNG key counts as its raw key data.

  Args:
    tree: any pytree; leaves without a dtype (None, Python scalars,
      ``optax.MaskedNode``) count as zero.

  Returns:
    The number of bytes.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flora_jax import memory
    >>> params = {'w': jax.ShapeDtypeStruct((256, 512), jnp.float32)}
    >>> memory.state_bytes(jax.eval_shape(optax.adam(1e-3).init, params))
    1048580
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None:
      continue
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
      dtype = leaf.dtype
    total += int(np.prod(leaf.shape, dtype=int)) * np.dtype(dtype).itemsize
  return total
