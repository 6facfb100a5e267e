"""Measuring optimizer memory without allocating it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_jax._src import projection
from flora_jax._src import tree_util
from flora_jax._src.projection import LeafPlan


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


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  """One parameter leaf in a `MemoryReport`.

  Attributes:
    path: the leaf's key path, as `jax.tree_util.keystr` writes it.
    shape: its shape.
    dtype: its dtype.
    plans: ``(transform, LeafPlan)`` for every projecting transform that
      saw the leaf, outermost first; empty when none did.
    state_bytes: the optimizer-state bytes kept for this leaf.
    adamw_bytes: what `optax.adamw` keeps for it (two moments).
  """

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  plans: tuple[tuple[str, LeafPlan], ...]
  state_bytes: int
  adamw_bytes: int

  @property
  def size(self) -> int:
    """The number of values in the leaf."""
    return math.prod(self.shape)

  @property
  def projected(self) -> bool:
    """Whether any projecting transform compresses this leaf."""
    return any(plan.projected for _, plan in self.plans)

  @property
  def plan(self) -> LeafPlan | None:
    """The first plan that projects the leaf, else the first plan."""
    projected = [plan for _, plan in self.plans if plan.projected]
    return (projected or [plan for _, plan in self.plans] or [None])[0]

  @property
  def reason(self) -> str | None:
    """Why the leaf is kept full-size; None when it is projected."""
    if self.projected:
      return None
    if not jnp.issubdtype(self.dtype, jnp.floating):
      return f'not a float: {self.dtype}'
    if not self.plans:
      return 'not under a projecting transform'
    reasons = dict.fromkeys(plan.reason or '?' for _, plan in self.plans)
    return '; '.join(reasons)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Which leaves a transform compresses, why not the others, and its bytes.

  ``print(report)`` shows the table; the attributes hold the data.

  Attributes:
    transform_names: the projecting transforms found inside the optimizer.
    leaves: one `LeafMemory` per parameter leaf, in tree order.
    shared_bytes: state that belongs to no single parameter (step
      counters, PRNG keys, recorded settings).
    adamw_shared_bytes: the same for `optax.adamw` (its step counter).
  """

  transform_names: tuple[str, ...]
  leaves: tuple[LeafMemory, ...]
  shared_bytes: int
  adamw_shared_bytes: int

  @property
  def state_bytes(self) -> int:
    """All optimizer-state bytes: equal to `state_bytes` of the state."""
    return sum(leaf.state_bytes for leaf in self.leaves) + self.shared_bytes

  @property
  def adamw_state_bytes(self) -> int:
    """All bytes of `optax.adamw`'s state for the same parameters."""
    return (sum(leaf.adamw_bytes for leaf in self.leaves)
            + self.adamw_shared_bytes)

  @property
  def projected_fraction(self) -> float:
    """The share of parameter values in projected leaves."""
    total = sum(leaf.size for leaf in self.leaves)
    projected = sum(leaf.size for leaf in self.leaves if leaf.projected)
    return projected / total if total else 0.0

  def table(self) -> str:
    """The report as a fixed-width text table."""
    header = ('path', 'shape', 'dtype', 'projected', 'state', 'adamw',
              'not projected because')
    rows: list[tuple[str, ...]] = [header]
    for leaf in self.leaves:
      plan = leaf.plan
      how = (f'{plan.side} r={plan.rank}' if leaf.projected and plan
             else 'no')
      if leaf.projected and plan and plan.axes is not None:
        how += f' of {plan.matrix_shape}'  # its matrix view
      rows.append((leaf.path, str(leaf.shape), str(leaf.dtype), how,
                   _bytes(leaf.state_bytes), _bytes(leaf.adamw_bytes),
                   leaf.reason or ''))
    rows.append(('(counters, keys, settings)', '', '', '',
                 _bytes(self.shared_bytes), _bytes(self.adamw_shared_bytes),
                 ''))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row):
      return '  '.join(cell.ljust(width)
                       for cell, width in zip(row, widths, strict=True))

    share = (100 * self.state_bytes / self.adamw_state_bytes
             if self.adamw_state_bytes else float('nan'))
    names = ', '.join(self.transform_names) or 'no projecting transform'
    summary = (
        f'{names}: {100 * self.projected_fraction:.1f}% of the parameter'
        f' values projected; state {_bytes(self.state_bytes)}'
        f' ({self.state_bytes:,} bytes), {share:.1f}% of optax.adamw\'s'
        f' {_bytes(self.adamw_state_bytes)}.'
    )
    body = [line(header), line(tuple('-' * w for w in widths))]
    return '\n'.join(body + [line(row) for row in rows[1:]] + [summary])

  def __str__(self) -> str:
    return self.table()


