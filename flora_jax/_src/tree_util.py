"""Tree helpers shared by the transforms: paths, NNX Variables, tuples.

Flax is optional. A tree can only hold NNX Variables if ``flax.nnx`` has
been imported already, so Variables are recognised through ``sys.modules``
without importing flax here.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import optax


def is_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX Variable (False when flax is not in use)."""
  nnx = sys.modules.get('flax.nnx')
  variable = getattr(nnx, 'Variable', None)
  return variable is not None and isinstance(x, variable)


def unwrap_variables(tree: Any) -> Any:
  """Replaces Flax NNX Variables by their arrays.

  `nnx.Optimizer` passes Variables to ``init`` but arrays to ``update``;
  unwrapping keeps leaf paths (and so masks and per-leaf keys) identical in
  both, and keeps Variable metadata (e.g. sharding names) off states whose
  shapes differ from the parameter's.
  """
  return jax.tree.map(
      lambda x: x.get_value() if is_variable(x) else x, tree,
      is_leaf=is_variable,
  )


def init_on_arrays(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """``tx`` with NNX Variables unwrapped before its ``init``.

  optax initialisers build states with ``jax.tree.map`` over the parameters,
  which keeps each Variable, sharding metadata included, around the state
  leaf made from it. That suits a moment of the parameter's shape but not a
  factored statistic of another shape (`optax.scale_by_factored_rms`):
  `nnx.Optimizer` then reshards its ``(m,)`` vector with the parameter's 2-D
  spec and fails. The state's shardings come from `state_shardings` instead.
  """
  return optax.GradientTransformation(
      lambda params: tx.init(unwrap_variables(params)), tx.update
  )


def path_string(key_path: Any) -> str:
  """Joins a key path with '/': ``('layers', 0, 'w')`` -> ``'layers/0/w'``.

  Accepts a `jax.tree_util` key path (``DictKey``, ``GetAttrKey``,
  ``SequenceKey`` entries) or an NNX module path of plain strings and ints.
  """
  parts = []
  for entry in key_path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def unzip_leaves(like: Any, tree_of_tuples: Any, n: int) -> tuple[Any, ...]:
  """Splits a tree of n-tuples into n trees with the structure of ``like``."""
  return tuple(
      jax.tree.map(lambda _, t, i=i: t[i], like, tree_of_tuples)
      for i in range(n)
  )
