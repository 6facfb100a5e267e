"""Orbax checkpoints that are verified when they are restored.

Orbax restores whatever bytes are on disk: a bit flipped inside a stored
chunk comes back, without an error, as a wrong value in one leaf, and a run
that promises an exact resume would silently continue from garbage. (Orbax,
0.11.30 to 0.12.8 at least, has no option to verify the data: its zarr3
format covers only the shard index with a crc32c.) So `save`
stores a sha256 of every leaf beside the state, as a JSON item of an orbax
``Composite``, and `restore` recomputes them from what it read and raises a
`CheckpointError` that names the step, the directory and the first leaf
that differs::

  with ocp.CheckpointManager(directory) as manager:
    checkpoints.save(manager, step, state)
    ...
    state = checkpoints.restore(manager, step, abstract_state)

A digest covers a leaf's dtype, shape and C-order bytes: the whole array,
not its shards, so a checkpoint restored onto another mesh still verifies.
It is computed from the process's addressable data, which must therefore
be the whole array (a single-process run, any number of local devices).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = 'state'
CHECKSUMS = 'checksums'


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored as it was saved."""


def _host_array(path: str, leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    if not leaf.is_fully_addressable:
      # Another process holds part of it, and the JSON item is written by
      # the primary process alone: a digest here could not cover it.
      raise ValueError(
          f'Cannot checksum the leaf {path}: it is not fully addressable'
          ' from this process. Checkpoint verification needs every shard'
          ' in one process (a single-process run).'
      )
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
  return np.ascontiguousarray(np.asarray(leaf))


def leaf_checksums(tree: Any) -> dict[str, str]:
  """``{leaf path: sha256 of its dtype, shape and bytes}``, in leaf order."""
  digests = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = jax.tree_util.keystr(key_path)
    array = _host_array(path, leaf)
    digest = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
    digests[path] = digest.hexdigest()
  return digests


def save(manager: ocp.CheckpointManager, step: int, tree: Any) -> bool:
  """Saves ``tree`` at ``step`` with its `leaf_checksums`.

  Returns:
    Whether the manager saved (its options may skip the step).
  """
  return manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(tree),
      CHECKSUMS: ocp.args.JsonSave({'sha256': leaf_checksums(tree)}),
  }))


def _where(manager: ocp.CheckpointManager, step: int) -> str:
  return f'checkpoint of step {step} in {manager.directory}'


def _advice(manager: ocp.CheckpointManager, step: int) -> str:
  return (f' Delete {os.path.join(manager.directory, str(step))} to resume'
          ' from an earlier checkpoint (if any), or start afresh in'
          ' another directory.')


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The state saved by `save` at ``step``, verified against its checksums.

  Args:
    manager: the manager `save` wrote with.
    step: the step to restore.
    target: the tree to restore into: arrays or `jax.ShapeDtypeStruct`
      leaves, with the shardings the restored arrays get.

  Raises:
    CheckpointError: the checkpoint has no checksums, cannot be read into
      ``target``, or a leaf differs from what was saved.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        CHECKSUMS: ocp.args.JsonRestore(),
    }))
  except Exception as error:  # tensorstore raises bare `Exception`s
    raise CheckpointError(_unreadable(manager, step, error)) from error
  verify(restored[STATE], restored[CHECKSUMS]['sha256'],
         where=_where(manager, step), advice=_advice(manager, step))
  return restored[STATE]


def _unreadable(manager: ocp.CheckpointManager, step: int,
                error: Exception) -> str:
  where, advice = _where(manager, step), _advice(manager, step)
  step_dir = os.path.join(manager.directory, str(step))
  if os.path.isdir(step_dir) and CHECKSUMS not in os.listdir(step_dir):
    return (f'The {where} has no {CHECKSUMS!r} item, so what it holds'
            ' cannot be verified: it was not written by'
            ' flora_jax_examples.checkpoints.save.' + advice)
  summary = (str(error).splitlines() or [''])[0]
  return (f'Cannot read the {where} into the given structure'
          f' ({type(error).__name__}: {summary}): its files are damaged, or'
          ' it holds a state of another shape.' + advice)


def verify(tree: Any, expected: dict[str, str], where: str = 'tree',
           advice: str = '') -> None:
  """Raises `CheckpointError` unless ``tree`` has the ``expected`` checksums.

  Args:
    tree: the restored state.
    expected: its `leaf_checksums` when it was saved.
    where: what ``tree`` is, for the message.
    advice: what to do about a mismatch, appended to the message.
  """
  actual = leaf_checksums(tree)
  if set(actual) != set(expected):
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    raise CheckpointError(
        f'The leaves of the {where} are not those whose checksums were saved:'
        f' missing {missing[:3]}, unexpected {extra[:3]}.' + advice
    )
  for path, digest in actual.items():
    if digest != expected[path]:
      raise CheckpointError(
          f'The {where} is corrupt: leaf {path} has sha256'
          f' {digest}, but {expected[path]} was saved.' + advice
      )
