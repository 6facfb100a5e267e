"""Which leaves are projected, on which side and at which rank.

Everything that decides *whether* and *how* a matrix-shaped leaf is
compressed lives here, once, for every projecting transform: arrays with
``ndim >= 2`` whose last two axes are large enough and not too elongated,
optionally restricted by a projection mask; leading axes are independent
stacked matrices (e.g. a scan-over-layers kernel of shape ``(L, m, n)``),
each slice with its own projector.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import numpy as np

from flora_jax._src import tree_util
from flora_jax._src import validation

Side = Literal['auto', 'larger', 'left', 'right']

# A mask in optax's convention: a pytree (or pytree prefix) of bools, or a
# callable mapping the parameter tree to one.
MaskOrFn = Any | Callable[[Any], Any] | None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is treated; static, derived from its path and shape.

  Not a pytree node: a tree of plans has the same structure as the tree it
  describes, so ``jax.tree.map(fn, plans, updates)`` pairs each leaf with its
  plan.

  Attributes:
    path: the leaf's key path, as `jax.tree_util.keystr` writes it.
    shape: the leaf's shape.
    side: ``'left'`` (rows compressed), ``'right'`` (columns compressed) or
      None when the leaf is not projected.
    rank: the effective rank, None when the leaf is not projected.
    reason: why the leaf is not projected, ``'<cause>: <detail>'`` (e.g.
      ``'too small: smaller side 64 < min_dim 128'``); None when it is.
  """

  path: str
  shape: tuple[int, ...]
  side: Literal['left', 'right'] | None = None
  rank: int | None = None
  reason: str | None = None

  @property
  def projected(self) -> bool:
    return self.rank is not None

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading axes: independent stacked matrices."""
    return self.shape[:-2]

  @property
  def dim(self) -> int:
    """The size of the compressed axis."""
    return self.shape[-2] if self.side == 'left' else self.shape[-1]

  @property
  def projector_shape(self) -> tuple[int, ...]:
    """``(..., dim, r)``: one projector per stacked slice."""
    return self.batch_shape + (self.dim, self._rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    """Shape of ``down(X)``; the full shape for a leaf that is not projected."""
    if not self.projected:
      return self.shape
    m, n = self.shape[-2:]
    if self.side == 'left':
      return self.batch_shape + (self._rank, n)
    return self.batch_shape + (m, self._rank)

  @property
  def _rank(self) -> int:
    if self.rank is None:
      raise ValueError(f'Leaf {self.path} is not projected.')
    return self.rank


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
  """Decides which leaves are projected, on which side and at which rank.

  A leaf is projected when all of these hold:

  * it has ``ndim >= 2`` (leading axes are stacked matrices);
  * ``min(m, n) >= min_dim`` for its last two axes ``(m, n)``;
  * ``max(m, n) / min(m, n) <= max_aspect_ratio`` (None: no limit), which by
    default leaves embeddings and output heads unprojected;
  * ``projection_mask`` (if given) is True for it;
  * ``rank`` is smaller than the compressed dimension. Otherwise projecting
    could not shrink anything, so the leaf is kept exact (unprojected).

  Every projecting transform takes one (an int ``r`` is short for
  ``ProjectionRule(r)``); the optimizer aliases (`flora_jax.flora`,
  `flora_jax.galore`, `flora_jax.fira`) take the same settings as flat
  keyword arguments.

  Attributes:
    rank: the target rank r (> 0).
    side: ``'auto'`` compresses the smaller of the last two axes, the rows
      (axis -2) on a tie: for a Flax kernel ``(in, out)`` that is the input
      dimension, matching the reference code's choice for a PyTorch
      ``(out, in)`` weight. ``'larger'`` compresses the larger axis, the rows
      on a tie (`optax.contrib.galore`'s choice: smaller state, the moments
      live on the smaller axis). ``'left'`` always compresses the rows,
      ``'right'`` always the columns.
    min_dim: smallest ``min(m, n)`` that is projected.
    max_aspect_ratio: largest ``max(m, n) / min(m, n)`` that is projected;
      None disables the test.
    projection_mask: None, a pytree (or pytree prefix) of bools, or a
      callable mapping the tree to one, as in `optax.masked`. False leaves
      are never projected; True leaves are projected if they pass the shape
      rules. Not a weight-decay mask: it only selects what is compressed.
      See `path_mask` to build one from parameter paths.
    mask: deprecated spelling of ``projection_mask``.

  Example:
    >>> import jax.numpy as jnp
    >>> rule = ProjectionRule(rank=4, min_dim=8)
    >>> plans = rule.plan({'w': jnp.zeros((16, 32)), 'b': jnp.zeros(32)})
    >>> plans['w'].side, plans['w'].rank
    ('left', 4)
    >>> plans['b'].reason
    'not a matrix: ndim 1'
  """

  rank: int
  side: Side = 'auto'
  min_dim: int = 128
  max_aspect_ratio: float | None = 4.0
  projection_mask: MaskOrFn = None
  mask: dataclasses.InitVar[MaskOrFn] = None

  def __post_init__(self, mask: MaskOrFn):
    # Stored as Python ints: plans are static, decided at trace time.
    object.__setattr__(
        self, 'rank', validation.check_positive_int('rank', self.rank)
    )
    validation.check_choice('side', self.side, Side)
    object.__setattr__(
        self, 'min_dim',
        validation.check_non_negative_int('min_dim', self.min_dim),
    )
    validation.check_at_least(
        'max_aspect_ratio', self.max_aspect_ratio, 1.0, optional=True
    )
    if mask is not None:
      warnings.warn(
          'ProjectionRule(mask=...) is deprecated: pass projection_mask=...'
          ' (it selects the projected leaves, not weight decay).',
          DeprecationWarning,
          stacklevel=3,
      )
      if self.projection_mask is not None:
        raise ValueError('Pass projection_mask or mask, not both.')
      object.__setattr__(self, 'projection_mask', mask)

  @classmethod
  def of(cls, rule: ProjectionRule | int) -> ProjectionRule:
    """``rule`` itself, or ``ProjectionRule(rule)`` for an int rank."""
    if isinstance(rule, ProjectionRule):
      return rule
    validation.check_instance(
        'rule', rule, (int, np.integer),
        'a flora_jax.ProjectionRule or an int rank',
    )
    return cls(int(rule))

  def leaf_plan(self, path: str, shape: tuple[int, ...]) -> LeafPlan:
    """The plan of one leaf, ignoring the projection mask."""
    shape = tuple(shape)
    if len(shape) < 2:
      return LeafPlan(path, shape, reason=f'not a matrix: ndim {len(shape)}')
    m, n = shape[-2:]
    small, large = min(m, n), max(m, n)
    if small < max(self.min_dim, 1):
      return LeafPlan(path, shape, reason=(
          f'too small: smaller side {small} < min_dim {self.min_dim}'))
    ratio = self.max_aspect_ratio
    if ratio is not None and large > ratio * small:
      return LeafPlan(path, shape, reason=(
          f'too elongated: aspect ratio {large / small:.3g} >'
          f' max_aspect_ratio {ratio:g}'))
    side = self._side(m, n)
    dim = m if side == 'left' else n
    if self.rank >= dim:
      return LeafPlan(path, shape, reason=(
          f'rank not below the dimension: rank {self.rank} >= side'
          f' {side!r} of size {dim}'))
    return LeafPlan(path, shape, side, self.rank)

  def _side(self, m: int, n: int) -> Literal['left', 'right']:
    if self.side == 'auto':
      return 'left' if m <= n else 'right'
    if self.side == 'larger':
      return 'left' if m >= n else 'right'
    return self.side

  def plan(self, tree: Any) -> Any:
    """Returns a tree of `LeafPlan` with the structure of ``tree``.

    Raises:
      TypeError: a leaf chosen for projection is not a real floating array.
      ValueError: the projection mask does not fit the tree.
    """
    tree = tree_util.unwrap_variables(tree)
    mask_leaves = _mask_leaves(self.projection_mask, tree)
    paths_and_leaves, treedef = jax.tree.flatten_with_path(tree)
    plans = []
    for (key_path, leaf), keep in zip(paths_and_leaves, mask_leaves,
                                      strict=True):
      path = jax.tree_util.keystr(key_path)
      plan = self.leaf_plan(path, np.shape(leaf))
      if not keep:
        plan = LeafPlan(path, plan.shape,
                        reason='masked out: projection_mask is False')
      if plan.projected:
        validation.check_real_float_leaf(
            path, leaf, 'low-rank projection',
            'Exclude it with projection_mask.',
        )
      plans.append(plan)
    return jax.tree.unflatten(treedef, plans)


# ------------------------------------------------ what was projected, told

MIN_PROJECTED_FRACTION = 0.25
"""`init` warns when a transform projects less than this share of values."""


class LowCompressionWarning(UserWarning):
  """A compressing transform leaves most of the parameters full-size."""


# Set by `recording_plans`: where announced plans go instead of warnings.
_RECORDER: contextvars.ContextVar[list[tuple[str, Any]] | None] = (
    contextvars.ContextVar('flora_jax_plan_recorder', default=None)
)


@contextlib.contextmanager
def recording_plans() -> Iterator[list[tuple[str, Any]]]:
  """Collects ``(transform, plans)`` of every `init` run inside the block."""
  records: list[tuple[str, Any]] = []
  token = _RECORDER.set(records)
  try:
    yield records
  finally:
    _RECORDER.reset(token)


def plan_announcer(
    transform: str, kept_full: str = 'its state for the rest is full-size'
) -> Callable[[Any], None]:
  """What a projecting transform's `init` calls with its final plans.

  Inside `recording_plans` (how `flora_jax.memory.memory_report` learns
  each leaf's plan) the plans are recorded. Otherwise the first `init`
  that projects less than `MIN_PROJECTED_FRACTION` of the values warns,
  naming the causes: a silent fall back to full-size state is how a
  "compressed" optimizer ends up using Adam's memory unnoticed.

  Args:
    transform: the transform's name, for the warning.
    kept_full: what happens to the leaves that are not projected.
  """
  warned = False

  def announce(plans: Any) -> None:
    nonlocal warned
    records = _RECORDER.get()
    if records is not None:
      records.append((transform, plans))
    elif not warned:
      warned = _warn_if_little_projected(transform, kept_full, plans)

  return announce


def _warn_if_little_projected(transform: str, kept_full: str,
                              plans: Any) -> bool:
  """Warns if less than `MIN_PROJECTED_FRACTION` is projected; says so."""
  leaves = jax.tree.leaves(plans)
  total = sum(math.prod(plan.shape) for plan in leaves)
  projected = sum(math.prod(plan.shape) for plan in leaves if plan.projected)
  if total == 0 or projected >= MIN_PROJECTED_FRACTION * total:
    return False
  share = (f'projects only {100 * projected / total:.1f}% of the parameter'
           ' values' if projected else 'projects none of the parameters')
  warnings.warn(
      f'{transform} {share} ({sum(p.projected for p in leaves)} of'
      f' {len(leaves)} leaves): {kept_full}. Not projected:'
      f' {_unprojected_by_cause(leaves)}.'
      ' flora_jax.memory_report(tx, params) lists every leaf and why;'
      ' the ProjectionRule (rank, min_dim, max_aspect_ratio,'
      ' projection_mask) decides.',
      LowCompressionWarning,
      stacklevel=4,
  )
  return True


def _unprojected_by_cause(leaves: list[LeafPlan]) -> str:
  """``'too small (2 leaves, 8,192 values); ...'``, largest first."""
  causes: dict[str, list[int]] = {}
  for plan in leaves:
    if not plan.projected:
      cause = (plan.reason or 'unknown').split(':')[0]
      count_and_values = causes.setdefault(cause, [0, 0])
      count_and_values[0] += 1
      count_and_values[1] += math.prod(plan.shape)
  return '; '.join(
      f'{cause} ({count} {"leaf" if count == 1 else "leaves"},'
      f' {values:,} values)'
      for cause, (count, values) in sorted(
          causes.items(), key=lambda item: -item[1][1])
  )


def _mask_leaves(mask: MaskOrFn, tree: Any) -> list[bool]:
  """Broadcasts an optax-style mask over ``tree``; one bool per leaf."""
  n_leaves = len(jax.tree.leaves(tree))
  if mask is None:
    return [True] * n_leaves
  mask_tree = mask(tree) if callable(mask) else mask
  try:
    full = jax.tree.broadcast(mask_tree, tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
        'projection_mask must be a pytree of bools with the structure of the'
        f' parameters (or a prefix of it): {err}'
    ) from None
  leaves = jax.tree.leaves(full)
  if len(leaves) != n_leaves:
    raise ValueError(
        f'projection_mask has {len(leaves)} leaves after broadcasting, the'
        f' parameters have {n_leaves}.'
    )
  return [bool(x) for x in leaves]


def path_mask(predicate: Callable[[str, Any], bool]) -> Callable[[Any], Any]:
  """Builds an optax-style mask from a predicate on parameter paths.

  Args:
    predicate: called as ``predicate(path, leaf)`` with the leaf's path joined
      by ``'/'`` (e.g. ``'layers/0/attn/query/kernel'``).

  Returns:
    A callable mapping a tree to a tree of bools, usable as
    ``projection_mask`` here and as ``mask`` in `optax.masked`.

  Example:
    >>> import jax.numpy as jnp
    >>> in_attention = path_mask(lambda path, leaf: 'attn' in path)
    >>> in_attention({'attn': {'w': jnp.zeros(2)}, 'mlp': {'w': jnp.zeros(2)}})
    {'attn': {'w': True}, 'mlp': {'w': False}}
  """

  def mask_fn(tree):
    return jax.tree.map_with_path(
        lambda key_path, leaf: bool(
            predicate(tree_util.path_string(key_path), leaf)
        ),
        tree,
    )

  return mask_fn
