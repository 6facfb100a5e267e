"""The low-rank projection machinery shared by Flora, GaLore and Fira.

Everything that decides *how* a matrix-shaped leaf is compressed lives here,
written once:

* which leaves are projected (`ProjectionRule`): arrays with ``ndim >= 2``
  whose last two axes are large enough and not too elongated, optionally
  restricted by a user mask; leading axes are independent stacked matrices
  (e.g. a scan-over-layers kernel of shape ``(L, m, n)``), each slice with
  its own projector;
* which side is compressed and with which effective rank (`LeafPlan`);
* the projector ``Q`` of shape ``(..., dim, r)`` and the two maps

  - side ``'left'`` (compress the rows, axis -2):
    ``down(X) = Qᵀ X`` of shape ``(..., r, n)`` and ``up(C) = Q C``;
  - side ``'right'`` (compress the columns, axis -1):
    ``down(X) = X Q`` of shape ``(..., m, r)`` and ``up(C) = C Qᵀ``.

  Flora draws ``Q`` with i.i.d. ``N(0, 1/r)`` entries, so that
  ``E[up(down(G))] = G``; GaLore and Fira take the top-``r`` singular vectors
  of the gradient, exactly (`svd_projector`) or by a randomized range finder
  (`randomized_projector`); both have orthonormal columns and plug into the
  same ``down``/``up``;
* the key schedule: a transform keeps ONE typed PRNG key in its state; the key
  of a leaf's ``i``-th projector is
  ``fold_in(fold_in(key, crc32(path)), i)``, so projectors are never stored,
  the state holds no per-leaf key arrays, and a leaf keeps its projections
  when the tree is wrapped by `optax.masked` or `optax.partition`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from typing import Any, Callable, Literal, Optional, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_jax import _compat
from flora_jax import _validation

Side = Literal['auto', 'larger', 'left', 'right']
SIDES = ('auto', 'larger', 'left', 'right')

# A mask in optax's convention: a pytree (or pytree prefix) of bools, or a
# callable mapping the parameter tree to one.
MaskOrFn = Union[Any, Callable[[Any], Any], None]
PRNGKeyLike = Union[int, jax.Array, np.ndarray]


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
  """

  path: str
  shape: tuple[int, ...]
  side: Optional[str] = None
  rank: Optional[int] = None

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
    return self.batch_shape + (self.dim, self.rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    """Shape of ``down(X)``; the full shape for leaves that are not projected."""
    if not self.projected:
      return self.shape
    m, n = self.shape[-2:]
    if self.side == 'left':
      return self.batch_shape + (self.rank, n)
    return self.batch_shape + (m, self.rank)


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
  """Decides which leaves are projected, on which side and at which rank.

  A leaf is projected when all of these hold:

  * it has ``ndim >= 2`` (leading axes are stacked matrices);
  * ``min(m, n) >= min_dim`` for its last two axes ``(m, n)``;
  * ``max(m, n) / min(m, n) <= max_aspect_ratio`` (None: no limit), which by
    default leaves embeddings and output heads unprojected;
  * ``mask`` (if given) is True for it;
  * ``rank`` is smaller than the compressed dimension. Otherwise projecting
    could not shrink anything, so the leaf is kept exact (unprojected).

  Args:
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
    mask: None, a pytree (or pytree prefix) of bools, or a callable mapping
      the tree to one, as in `optax.masked`. False leaves are never
      projected; True leaves are projected if they pass the shape rules. See
      `path_mask` to build one from parameter paths.
  """

  rank: int
  side: Side = 'auto'
  min_dim: int = 128
  max_aspect_ratio: Optional[float] = 4.0
  mask: MaskOrFn = None

  def __post_init__(self):
    _validation.check_positive_int('rank', self.rank)
    _validation.check_choice('side', self.side, SIDES)
    static_hint = (
        ' (a static Python value: under optax.inject_hyperparams list it in'
        ' static_args)'
    )
    if (
        isinstance(self.min_dim, bool)
        or not isinstance(self.min_dim, numbers.Integral)
        or self.min_dim < 0
    ):
      raise ValueError(
          f'min_dim must be a non-negative int{static_hint}, got'
          f' {self.min_dim!r}.'
      )
    if self.max_aspect_ratio is not None and not (
        isinstance(self.max_aspect_ratio, numbers.Real)
        and self.max_aspect_ratio >= 1
    ):
      raise ValueError(
          f'max_aspect_ratio must be None or a number >= 1{static_hint}, got'
          f' {self.max_aspect_ratio!r}.'
      )

  def leaf_plan(self, path: str, shape: tuple[int, ...]) -> LeafPlan:
    """The plan of one leaf, ignoring the mask."""
    shape = tuple(shape)
    if len(shape) < 2:
      return LeafPlan(path, shape)
    m, n = shape[-2:]
    small, large = min(m, n), max(m, n)
    if small < max(self.min_dim, 1):
      return LeafPlan(path, shape)
    if self.max_aspect_ratio is not None and large > self.max_aspect_ratio * small:
      return LeafPlan(path, shape)
    if self.side == 'auto':
      side = 'left' if m <= n else 'right'
    elif self.side == 'larger':
      side = 'left' if m >= n else 'right'
    else:
      side = self.side
    dim = m if side == 'left' else n
    if self.rank >= dim:
      return LeafPlan(path, shape)
    return LeafPlan(path, shape, side, self.rank)

  def plan(self, tree: Any) -> Any:
    """Returns a tree of `LeafPlan` with the structure of ``tree``.

    Raises:
      TypeError: a leaf chosen for projection is not a real floating array.
      ValueError: the mask does not fit the tree.
    """
    tree = unwrap_variables(tree)
    mask_leaves = _mask_leaves(self.mask, tree)
    paths_and_leaves, treedef = jax.tree.flatten_with_path(tree)
    plans = []
    for (key_path, leaf), keep in zip(paths_and_leaves, mask_leaves):
      path = jax.tree_util.keystr(key_path)
      plan = self.leaf_plan(path, np.shape(leaf))
      if not keep:
        plan = LeafPlan(path, plan.shape)
      if plan.projected:
        _check_real_float(path, leaf)
      plans.append(plan)
    return jax.tree.unflatten(treedef, plans)


def unwrap_variables(tree: Any) -> Any:
  """Replaces Flax NNX Variables by their arrays.

  `nnx.Optimizer` passes Variables to ``init`` but arrays to ``update``;
  unwrapping keeps leaf paths (and so masks and per-leaf keys) identical in
  both, and keeps Variable metadata (e.g. sharding names) off states whose
  shapes differ from the parameter's.
  """
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(
      lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable
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


def _check_real_float(path: str, leaf: Any) -> None:
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'Leaf {path} is selected for low-rank projection but has dtype'
        f' {dtype}; projection needs a real floating dtype. Exclude it with'
        ' `mask`.'
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
        'mask must be a pytree of bools with the structure of the parameters'
        f' (or a prefix of it): {err}'
    ) from None
  leaves = jax.tree.leaves(full)
  if len(leaves) != n_leaves:
    raise ValueError(
        f'mask has {len(leaves)} leaves after broadcasting, the parameters'
        f' have {n_leaves}.'
    )
  return [bool(x) for x in leaves]


def path_mask(predicate: Callable[[str, Any], bool]) -> Callable[[Any], Any]:
  """Builds an optax-style mask from a predicate on parameter paths.

  Args:
    predicate: called as ``predicate(path, leaf)`` with the leaf's path joined
      by ``'/'`` (e.g. ``'layers/0/attn/query/kernel'``).

  Returns:
    A callable mapping a tree to a tree of bools, usable as ``mask`` here
    and in `optax.masked`.

  Example:
    >>> mask = path_mask(lambda path, x: 'attn' in path)
  """

  def mask_fn(tree):
    return jax.tree.map_with_path(
        lambda key_path, leaf: bool(predicate(path_string(key_path), leaf)),
        tree,
    )

  return mask_fn


def path_string(key_path) -> str:
  """Joins a key path with '/': ``('layers', 0, 'kernel')`` -> 'layers/0/kernel'."""
  parts = []
  for entry in key_path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


# ------------------------------------------------------------------ keys


def as_prng_key(key: PRNGKeyLike, name: str = 'key') -> jax.Array:
  """Converts a seed, a typed key or a raw uint32 key to a typed key.

  Accepts a Python or array integer seed (possibly traced, as under
  `optax.inject_hyperparams`), a scalar typed key from `jax.random.key`, or a
  raw ``uint32[2]`` key from the legacy `jax.random.PRNGKey`.
  """
  if isinstance(key, bool):
    raise TypeError(f'{name} must be an int seed or a PRNG key, got {key!r}.')
  if isinstance(key, numbers.Integral):
    return jax.random.key(int(key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(
            f'{name} must be a single (scalar) typed key, got shape'
            f' {key.shape}.'
        )
      return key
    if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
      return jax.random.key(key)
    if key.shape == (2,) and key.dtype == jnp.uint32:
      return jax.random.wrap_key_data(key)
  raise TypeError(
      f'{name} must be an int seed, a typed key from jax.random.key or a raw'
      f' uint32[2] key, got {type(key).__name__}'
      f' {getattr(key, "dtype", "")}{list(getattr(key, "shape", ()))}.'
  )


def check_key_argument(key: PRNGKeyLike, name: str = 'key') -> None:
  """Construction-time check of a key argument; tracers pass through."""
  if isinstance(key, jax.core.Tracer):
    return
  as_prng_key(key, name)


def path_id(path: str) -> int:
  """A stable 32-bit id of a leaf path (same in every process)."""
  return zlib.crc32(path.encode('utf-8'))


def projection_key(key: jax.Array, path: str, index: jax.Array) -> jax.Array:
  """The key of the ``index``-th projector of the leaf at ``path``."""
  return jax.random.fold_in(jax.random.fold_in(key, path_id(path)), index)


# ------------------------------------------------------------ projectors


def gaussian_projector(
    key: jax.Array, plan: LeafPlan, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
  """Draws ``Q`` of shape ``plan.projector_shape`` with entries N(0, 1/r).

  With this scale ``E[Q Qᵀ] = I``, so ``up(down(G))`` is an unbiased estimate
  of ``G``. Each stacked slice gets an independent draw.
  """
  scale = 1.0 / math.sqrt(plan.rank)
  return jax.random.normal(key, plan.projector_shape, dtype) * jnp.asarray(
      scale, dtype
  )


def _spec(x: jax.Array) -> tuple[Any, ...]:
  """The mesh axes of each axis of ``x`` in its type (Explicit sharding)."""
  spec = tuple(getattr(jax.typeof(x).sharding, 'spec', ()) or ())
  return spec + (None,) * (x.ndim - len(spec))


def _reduced_sharding(contracted: tuple[Any, ...], kept: tuple[Any, ...]):
  """``out_sharding`` of a product whose contracted axis may be sharded.

  Under Explicit sharding JAX refuses to guess the layout of a product over
  a sharded axis. The partial sums are then reduced into ``kept``: the
  result's full-size axis stays sharded like the parameter's, the rank axis
  is replicated. None (let JAX decide) when nothing contracted is sharded.
  """
  if all(axis is None for axis in contracted):
    return None
  return jax.sharding.PartitionSpec(*kept)


def project_down(q: jax.Array, x: jax.Array, side: str) -> jax.Array:
  """``Qᵀ X`` (side 'left') or ``X Q`` (side 'right'), batched over leading axes."""
  x = x.astype(q.dtype)
  x_spec, q_spec = _spec(x), _spec(q)
  if side == 'left':
    out = _reduced_sharding((x_spec[-2], q_spec[-2]),
                            x_spec[:-2] + (None, x_spec[-1]))
    return jnp.einsum('...mr,...mn->...rn', q, x, out_sharding=out)
  out = _reduced_sharding((x_spec[-1], q_spec[-2]),
                          x_spec[:-2] + (x_spec[-2], None))
  return jnp.einsum('...mn,...nr->...mr', x, q, out_sharding=out)


def _outer_sharding(lead, rows, columns):
  """``out_sharding`` of a product ``(..., m, r) @ (..., r, n)``.

  The result takes its rows' sharding from one factor and its columns' from
  the other; when both name the same mesh axis (a square matrix whose
  projector was laid out along the other axis) the columns are replicated
  rather than the product refused. None when nothing is sharded.
  """
  if rows is None and columns is None and all(a is None for a in lead):
    return None
  if columns == rows:
    columns = None
  return jax.sharding.PartitionSpec(*lead, rows, columns)


def project_up(q: jax.Array, c: jax.Array, side: str) -> jax.Array:
  """``Q C`` (side 'left') or ``C Qᵀ`` (side 'right'), batched over leading axes."""
  c = c.astype(q.dtype)
  q_spec, c_spec = _spec(q), _spec(c)
  if side == 'left':
    out = _outer_sharding(c_spec[:-2], q_spec[-2], c_spec[-1])
    return jnp.einsum('...mr,...rn->...mn', q, c, out_sharding=out)
  out = _outer_sharding(c_spec[:-2], c_spec[-2], q_spec[-2])
  return jnp.einsum('...mr,...nr->...mn', c, q, out_sharding=out)


def change_basis(
    q_old: jax.Array, q_new: jax.Array, c: jax.Array, side: str
) -> jax.Array:
  """``down_new(up_old(C))`` through an ``r x r`` matrix, never a full one.

  Moves a low-rank quantity (a momentum, say) from the subspace of ``q_old``
  into that of ``q_new``.
  """
  new_spec, old_spec = _spec(q_new), _spec(q_old)
  overlap = jnp.einsum(
      '...dr,...ds->...rs', q_new, q_old.astype(q_new.dtype),
      out_sharding=_reduced_sharding((new_spec[-2], old_spec[-2]),
                                     new_spec[:-2] + (None, None)),
  )
  c = c.astype(q_new.dtype)
  if side == 'left':
    return jnp.einsum('...rs,...sn->...rn', overlap, c)
  return jnp.einsum('...ms,...rs->...mr', c, overlap)


def random_projector(
    key: jax.Array, plan: LeafPlan, index: jax.Array
) -> jax.Array:
  """The Gaussian projector number ``index`` of a leaf, regenerated from ``key``."""
  return gaussian_projector(projection_key(key, plan.path, index), plan)


# ------------------------------------- projectors fitted to a gradient
#
# Both return Q of shape plan.projector_shape in float32 with orthonormal
# columns spanning (an estimate of) the top-r singular subspace of the
# compressed axis. Stacked slices go through `_compat.each_matrix`, never
# vmap, so a `lax.cond` around them stays a real branch.


def gather_matrix_axes(x: jax.Array) -> jax.Array:
  """Replicates the last two axes of ``x`` where its sharding is Explicit.

  Decompositions (SVD, QR) need whole matrices; under
  `jax.sharding.AxisType.Explicit` they refuse sharded matrix axes instead
  of gathering them. Leading (stacked-slice) axes keep their sharding. With
  Auto axes the compiler inserts the gather itself, so ``x`` is returned
  as it is.
  """
  spec = _spec(x)
  if spec[-2] is None and spec[-1] is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec[:-2], None,
                                                            None))


def svd_projector(
    g: jax.Array, plan: LeafPlan, *, canonical_signs: bool = True
) -> jax.Array:
  """The top-``r`` singular vectors of ``g`` on the compressed side (GaLore).

  Side 'left' takes the left singular vectors ``U[:, :r]``, side 'right' the
  right ones ``Vh[:r]ᵀ``, from one float32 SVD of ``g`` itself, as the
  reference code does. If ``r`` exceeds ``min(m, n)`` the missing columns are
  zero.
  """
  def fit(g):
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    if plan.side == 'left':
      return u[..., :, : plan.rank]
    return jnp.swapaxes(vh[..., : plan.rank, :], -1, -2)

  q = _compat.each_matrix(fit, gather_matrix_axes(g.astype(jnp.float32)))
  q = _pad_columns(q, plan.rank)
  return canonicalize_signs(q) if canonical_signs else q


def randomized_projector(
    key: jax.Array,
    g: jax.Array,
    plan: LeafPlan,
    *,
    power_iterations: int = 2,
    oversampling: int = 8,
    canonical_signs: bool = True,
) -> jax.Array:
  """A randomized range finder for the top-``r`` singular subspace.

  Halko, Martinsson & Tropp (2011), Algorithms 4.4 and 5.1: sketch
  ``Y = A Ω`` with a Gaussian ``Ω`` of ``r + oversampling`` columns, refine
  it with ``power_iterations`` QR-stabilised passes of ``A Aᵀ``, then take the
  top ``r`` left singular vectors of the small matrix ``Qᵀ A``. Here ``A`` is
  ``g`` (side 'left') or ``gᵀ`` (side 'right'). The cost is
  ``O(m n (r + p) (2 q + 2))`` flops against ``O(m n min(m, n))`` for a full
  SVD.
  """
  a = gather_matrix_axes(g.astype(jnp.float32))
  if plan.side == 'right':
    a = jnp.swapaxes(a, -1, -2)
  rows, cols = a.shape[-2:]
  width = min(plan.rank + oversampling, rows)
  omega = jax.random.normal(key, plan.batch_shape + (cols, width), jnp.float32)
  transpose = lambda x: jnp.swapaxes(x, -1, -2)

  def fit(a, omega):
    sketch = a @ omega
    for _ in range(power_iterations):
      basis, _ = jnp.linalg.qr(sketch)
      co_basis, _ = jnp.linalg.qr(transpose(a) @ basis)
      sketch = a @ co_basis
    basis, _ = jnp.linalg.qr(sketch)
    u_small, _, _ = jnp.linalg.svd(transpose(basis) @ a, full_matrices=False)
    return basis @ u_small[..., :, : plan.rank]

  q = _pad_columns(_compat.each_matrix(fit, a, omega), plan.rank)
  return canonicalize_signs(q) if canonical_signs else q


def canonicalize_signs(q: jax.Array) -> jax.Array:
  """Flips each column of ``q`` so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign and LAPACK, cuSOLVER and TPU
  kernels choose differently. Moments carried across a refresh make the sign
  matter, so a fixed rule keeps trajectories identical across backends.
  """
  pivot_index = jnp.argmax(jnp.abs(q), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(q, pivot_index, axis=-2)
  return q * jnp.where(pivot < 0, -1.0, 1.0).astype(q.dtype)


def _pad_columns(q: jax.Array, rank: int) -> jax.Array:
  missing = rank - q.shape[-1]
  if missing == 0:
    return q
  return jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, missing)])


def check_state_shape(plan: LeafPlan, state_leaf: Any, what: str) -> None:
  """Raises a ValueError when a per-leaf state does not fit the update."""
  if np.shape(state_leaf) != plan.low_rank_shape:
    raise ValueError(
        f'Update at {plan.path} has shape {plan.shape}, which needs a {what}'
        f' of shape {plan.low_rank_shape}, but the state holds'
        f' {np.shape(state_leaf)}: the updates do not match the parameters the'
        ' optimizer was initialised with.'
    )


def unzip_leaves(plans: Any, tree_of_tuples: Any, n: int) -> tuple[Any, ...]:
  """Splits a tree whose leaves are n-tuples into n trees shaped like ``plans``."""
  return tuple(
      jax.tree.map(lambda _, t, i=i: t[i], plans, tree_of_tuples)
      for i in range(n)
  )


def state_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree`` (works on `jax.eval_shape` output)."""
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
