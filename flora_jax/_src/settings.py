"""The structural settings of a state, kept in the state's own structure.

A checkpoint restored into a transform with another ``kappa``, refresh gap
or projector type, or with parameters of other shapes, would otherwise load
without complaint and continue as a different algorithm. Every state of
this library therefore has a ``settings`` field: a dict with ONE key that
spells out those settings (plus a digest of the projection plans, which
fixes the parameters' paths and shapes and how each leaf is projected), and
a placeholder int8 zero as its value.

Keeping the description in a key rather than in an array value makes it
static: `update` compares it while tracing (no cost at run time, a plain
`ValueError`), and orbax, which stores the tree's keys, refuses to restore
into a differently configured target ("tree structures do not match").
`adopt_settings` changes settings deliberately.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Settings whose value is an array (an `optax.inject_hyperparams`
# hyper-parameter) live in that wrapper's state, not here.
_DYNAMIC = 'dynamic'
_PLANS = 'plans'


def record(plans: Any, **settings: Any) -> dict[str, jax.Array]:
  """The ``settings`` field of a new state."""
  return {describe(plans, **settings): jnp.zeros([], jnp.int8)}


def describe(plans: Any, **settings: Any) -> str:
  """``'name=value ... plans=<digest>'``, e.g. ``'kappa=1000 plans=1a2b3c4d'``.
  """
  parts = [f'{name}={_static(value)}' for name, value in settings.items()]
  return ' '.join([*parts, f'{_PLANS}={_digest(plans)}'])


def check(recorded: Any, plans: Any, **settings: Any) -> None:
  """Raises if the state's settings are not those of this transform."""
  expected = describe(plans, **settings)
  found = list(recorded) if isinstance(recorded, dict) else recorded
  if found == [expected]:
    return
  if not (isinstance(found, list) and len(found) == 1
          and isinstance(found[0], str)):
    raise ValueError(
        f'The state has no settings of this transform (found {found!r}):'
        ' it was not made by its init.'
    )
  raise ValueError(
      'The optimizer state was made for other settings than this'
      f' transform\'s: {_difference(found[0], expected)}. Continuing would'
      ' silently run another algorithm (e.g. after restoring a checkpoint'
      ' into a differently configured optimizer). Restore with the settings'
      ' it was saved with; to change them deliberately, pass the restored'
      ' state through flora_jax.adopt_settings(state, new_tx.init(params)).'
  )


def _difference(found: str, expected: str) -> str:
  old, new = _parse(found), _parse(expected)
  changes = [
      f'{name}={old.get(name, "?")} in the state, {new.get(name, "?")} here'
      for name in dict.fromkeys([*old, *new])
      if name != _PLANS and old.get(name) != new.get(name)
  ]
  if old.get(_PLANS) != new.get(_PLANS):
    changes.append(
        'the parameters differ from those at init (their paths or shapes,'
        ' or which leaves are projected, on which side, at which rank)'
    )
  return '; '.join(changes)


def _parse(description: str) -> dict[str, str]:
  return dict(part.split('=', 1) for part in description.split(' ') if part)


def _static(value: Any) -> str:
  if isinstance(value, (jax.Array, np.ndarray)):
    return _DYNAMIC
  return str(value).replace(' ', '')


def _digest(plans: Any) -> str:
  text = ';'.join(
      f'{plan.path}:{plan.shape}:{plan.side}:{plan.rank}'
      # Only where not the default: the digests of earlier versions hold.
      + (f':{plan.axes.permutation}:{len(plan.axes.rows)}' if plan.axes
         else '')
      for plan in jax.tree.leaves(plans)
  )
  return f'{zlib.crc32(text.encode("utf-8")):08x}'


def is_settings(node: Any) -> bool:
  """Whether ``node`` is a state's ``settings`` field (see `record`)."""
  return (isinstance(node, dict) and len(node) == 1
          and isinstance(next(iter(node)), str)
          and f' {_PLANS}=' in f' {next(iter(node))}')


def adopt_settings(state: Any, like: Any) -> Any:
  """``state``'s arrays under the settings of ``like``: a deliberate change.

  Every state of this library records the settings it was made with, and
  `update` refuses a state made with others (see the module notes). To
  change, say, ``kappa`` of a run in progress, restore the checkpoint with
  the settings it was saved with, then carry its arrays over::

    state = flora_jax.adopt_settings(restored, new_tx.init(params))

  Only the settings change: the momentum, projectors and counters continue
  as they are, which is meaningful only if the new settings can continue
  from them (a new ``kappa`` can; a new rank cannot, and is refused here
  because the shapes differ).

  Args:
    state: a state, e.g. restored from a checkpoint.
    like: a state of the reconfigured optimizer (or its `jax.eval_shape`).

  Returns:
    ``state`` with the ``settings`` fields of ``like``.

  Raises:
    ValueError: the two states differ in anything but their settings.

  Example:
    >>> import jax.numpy as jnp, flora_jax
    >>> params = {'w': jnp.ones((16, 32))}
    >>> old = flora_jax.flora(1e-3, rank=4, kappa=10, min_dim=8)
    >>> new = flora_jax.flora(1e-3, rank=4, kappa=50, min_dim=8)
    >>> state = flora_jax.adopt_settings(old.init(params), new.init(params))
    >>> _ = new.update(params, state, params)  # accepted
  """
  state_leaves, state_def = jax.tree.flatten_with_path(
      state, is_leaf=is_settings
  )
  like_leaves, like_def = jax.tree.flatten(like, is_leaf=is_settings)
  if state_def != like_def:
    raise ValueError(
        'adopt_settings: the states differ in more than their settings:'
        f' {state_def} vs {like_def}.'
    )
  adopted = []
  for (path, leaf), template in zip(state_leaves, like_leaves, strict=True):
    if is_settings(template):
      adopted.append(template)
      continue
    if np.shape(leaf) != np.shape(template):
      raise ValueError(
          f'adopt_settings: {jax.tree_util.keystr(path)} has shape'
          f' {np.shape(leaf)} in the state, {np.shape(template)} in the'
          ' new one: those settings cannot continue from this state.'
      )
    adopted.append(leaf)
  return jax.tree.unflatten(like_def, adopted)
