"""Which leaves are projected, on which side and at which rank.

Everything that decides *whether* and *how* a matrix-shaped leaf is
compressed lives here, once, for every projecting transform: arrays with
``ndim >= 2`` whose matrix is large enough and not too elongated,
optionally restricted by a projection mask. By default the matrix is the
last two axes and the leading axes are independent stacked matrices (e.g. a
scan-over-layers kernel of shape ``(L, m, n)``), each slice with its own
projector; `DimensionNumbers` name other axes (a MaxText kernel
``(embed, layers, heads, head_dim)``), and the transforms then work on the
leaf's matrix view ``(stack..., rows, columns)`` (`LeafPlan.to_matrix`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from flora_jax._src import compat
from flora_jax._src import tree_util
from flora_jax._src import validation

Side = Literal['auto', 'larger', 'left', 'right']

# A mask in optax's convention: a pytree (or pytree prefix) of bools, or a
# callable mapping the parameter tree to one.
MaskOrFn = Any | Callable[[Any], Any] | None


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form the matrix that a transform projects.

  The matrix's rows are the ``reduction_axis`` (the input side of ``x @ W``)
  and its columns the ``output_axis``; several axes on one side are taken
  together, in the order given (``heads x head_dim`` as one output side);
  every other axis is a stack of independent matrices, each slice with its
  own projector. The leaf is projected as its matrix view
  ``(stack..., prod(reduction), prod(output))``; the updates keep the
  leaf's layout. The default rule, for leaves given no dimension numbers,
  is ``DimensionNumbers(-2, -1)``: the last two axes, leading axes stacked.

  The fields are those of `optax.contrib.MuonDimensionNumbers` and
  `optax.contrib.GaLoreDimensionNumbers`, which are accepted as well.

  Attributes:
    reduction_axis: the rows' axis or axes (negative counts from the end).
    output_axis: the columns' axis or axes.

  Example:
    >>> import jax.numpy as jnp, flora_jax
    >>> # A MaxText-style scanned attention kernel: (embed, layers, heads,
    >>> # head_dim), one (embed, heads * head_dim) matrix per layer.
    >>> query = DimensionNumbers(reduction_axis=0, output_axis=(2, 3))
    >>> rule = flora_jax.ProjectionRule(8, min_dim=16,
    ...                                 dimension_numbers={'query': query})
    >>> plan = rule.plan({'query': jnp.zeros((64, 4, 8, 16))})['query']
    >>> plan.matrix_shape, plan.side, plan.low_rank_shape
    ((4, 64, 128), 'left', (4, 8, 128))
  """

  reduction_axis: int | Sequence[int] = -2
  output_axis: int | Sequence[int] = -1


# Dimension numbers per leaf: a pytree (or prefix) of DimensionNumbers (or
# optax's) and None (the default rule), or a callable mapping the parameter
# tree to one.
DimensionNumbersOrFn = Any | Callable[[Any], Any] | None


def is_dimension_numbers(x: Any) -> bool:
  """Ours, optax's `MuonDimensionNumbers` or `GaLoreDimensionNumbers`."""
  return isinstance(x, tuple) and hasattr(x, 'reduction_axis') and hasattr(
      x, 'output_axis')