def memory_report(tx: optax.GradientTransformation,
                  params: Any) -> MemoryReport:
  """Per parameter leaf: is it projected, and if not why; its state bytes.

  Runs ``tx.init`` under `jax.eval_shape`, so nothing is allocated and a
  7B model's report takes seconds. Every projecting transform of this
  library inside ``tx`` (at any depth of `optax.chain`, `optax.masked`,
  `optax.partition`, `FloraMultiSteps`...) tells it how it planned each
  leaf: projected on which side at which rank, or the reason it was kept
  full-size (not a matrix, too small for ``min_dim``, too elongated, masked
  out, rank not below the dimension, no saving, not a float). The state of
  each leaf is measured from ``tx.init``'s actual output, next to what
  `optax.adamw` would keep.

  Args:
    tx: any optax transformation.
    params: the parameters, or their `jax.eval_shape` (NNX Variables are
      unwrapped).

  Returns:
    A `MemoryReport`; ``print`` it for the table. Its ``state_bytes``
    equals ``state_bytes(jax.eval_shape(tx.init, params))``.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> params = {'w': jax.ShapeDtypeStruct((256, 512), jnp.float32),
    ...           'b': jax.ShapeDtypeStruct((512,), jnp.float32)}
    >>> report = flora_jax.memory_report(flora_jax.flora(1e-3, rank=8),
    ...                                  params)
    >>> [leaf.reason for leaf in report.leaves]
    ['not a matrix: ndim 1', None]
    >>> report.leaves[1].plan.side, report.leaves[1].plan.rank
    ('left', 8)
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
      tree_util.unwrap_variables(params),
  )
  state, records = projection.abstract_init_with_plans(tx.init, abstract)
  adamw_state = jax.eval_shape(optax.adamw(1e-3).init, abstract)
  ours = tree_util.bytes_per_parameter(state, abstract)
  adamw = tree_util.bytes_per_parameter(adamw_state, abstract)
  plans_by_path: dict[str, list[tuple[str, LeafPlan]]] = {}
  for name, plans in records:
    for plan in jax.tree.leaves(plans):
      plans_by_path.setdefault(plan.path, []).append((name, plan))
  leaves = []
  for key_path, leaf in jax.tree.leaves_with_path(abstract):
    path = jax.tree_util.keystr(key_path)
    parts = tree_util.path_parts(key_path)
    leaves.append(LeafMemory(
        path=path, shape=tuple(leaf.shape), dtype=np.dtype(leaf.dtype),
        plans=tuple(plans_by_path.get(path, ())),
        state_bytes=ours[parts], adamw_bytes=adamw[parts],
    ))
  return MemoryReport(
      transform_names=tuple(dict.fromkeys(name for name, _ in records)),
      leaves=tuple(leaves),
      shared_bytes=state_bytes(state) - sum(ours.values()),
      adamw_shared_bytes=state_bytes(adamw_state) - sum(adamw.values()),
  )


def _bytes(count: int) -> str:
  """``count`` bytes in the largest binary unit that keeps it >= 1."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if count >= size:
      return f'{count / size:.2f} {unit}'
  return f'{count} B'
