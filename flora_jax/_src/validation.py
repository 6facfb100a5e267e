"""Argument checks shared by every transform.

Checks run at construction time on concrete values only: under
`optax.inject_hyperparams` numeric arguments arrive as (possibly traced)
arrays, and those must pass through untouched. Every message names the
offending argument (or parameter path) and what was expected.
"""

from __future__ import annotations

import math
import numbers
import typing
from typing import Any, TypeGuard

import jax
from jax import core as jax_core
import numpy as np
import optax

from flora_jax._src import keys

_STATIC_HINT = (
    ' (a static Python value: under optax.inject_hyperparams list it in'
    ' static_args)'
)


def is_concrete(value: Any) -> bool:
  """True when `value` can be inspected in Python (not a tracer)."""
  return not isinstance(value, jax_core.Tracer)


def may_be_nonzero(value: Any) -> TypeGuard[float | jax.Array]:
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


def _is_python_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _concrete_int(value: Any) -> Any:
  """A concrete integer scalar array as a Python int; anything else as is."""
  if (isinstance(value, (jax.Array, np.ndarray)) and is_concrete(value)
      and value.shape == () and np.issubdtype(value.dtype, np.integer)):
    return int(value)
  return value


def check_positive_int(name: str, value: Any) -> int:
  """Returns `value` as an int, or raises naming `name`."""
  value = _concrete_int(value)
  if not _is_python_int(value):
    if isinstance(value, (jax.Array, np.ndarray)) and is_concrete(value):
      raise TypeError(f'{name} must be a positive int, got {value!r}.')
    raise TypeError(
        f'{name} must be a positive int{_STATIC_HINT}, got {value!r}.'
    )
  if value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def check_non_negative_int(name: str, value: Any) -> int:
  """Returns a static non-negative int, or raises naming `name`."""
  value = _concrete_int(value)
  if not _is_python_int(value) or value < 0:
    raise ValueError(
        f'{name} must be a non-negative int{_STATIC_HINT}, got {value!r}.'
    )
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


def check_positive_number(name: str, value: Any, *, optional=False) -> None:
  """Checks a static real number > 0 (or None when ``optional``)."""
  if optional and value is None:
    return
  if not _is_real(value) or not float(value) > 0:
    expected = 'None or a positive number' if optional else 'a positive number'
    raise ValueError(f'{name} must be {expected}, got {value!r}.')


def check_at_least(name: str, value: Any, low: float, *, optional=False):
  """Checks a static real number >= ``low`` (or None when ``optional``)."""
  if optional and value is None:
    return
  if not _is_real(value) or not float(value) >= low:
    expected = f'a number >= {low}'
    if optional:
      expected = 'None or ' + expected
    raise ValueError(f'{name} must be {expected}{_STATIC_HINT}, got {value!r}.')


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
    raise ValueError(
        f'{name} must lie in [{low}, {high}{bracket}, got {value}.'
    )


def check_learning_rate(name: str, value: Any) -> None:
  """Checks a learning rate: a finite number >= 0, a scalar array or a
  schedule (a callable). Traced arrays (`optax.inject_hyperparams`) pass."""
  if callable(value) or not is_concrete(value):
    return
  if _real_scalar(value) is None:
    raise TypeError(
        f'{name} must be a number, a scalar array or a schedule (a callable'
        f' of the step count), got {value!r}.'
    )
  check_finite_at_least(name, value, 0.0)


def check_finite_at_least(name: str, value: Any, low: float) -> None:
  """Checks a concrete real scalar is finite and >= ``low``."""
  if value is None or not is_concrete(value):
    return
  scalar = _real_scalar(value)
  if scalar is None:
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if not (math.isfinite(scalar) and scalar >= low):
    raise ValueError(f'{name} must be finite and >= {low}, got {value!r}.')


def _real_scalar(value: Any) -> float | None:
  """``value`` as a float if it is a real number or real scalar array."""
  if _is_real(value):
    return float(value)
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and (
      np.shape(value) == ()
      and (np.issubdtype(value.dtype, np.floating)
           or np.issubdtype(value.dtype, np.integer))):
    return float(value)
  return None