@dataclasses.dataclass(frozen=True)
class MatrixAxes:
  """A leaf's matrix, resolved: non-negative axes of each role, in order."""

  stack: tuple[int, ...]
  rows: tuple[int, ...]
  columns: tuple[int, ...]

  @property
  def permutation(self) -> tuple[int, ...]:
    return self.stack + self.rows + self.columns

  @property
  def is_default(self) -> bool:
    """The last two axes, one each, leading axes stacked in order."""
    n = len(self.permutation)
    return self.permutation == tuple(range(n)) and len(self.rows) == len(
        self.columns) == 1

  @classmethod
  def resolve(cls, numbers: Any, path: str,
              shape: tuple[int, ...]) -> MatrixAxes:
    """Validates ``numbers`` against ``shape``; errors name ``path``."""
    ndim = len(shape)
    sides = {}
    for name in ('reduction_axis', 'output_axis'):
      value = getattr(numbers, name)
      axes = (value,) if isinstance(value, (int, np.integer)) else value
      if isinstance(axes, str) or not isinstance(axes, Sequence) or not all(
          isinstance(a, (int, np.integer)) and not isinstance(a, bool)
          for a in axes):
        raise TypeError(
            f'Dimension numbers of {path}: {name} must be an int or a'
            f' sequence of ints, got {value!r}.')
      axes = tuple(int(a) for a in axes)
      if not axes or any(not -ndim <= a < ndim for a in axes):
        raise ValueError(
            f'Dimension numbers of {path}: {name}={value!r} is not a'
            f' non-empty set of axes of its shape {shape} (ndim {ndim}).')
      sides[name] = tuple(a % ndim for a in axes)
    rows, columns = sides['reduction_axis'], sides['output_axis']
    named = rows + columns
    if len(set(named)) != len(named):
      raise ValueError(
          f'Dimension numbers of {path}: reduction_axis {rows} and'
          f' output_axis {columns} name an axis twice (shape {shape}).')
    stack = tuple(a for a in range(ndim) if a not in named)
    return cls(stack, rows, columns)

  def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (tuple(shape[a] for a in self.stack)
            + (math.prod(shape[a] for a in self.rows),
               math.prod(shape[a] for a in self.columns)))

  def matrix_spec(self, spec: tuple[Any, ...],
                  shape: tuple[int, ...]) -> tuple[Any, ...]:
    """The partition spec of the matrix view of a leaf laid out by ``spec``.

    A side made of several axes keeps the sharding of its first (major)
    axis when the others are unsharded, the layout a reshape preserves;
    otherwise it is replicated.
    """
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))

    def side(axes):
      if all(spec[a] is None for a in axes[1:]):
        return spec[axes[0]]
      return None

    return tuple(spec[a] for a in self.stack) + (side(self.rows),
                                                 side(self.columns))


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
    axes: where the matrix is, for a projected leaf whose `DimensionNumbers`
      are not the default (the last two axes); None otherwise.
  """

  path: str
  shape: tuple[int, ...]
  side: Literal['left', 'right'] | None = None
  rank: int | None = None
  reason: str | None = None
  axes: MatrixAxes | None = None

  @property
  def projected(self) -> bool:
    return self.rank is not None

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    """``(stack..., rows, columns)``: the shape the transforms work on."""
    if self.axes is None:
      return self.shape
    return self.axes.matrix_shape(self.shape)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """The stack axes of the matrix view: independent matrices."""
    return self.matrix_shape[:-2]

  @property
  def dim(self) -> int:
    """The size of the compressed axis."""
    m, n = self.matrix_shape[-2:]
    return m if self.side == 'left' else n

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``x`` (laid out like the leaf) as its matrix view; free by default."""
    if self.axes is None:
      return x
    x = _mergeable(x, self.axes)
    return jnp.transpose(x, self.axes.permutation).reshape(self.matrix_shape)

  def from_matrix(self, x: jax.Array, like: jax.Array | None = None
                  ) -> jax.Array:
    """Inverse of `to_matrix`: a matrix view back in the leaf's layout.

    ``like``: an array laid out as the leaf (its gradient), whose Explicit
    sharding the result takes back where `to_matrix` had to gather an axis.
    """
    if self.axes is None:
      return x
    permuted = tuple(self.shape[a] for a in self.axes.permutation)
    inverse = tuple(int(a) for a in np.argsort(self.axes.permutation))
    x = jnp.transpose(x.reshape(permuted), inverse)
    if like is None:
      return x
    spec = compat.explicit_spec(like)
    if compat.explicit_spec(x) == spec:
      return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))

  @property
  def projector_shape(self) -> tuple[int, ...]:
    """``(..., dim, r)``: one projector per stacked slice."""
    return self.batch_shape + (self.dim, self._rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    """Shape of ``down(X)``; the full shape for a leaf that is not projected."""
    if not self.projected:
      return self.shape
    m, n = self.matrix_shape[-2:]
    if self.side == 'left':
      return self.batch_shape + (self._rank, n)
    return self.batch_shape + (m, self._rank)

  @property
  def _rank(self) -> int:
    if self.rank is None:
      raise ValueError(f'Leaf {self.path} is not projected.')
    return self.rank


def _mergeable(x: jax.Array, axes: MatrixAxes) -> jax.Array:
  """``x`` resharded so that each side's axes can be merged by a reshape.

  Under Explicit sharding a reshape keeps a merged side sharded only along
  its first (major) axis; the others are gathered first (the layout
  `MatrixAxes.matrix_spec` describes). Free outside Explicit sharding.
  """
  spec = compat.explicit_spec(x)
  kept = list(spec)
  for side in (axes.rows, axes.columns):
    for axis in side[1:]:
      kept[axis] = None
  if tuple(kept) == tuple(spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*kept))


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
  """Decides which leaves are projected, on which side and at which rank.

  A leaf is projected when all of these hold:

  * it has ``ndim >= 2``;
  * ``min(m, n) >= min_dim`` for its matrix ``(m, n)``: the last two axes
    (leading axes are stacked matrices), or those its `DimensionNumbers`
    name;
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
    dimension_numbers: where each leaf's matrix is: None (the last two axes
      of every leaf); one `DimensionNumbers` (optax's
      `MuonDimensionNumbers`/`GaLoreDimensionNumbers` too) for every leaf;
      a pytree (or pytree prefix) of them and None (the
      default rule for that leaf); a callable mapping the tree to one, as
      optax takes it; or a callable ``(path, leaf) -> DimensionNumbers |
      None`` of the leaf's path joined by ``'/'`` (two positional
      required parameters; see `path_dimension_numbers`). Leaves with
      ``ndim < 2`` are never matrices: numbers given for them are ignored.
      They say where the matrix is, not whether it is projected: the tests
      above apply to it.
      ``side`` then refers to the matrix view: ``'left'`` compresses the
      reduction side.

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
  dimension_numbers: DimensionNumbersOrFn = dataclasses.field(
      default=None, kw_only=True)

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

  def leaf_plan(self, path: str, shape: tuple[int, ...],
                dimension_numbers: Any = None) -> LeafPlan:
    """The plan of one leaf, ignoring the projection mask.

    Args:
      path: the leaf's path, for the plan and for errors.
      shape: its shape.
      dimension_numbers: its `DimensionNumbers`; None for the rule's own
        if that is one `DimensionNumbers`, else for the default rule.
    """
    shape = tuple(shape)
    if dimension_numbers is None and is_dimension_numbers(
        self.dimension_numbers):
      dimension_numbers = self.dimension_numbers
    if len(shape) < 2:
      # Dimension numbers given to a vector (one for the whole tree, or a
      # prefix over a layer's kernel and bias) are about the matrices only.
      return LeafPlan(path, shape, reason=f'not a matrix: ndim {len(shape)}')
    axes = None
    if dimension_numbers is not None:
      axes = MatrixAxes.resolve(dimension_numbers, path, shape)
      axes = None if axes.is_default else axes
    m, n = (axes.matrix_shape(shape) if axes else shape)[-2:]
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
    return LeafPlan(path, shape, side, self.rank, axes=axes)

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
      ValueError: the projection mask or the dimension numbers do not fit
        the tree.
    """
    tree = tree_util.unwrap_variables(tree)
    mask_leaves = _mask_leaves(self.projection_mask, tree)
    numbers = _dimension_numbers_leaves(self.dimension_numbers, tree)
    paths_and_leaves, treedef = jax.tree.flatten_with_path(tree)
    plans = []
    for (key_path, leaf), keep, leaf_numbers in zip(
        paths_and_leaves, mask_leaves, numbers, strict=True):
      path = jax.tree_util.keystr(key_path)
      plan = self.leaf_plan(path, np.shape(leaf), leaf_numbers)
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


