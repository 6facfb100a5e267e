"""Tree helpers shared by the transforms: paths, NNX Variables, tuples.

Flax is optional. A tree can only hold NNX Variables if ``flax.nnx`` has
been imported already, so Variables are recognised through ``sys.modules``
without importing flax here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


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


def path_parts(key_path: Any) -> tuple[str, ...]:
  """A key path as a tuple of strings, one per entry."""
  return tuple(path_string((entry,)) for entry in key_path)


def parameter_matcher(
    param_paths: Any,
) -> Callable[[Any], tuple[str, ...] | None]:
  """Maps a state leaf's key path to the path of its parameter, or None.

  Every state of this library and of optax stores per-parameter trees under
  the parameter's own path, so the longest parameter path that ends a state
  leaf's path is its parameter.

  Args:
    param_paths: the parameters' key paths (`path_parts` tuples).
  """
  longest_first = sorted(set(param_paths), key=len, reverse=True)

  def parameter_of(key_path):
    parts = path_parts(key_path)
    for param_path in longest_first:
      if param_path and parts[-len(param_path):] == param_path:
        return param_path
    return None

  return parameter_of


def bytes_per_parameter(state: Any, params: Any) -> dict[tuple[str, ...], int]:
  """Bytes of ``state`` attributed to each parameter of ``params``.

  Leaves shared by all parameters (counters, keys) are not counted.
  """
  param_paths = [path_parts(p) for p, _ in jax.tree.leaves_with_path(params)]
  parameter_of = parameter_matcher(param_paths)
  totals = dict.fromkeys(param_paths, 0)
  for key_path, leaf in jax.tree.leaves_with_path(state):
    owner = parameter_of(key_path)
    if owner is not None:
      totals[owner] += int(np.prod(np.shape(leaf))) * np.dtype(
          leaf.dtype).itemsize
  return totals
