"""Old spellings that keep working for one release, with a DeprecationWarning.

Version 0.2 gathered the projection settings of every ``scale_by_*``
transform into one `ProjectionRule` argument, ``rule``, and renamed the
projection ``mask`` to ``projection_mask`` (in optax, ``mask`` selects the
leaves that are weight-decayed). The decorators here translate the 0.1
spellings and say what to write instead; they go in 0.3.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from flora_jax._src.projection import ProjectionRule

F = TypeVar('F', bound=Callable[..., Any])

_RULE_FIELDS = ('rank', 'side', 'min_dim', 'max_aspect_ratio', 'mask')


def _name(fn: Callable[..., Any]) -> str:
  return fn.__qualname__.removesuffix('.__init__')


def _warn(message: str) -> None:
  # stacklevel 3: the user's call, above this helper and the wrapper.
  warnings.warn(message, DeprecationWarning, stacklevel=3)


def flat_projection_arguments(fn: F) -> F:
  """Accepts ``rank=, side=, min_dim=, max_aspect_ratio=, mask=`` for ``rule``.

  The flat arguments are folded into ``fn``'s ``rule`` argument: into the
  given `ProjectionRule`, or into ``ProjectionRule(rank)`` for an int.
  """
  signature = inspect.signature(fn)
  default_rule = signature.parameters['rule'].default
  if default_rule is inspect.Parameter.empty:
    default_rule = None

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    flat = {name: kwargs.pop(name) for name in _RULE_FIELDS if name in kwargs}
    if not flat:
      return fn(*args, **kwargs)
    _warn(
        f'{_name(fn)}({", ".join(f"{k}=" for k in flat)}...) is deprecated:'
        f' pass rule=flora_jax.ProjectionRule(...) instead (projection_mask'
        ' for mask).'
    )
    if 'mask' in flat:
      flat['projection_mask'] = flat.pop('mask')
    bound = signature.bind_partial(*args, **kwargs)
    rule = bound.arguments.get('rule', default_rule)
    if isinstance(rule, ProjectionRule):
      rule = dataclasses.replace(rule, **flat)
    else:
      if rule is not None:
        flat.setdefault('rank', rule)
      rule = ProjectionRule(**flat)
    bound.arguments['rule'] = rule
    return fn(*bound.args, **bound.kwargs)

  return wrapper  # type: ignore[return-value]


def renamed_arguments(**renames: str) -> Callable[[F], F]:
  """Accepts each old keyword ``old=`` of ``renames`` as its new name."""

  def decorate(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      for old, new in renames.items():
        if old not in kwargs:
          continue
        if new in kwargs:
          raise TypeError(f'{_name(fn)}: pass {new}= or {old}=, not both.')
        _warn(f'{_name(fn)}({old}=...) is deprecated: use {new}=...')
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

  return decorate
