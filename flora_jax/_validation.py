"""Argument checks shared by every transform.

Checks run at construction time on concrete values only: under
`optax.inject_hyperparams` numeric arguments arrive as (possibly traced)
arrays, and those must pass through untouched.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
  """True when `value` can be inspected in Python (not a tracer)."""
  return not isinstance(value, jax.core.Tracer)


def may_be_nonzero(value: Any) -> bool:
  """False for None or a Python zero; True otherwise, arrays included.

  Decides whether an optional transform (weight decay, say) is built. Under
  `optax.inject_hyperparams` the value is a concrete array in ``init`` and a
  tracer in ``update``, so only Python values may drop the transform: the
  chain must have the same structure in both.
  """
  if value is None:
    return False
  if isinstance(value, numbers.Real):
    return value != 0
  return True


def check_positive_int(name: str, value: Any) -> int:
  """Returns `value` as an int, or raises naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    if isinstance(value, (jax.Array, np.ndarray)) and is_concrete(value):
      if value.shape == () and np.issubdtype(value.dtype, np.integer):
        value = int(value)
      else:
        raise TypeError(f'{name} must be a positive int, got {value!r}.')
    else:
      raise TypeError(
          f'{name} must be a positive int (a static Python value; pass it in'
          f' `static_args` under optax.inject_hyperparams), got {value!r}.'
      )
  if value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def check_positive_or_traced(name: str, value: Any) -> Any:
  """Checks an int hyper-parameter that may also be a traced array."""
  if isinstance(value, (jax.Array, np.ndarray)) and not is_concrete(value):
    return value
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise TypeError(f'{name} must be a positive int, got {value!r}.')
    if int(value) <= 0:
      raise ValueError(f'{name} must be a positive int, got {int(value)}.')
    return value
  return check_positive_int(name, value)


def check_in_range(
    name: str, value: Any, low: float, high: float, *, high_inclusive=False
) -> None:
  """Checks low <= value < high (or <= high) for concrete scalars."""
  if value is None or callable(value) or not is_concrete(value):
    return
  try:
    scalar = float(value)
  except (TypeError, ValueError):
    raise TypeError(f'{name} must be a real scalar, got {value!r}.') from None
  upper_ok = scalar <= high if high_inclusive else scalar < high
  if not (low <= scalar and upper_ok):
    bracket = ']' if high_inclusive else ')'
    raise ValueError(f'{name} must lie in [{low}, {high}{bracket}, got {value}.')


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')
  return value


def check_float_dtype(name: str, dtype: Any) -> np.dtype:
  """Checks that `dtype` is a real floating dtype (None: float32)."""
  if dtype is None:
    return np.dtype(np.float32)
  if isinstance(dtype, (jax.Array, np.ndarray)):
    raise TypeError(
        f'{name} must be a dtype, got an array (under'
        ' optax.inject_hyperparams list it in static_args).'
    )
  try:
    resolved = np.dtype(dtype)
  except TypeError:
    raise TypeError(f'{name} must be a floating dtype, got {dtype!r}.') from None
  if not jax.numpy.issubdtype(resolved, jax.numpy.floating):
    raise TypeError(f'{name} must be a floating dtype, got {dtype!r}.')
  return resolved


def check_same_paths(updates: Any, reference: Any, what: str) -> None:
  """Raises a ValueError naming the leaves where two trees disagree.

  Runs at trace time, so it costs nothing inside a compiled step.
  """
  got = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(updates)]
  want = [
      jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(reference)
  ]
  if got != want:
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    raise ValueError(
        f'The updates tree does not match the tree {what} was initialised'
        f' with: missing leaves {missing[:5]}, unexpected leaves {extra[:5]}'
        + ('' if missing or extra else ' (same leaves in another order)')
        + '.'
    )


def check_updates_match_params(updates: Any, params: Any) -> None:
  """Raises a ValueError naming the first leaf whose update and parameter differ.

  A compressed state cannot tell a change of its compressed dimension
  (``(r, n)`` fits both ``(m, n)`` and ``(m', n)``), so when ``params`` are
  passed they are the reference. Runs at trace time.
  """
  if params is None:
    return
  check_same_paths(updates, params, 'the parameters')
  for (path, update), param in zip(
      jax.tree.leaves_with_path(updates), jax.tree.leaves(params)
  ):
    if np.shape(update) != np.shape(param):
      raise ValueError(
          f'Update at {jax.tree_util.keystr(path)} has shape'
          f' {np.shape(update)} but the parameter has shape {np.shape(param)}.'
      )