def abstract_init_with_plans(
    init: Callable[[Any], Any], params: Any,
) -> tuple[Any, list[tuple[str, Any]]]:
  """``jax.eval_shape(init, params)`` and the plans its transforms made.

  A fresh function is traced every time: `jax.eval_shape` caches traces of
  the same function on the same shapes, and a cached trace runs no `init`,
  so a second call would record no plans.
  """
  with recording_plans() as records:
    state = jax.eval_shape(lambda p: init(p), params)
  return state, records


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
  if mask is None:
    return [True] * len(jax.tree.leaves(tree))
  mask_tree = mask(tree) if callable(mask) else mask
  return [bool(x) for x in _per_leaf(mask_tree, tree, 'projection_mask',
                                     'bools')]


def _per_leaf(prefix: Any, tree: Any, name: str, what: str,
              is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
  """``prefix``, a pytree prefix of ``tree``, as one entry per leaf.

  Errors name the argument (``name``) and what its leaves are (``what``).
  """
  try:
    full = jax.tree.broadcast(prefix, tree, is_leaf=is_leaf)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f'{name} must be a pytree of {what} with the structure of the'
        f' parameters (or a prefix of it): {err}'
    ) from None
  leaves = jax.tree.leaves(full, is_leaf=is_leaf)
  n_leaves = len(jax.tree.leaves(tree))
  if len(leaves) != n_leaves:
    raise ValueError(
        f'{name} has {len(leaves)} leaves after broadcasting, the'
        f' parameters have {n_leaves}.'
    )
  return leaves