def check_choice(name: str, value: Any, choices: Any) -> Any:
  """Checks ``value`` against a `typing.Literal` type or a tuple of choices."""
  allowed = typing.get_args(choices) or tuple(choices)
  if value not in allowed:
    raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
  return value


def check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {value!r}.')
  return bool(value)


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
    raise TypeError(
        f'{name} must be a floating dtype, got {dtype!r}.'
    ) from None
  if not jax.numpy.issubdtype(resolved, jax.numpy.floating):
    raise TypeError(f'{name} must be a floating dtype, got {dtype!r}.')
  return resolved


def check_instance(name: str, value: Any, kinds: Any, expected: str) -> None:
  """Raises a TypeError unless ``isinstance(value, kinds)``.

  Args:
    name: the argument's name.
    value: its value.
    kinds: a type or a tuple of types (``type(None)`` for an optional one).
    expected: what to ask for in the message (``'a FiraResidual'``).
  """
  # A bool is an int to Python, but never a valid rank or option here.
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise TypeError(f'{name} must be {expected}, got {value!r}.')


def check_transformation(name: str, value: Any) -> None:
  if not isinstance(value, optax.GradientTransformation):
    raise TypeError(
        f'{name} must be an optax.GradientTransformation (e.g.'
        f' optax.scale_by_adam()), got {type(value).__name__}.'
    )


def check_key(name: str, key: Any) -> None:
  """Construction-time check of a PRNG key argument; tracers pass through."""
  if is_concrete(key):
    keys.as_prng_key(key, name)


def check_real_float_leaf(path: str, leaf: Any, needs: str, fix: str) -> None:
  """Raises a TypeError unless ``leaf`` has a real floating dtype.

  Args:
    path: the leaf's path, for the message.
    leaf: an array or `jax.ShapeDtypeStruct`.
    needs: what needs the floating dtype (``'low-rank projection'``).
    fix: how to leave the leaf out.
  """
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None and isinstance(leaf, float):
    return  # a Python float: an array of the default float dtype
  if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
    raise TypeError(
        f'Parameter {path} has dtype {dtype}, but {needs} needs a real'
        f' floating dtype. {fix}'
    )


def check_same_paths(updates: Any, reference: Any, what: str) -> None:
  """Raises a ValueError naming the leaves where two trees disagree.

  Runs at trace time, so it costs nothing inside a compiled step. An
  `optax.MaskedNode` counts as a leaf on either side.
  """
  got, want = _leaf_paths(updates), _leaf_paths(reference)
  if got != want:
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    raise ValueError(
        f'The updates tree does not match the tree {what} was initialised'
        f' with: missing leaves {missing[:5]}, unexpected leaves {extra[:5]}'
        + ('' if missing or extra else ' (same leaves in another order)')
        + '.'
    )


def _leaf_paths(tree: Any) -> list[str]:
  return [
      jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(
          tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  ]


def check_updates_match_params(updates: Any, params: Any) -> None:
  """Raises a ValueError naming the first leaf whose update and param differ.

  A compressed state cannot tell a change of its compressed dimension
  (``(r, n)`` fits both ``(m, n)`` and ``(m', n)``), so when ``params`` are
  passed they are the reference. Runs at trace time.
  """
  if params is None:
    return
  check_same_paths(updates, params, 'the parameters')
  for (path, update), param in zip(
      jax.tree.leaves_with_path(updates), jax.tree.leaves(params), strict=True
  ):
    if np.shape(update) != np.shape(param):
      raise ValueError(
          f'Update at {jax.tree_util.keystr(path)} has shape'
          f' {np.shape(update)} but the parameter has shape {np.shape(param)}.'
      )


def check_state_shape(plan: Any, state_leaf: Any, what: str) -> None:
  """Raises a ValueError when a per-leaf state does not fit its update.

  Args:
    plan: the leaf's `LeafPlan`.
    state_leaf: the state array kept for that leaf.
    what: the state with its article, for the message (``'a momentum'``).
  """
  if np.shape(state_leaf) != plan.low_rank_shape:
    raise ValueError(
        f'Update at {plan.path} has shape {plan.shape}, which needs {what}'
        f' of shape {plan.low_rank_shape}, but the state holds'
        f' {np.shape(state_leaf)}: the updates do not match the parameters the'
        ' optimizer was initialised with.'
    )