def to_matrices(plans: Any, tree: Any) -> Any:
  """Each leaf of ``tree`` as its plan's matrix view (`LeafPlan.to_matrix`)."""
  return jax.tree.map(lambda plan, x: plan.to_matrix(x), plans, tree)


def from_matrices(plans: Any, tree: Any, like: Any) -> Any:
  """Inverse of `to_matrices`, laid out like ``like`` (see `from_matrix`)."""
  return jax.tree.map(lambda plan, x, y: plan.from_matrix(x, y), plans, tree,
                      like)


def _dimension_numbers_leaves(numbers: DimensionNumbersOrFn,
                              tree: Any) -> list[Any]:
  """One `DimensionNumbers` (or None) per leaf of ``tree``."""
  n_leaves = len(jax.tree.leaves(tree))
  if numbers is None:
    return [None] * n_leaves
  if is_dimension_numbers(numbers):
    return [numbers] * n_leaves  # `leaf_plan` skips vectors
  if callable(numbers) and _positional_arity(numbers) == 2:
    numbers = path_dimension_numbers(cast(Callable[[str, Any], Any], numbers))
  numbers_tree = numbers(tree) if callable(numbers) else numbers
  leaves = _per_leaf(numbers_tree, tree, 'dimension_numbers',
                     'DimensionNumbers or None',
                     is_leaf=lambda x: x is None or is_dimension_numbers(x))
  for leaf in leaves:
    if leaf is not None and not is_dimension_numbers(leaf):
      raise TypeError(
          'dimension_numbers leaves must be flora_jax.DimensionNumbers (or'
          f' optax\'s) or None, got {leaf!r}.')
  return leaves


def _positional_arity(fn: Callable[..., Any]) -> int | None:
  """How many positional parameters ``fn`` requires; None if it cannot say."""
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  kinds = (inspect.Parameter.POSITIONAL_ONLY,
           inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return sum(p.kind in kinds and p.default is inspect.Parameter.empty
             for p in parameters)


def path_dimension_numbers(
    numbers_of: Callable[[str, Any], Any],
) -> Callable[[Any], Any]:
  """Builds ``dimension_numbers`` from a function of parameter paths.

  Args:
    numbers_of: called as ``numbers_of(path, leaf)`` with the leaf's path
      joined by ``'/'``; returns its `DimensionNumbers`, or None for the
      default rule.

  Returns:
    A callable mapping a tree to a tree of `DimensionNumbers` and None,
    usable as ``ProjectionRule(dimension_numbers=...)``.

  Example:
    >>> import jax.numpy as jnp
    >>> numbers = path_dimension_numbers(
    ...     lambda path, leaf: DimensionNumbers(0, (2, 3))
    ...     if path.endswith('query/kernel') else None)
    >>> numbers({'query': {'kernel': jnp.zeros((8, 2, 4, 4))},
    ...          'mlp': jnp.zeros((8, 16))})['mlp'] is None
    True
  """

  def numbers_fn(tree):
    return jax.tree.map_with_path(
        lambda key_path, leaf: numbers_of(tree_util.path_string(key_path),
                                          leaf),
        tree,
    )

  return numbers_fn


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
