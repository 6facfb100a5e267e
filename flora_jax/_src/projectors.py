"""Projectors and the two maps every projecting method shares.

A projector ``Q`` has shape ``(..., dim, r)`` (one per stacked slice) and
defines, for a leaf of shape ``(..., m, n)``:

* side ``'left'`` (compress the rows, axis -2): ``down(X) = Qᵀ X`` of shape
  ``(..., r, n)`` and ``up(C) = Q C``;
* side ``'right'`` (compress the columns, axis -1): ``down(X) = X Q`` of
  shape ``(..., m, r)`` and ``up(C) = C Qᵀ``.

Flora draws ``Q`` with i.i.d. ``N(0, 1/r)`` entries (`gaussian_projector`),
so that ``E[up(down(G))] = G``; GaLore and Fira take the top-``r`` singular
vectors of the gradient, exactly (`svd_projector`) or by a randomized range
finder (`randomized_projector`); both have orthonormal columns and plug into
the same ``down``/``up``. Under Explicit sharding every product over a
sharded axis is given its output layout here, so callers never see it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flora_jax._src import compat
from flora_jax._src import keys
from flora_jax._src import validation
from flora_jax._src.projection import LeafPlan

_SIDES = ('left', 'right')

Sketch = Literal['gaussian', 'rademacher']


def sketch_setting(sketch: Sketch) -> dict[str, str]:
  """What a state records of its sketch: nothing for the default Gaussian.

  States from before the choice existed hold Gaussian projections and no
  record; a state compressed with another sketch must not be read with
  Gaussian projectors, nor the other way round.
  """
  validation.check_choice('sketch', sketch, Sketch)
  return {} if sketch == 'gaussian' else {'sketch': sketch}


def sample_projector(key: jax.Array, shape: tuple[int, ...],
                     sketch: Sketch = 'gaussian') -> jax.Array:
  """One random ``(dim, r)`` projector with ``E[Q Qᵀ] = I``, float32.

  ``'gaussian'``: entries ``N(0, 1/r)`` (the paper's). ``'rademacher'``:
  entries ``±1/sqrt(r)`` with equal probability, from packed random bits
  (one 32-bit word per 32 entries, against one per entry and an inverse
  error function for a Gaussian). Both are unbiased and both satisfy the
  Johnson-Lindenstrauss lemma (Achlioptas 2003), which is what Flora's
  analysis uses of the Gaussian.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flora_jax import projections
    >>> q = projections.sample_projector(jax.random.key(0), (6, 4),
    ...                                  'rademacher')
    >>> sorted(set(jnp.abs(q).ravel().tolist()))
    [0.5]
  """
  dim, rank = shape
  scale = 1.0 / math.sqrt(rank)
  if sketch == 'gaussian':
    return jax.random.normal(key, shape) * scale
  validation.check_choice('sketch', sketch, Sketch)
  words = jax.random.bits(key, (dim, -(-rank // 32)), jnp.uint32)
  bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  bits = bits.reshape(dim, -1)[:, :rank]
  return jnp.where(bits == 1, scale, -scale).astype(jnp.float32)


def gaussian_projector(
    key: jax.Array, plan: LeafPlan, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
  """Draws ``Q`` of shape ``plan.projector_shape`` with entries N(0, 1/r).

  With this scale ``E[Q Qᵀ] = I``, so ``up(down(G))`` is an unbiased estimate
  of ``G``. Each stacked slice ``s`` gets its own draw, from
  ``fold_in(key, s)`` (see `flora_jax.projections.normal_per_slice`).

  Args:
    key: a typed PRNG key.
    plan: the leaf's `LeafPlan` (must be projected).
    dtype: the projector's dtype.

  Returns:
    ``Q``, shape ``plan.projector_shape``.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(64).leaf_plan('w', (256, 512))
    >>> q = projections.gaussian_projector(jax.random.key(0), plan)
    >>> q.shape, round(float(jnp.var(q)) * 64, 1)  # entries N(0, 1/r)
    ((256, 64), 1.0)
  """
  scale = 1.0 / math.sqrt(plan.projector_shape[-1])
  draw = keys.normal_per_slice(key, plan.batch_shape,
                               plan.projector_shape[-2:], dtype)
  return draw * jnp.asarray(scale, dtype)


def _check_side(side: str) -> None:
  validation.check_choice('side', side, _SIDES)


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
  """``down(X)``: ``Qᵀ X`` (side 'left') or ``X Q`` (side 'right').

  Args:
    q: the projector, ``(..., dim, r)``.
    x: a full-size matrix (or stack of them), ``(..., m, n)``; cast to
      ``q.dtype``.
    side: ``'left'`` or ``'right'``, as in the leaf's `LeafPlan`.

  Returns:
    ``(..., r, n)`` for side 'left', ``(..., m, r)`` for side 'right'.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(4, min_dim=8).leaf_plan('w', (16, 32))
    >>> q = projections.gaussian_projector(jax.random.key(0), plan)
    >>> projections.project_down(q, jnp.ones((16, 32)), plan.side).shape
    (4, 32)
  """
  _check_side(side)
  x = x.astype(q.dtype)
  x_spec, q_spec = compat.explicit_spec(x), compat.explicit_spec(q)
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
  """``up(C)``: ``Q C`` (side 'left') or ``C Qᵀ`` (side 'right').

  Args:
    q: the projector, ``(..., dim, r)``.
    c: a low-rank matrix from `project_down`; cast to ``q.dtype``.
    side: ``'left'`` or ``'right'``, as in the leaf's `LeafPlan`.

  Returns:
    The full-size ``(..., m, n)`` matrix.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(4, min_dim=8).leaf_plan('w', (32, 16))
    >>> q = projections.gaussian_projector(jax.random.key(0), plan)
    >>> low = projections.project_down(q, jnp.ones((32, 16)), plan.side)
    >>> low.shape, projections.project_up(q, low, plan.side).shape
    ((32, 4), (32, 16))
  """
  _check_side(side)
  c = c.astype(q.dtype)
  q_spec, c_spec = compat.explicit_spec(q), compat.explicit_spec(c)
  if side == 'left':
    out = _outer_sharding(c_spec[:-2], q_spec[-2], c_spec[-1])
    return jnp.einsum('...mr,...rn->...mn', q, c, out_sharding=out)
  out = _outer_sharding(c_spec[:-2], c_spec[-2], q_spec[-2])
  return jnp.einsum('...mr,...nr->...mn', c, q, out_sharding=out)


def change_basis(
    q_old: jax.Array,
    q_new: jax.Array,
    c: jax.Array,
    side: str,
    *,
    least_squares: bool = False,
) -> jax.Array:
  r"""Moves ``C`` from the subspace of ``q_old`` into that of ``q_new``.

  Through ``r x r`` matrices only, never a full-size one. With
  ``O = Q_newᵀ Q_old``, side 'left':

  .. math::

    \text{least\_squares=False:}\quad C' = O C
      = \mathrm{down}_{new}(\mathrm{up}_{old}(C)); \qquad
    \text{least\_squares=True:}\quad C' = (Q_{new}^\top Q_{new})^{-1} O C
      = \arg\min_X \lVert \mathrm{up}_{new}(X)
        - \mathrm{up}_{old}(C) \rVert_F

  (side 'right': ``C Oᵀ`` and ``C Oᵀ (Q_newᵀ Q_new)⁻¹``). The two agree
  for orthonormal ``q_new`` (GaLore's projectors). For Gaussian ones
  (Flora's) they differ: ``up_new`` of the least-squares ``C'`` is the
  orthogonal projection of ``up_old(C)`` onto the new subspace, so its norm
  never grows, while ``down_new(up_old(C))`` grows the norm by about
  ``sqrt(dim / r)`` per change.

  Args:
    q_old: the projector ``c`` was taken with, ``(..., dim, r)``.
    q_new: the projector to move into, same shape.
    c: the low-rank matrix, as `project_down` returns it.
    side: ``'left'`` or ``'right'``.
    least_squares: solve for the best fit in the new subspace instead of
      applying ``down_new`` to ``up_old(C)``.

  Returns:
    ``c`` in the new basis, same shape, in ``q_new.dtype``.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(4, min_dim=8).leaf_plan('w', (16, 32))
    >>> q0, q1 = (projections.random_projector(jax.random.key(0), plan, i)
    ...           for i in (0, 1))
    >>> c = jnp.ones(plan.low_rank_shape)
    >>> through_full = projections.project_down(
    ...     q1, projections.project_up(q0, c, 'left'), 'left')
    >>> bool(jnp.allclose(projections.change_basis(q0, q1, c, 'left'),
    ...                   through_full, atol=1e-5))
    True
    >>> moved = projections.change_basis(
    ...     q0, q1, c, 'left', least_squares=True)
    >>> def norm(q, c):
    ...   return jnp.linalg.norm(projections.project_up(q, c, 'left'))
    >>> bool(norm(q1, moved) <= norm(q0, c))
    True
  """
  _check_side(side)
  validation.check_bool('least_squares', least_squares)
  transition = basis_change_matrix(q_old, q_new, least_squares=least_squares)
  return apply_basis_change(transition, c.astype(q_new.dtype), side)


def basis_change_matrix(
    q_old: jax.Array, q_new: jax.Array, *, least_squares: bool
) -> jax.Array:
  """The ``r x r`` matrix of `change_basis`: ``O`` or ``G⁻¹ O``.

  ``O = Q_newᵀ Q_old`` and ``G = Q_newᵀ Q_new``, ``(..., r, r)``.
  """
  transition = gram(q_new, q_old)
  if least_squares:
    # r x r, so C keeps its sharding. G is symmetric positive definite
    # (Q_new has full column rank): Cholesky, which also compiles faster
    # than a general solve, for every leaf that moves on its own.
    factor = jax.scipy.linalg.cho_factor(gram(q_new, q_new))
    transition = jax.scipy.linalg.cho_solve(factor, transition)
  return transition


def apply_basis_change(transition: jax.Array, c: jax.Array,
                       side: str) -> jax.Array:
  """``T C`` (side 'left') or ``C Tᵀ`` (side 'right'), see `change_basis`."""
  if side == 'left':
    return jnp.einsum('...rs,...sn->...rn', transition, c)
  # C Oᵀ G⁻¹ = C (G⁻¹ O)ᵀ, G being symmetric.
  return jnp.einsum('...ms,...rs->...mr', c, transition)


def gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """``aᵀ b`` over the full-size axis of two projectors, ``(..., r, r)``.

  Replicated, also where the full-size axis is sharded (Explicit sharding
  needs the layout of a product over a sharded axis spelled out).
  """
  a_spec, b_spec = compat.explicit_spec(a), compat.explicit_spec(b)
  return jnp.einsum(
      '...dr,...ds->...rs', a, b.astype(a.dtype),
      out_sharding=_reduced_sharding((a_spec[-2], b_spec[-2]),
                                     a_spec[:-2] + (None, None)),
  )


def random_projector(
    key: jax.Array, plan: LeafPlan, index: jax.Array,
    sketch: Sketch = 'gaussian',
) -> jax.Array:
  """The random projector number ``index`` of a leaf, regenerated.

  This is how Flora never stores a projector: the same ``(key, path,
  index)`` always gives the same ``Q`` (`sample_projector` with the key
  from `projection_key`, folded with the slice number for each slice of a
  stacked leaf; for ``'gaussian'``, `gaussian_projector` of that key).

  Args:
    key: the transform's base key (typed).
    plan: the leaf's `LeafPlan` (must be projected).
    index: which projector (Flora: ``count // kappa``); may be traced.
    sketch: ``'gaussian'`` or ``'rademacher'``, see `sample_projector`.

  Returns:
    ``Q``, shape ``plan.projector_shape``, float32.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(4, min_dim=8).leaf_plan('w', (16, 32))
    >>> key = jax.random.key(0)
    >>> again = projections.random_projector(key, plan, 3)
    >>> bool(jnp.all(projections.random_projector(key, plan, 3) == again))
    True
  """
  shape = plan.projector_shape[-2:]
  return keys.per_slice(lambda k: sample_projector(k, shape, sketch),
                        keys.projection_key(key, plan.path, index),
                        plan.batch_shape)


def random_projectors(key: jax.Array, plans: Any, index: jax.typing.ArrayLike,
                      sketch: Sketch = 'gaussian') -> Any:
  """`random_projector` number ``index`` of every projected leaf, at once.

  The same values as one `random_projector` call per leaf, drawn by
  `draw_stacks`: one generator in the compiled program per projector shape
  instead of one per leaf.

  Args:
    key: the transform's base key (typed).
    plans: a tree of `LeafPlan`.
    index: which projector (Flora: ``count // kappa``); may be traced.
    sketch: ``'gaussian'`` or ``'rademacher'``, see `sample_projector`.

  Returns:
    A tree with the structure of ``plans``: ``Q`` (``plan.projector_shape``,
    float32) for each projected leaf, None for the others.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> rule = flora_jax.ProjectionRule(4, min_dim=8)
    >>> plans = rule.plan({'a': jnp.zeros((16, 32)),
    ...                    'b': jnp.zeros((3, 32, 16))})
    >>> key = jax.random.key(0)
    >>> drawn = projections.random_projectors(key, plans, 2)
    >>> bool(jnp.allclose(drawn['b'], projections.random_projector(
    ...     key, plans['b'], 2)))
    True
  """
  return unstack(plans, draw_stacks(key, plans, index, sketch))


def projector_groups(plans: Any) -> dict[tuple[int, ...], list[int]]:
  """Projected leaves by projector shape ``(dim, r)``.

  Values are positions in ``jax.tree.leaves(plans)``, in tree order; a
  group's stack (`draw_stacks`) holds their slices in that order.
  """
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, plan in enumerate(jax.tree.leaves(plans)):
    if plan.projected:
      groups.setdefault(plan.projector_shape[-2:], []).append(i)
  return groups


def draw_stacks(
    key: jax.Array, plans: Any, index: jax.typing.ArrayLike,
    sketch: Sketch = 'gaussian',
) -> dict[tuple[int, ...], jax.Array]:
  """The random projectors of ``plans``, one stack per projector shape.

  ``draw_from_keys(stack_keys(key, plans, [index])[0], sketch)``: each
  slice's values are those of `random_projector`.

  The draws depend on the state alone, so in a train step XLA may make
  them before the backward pass and hold them through it: ``dim x r``
  numbers per projected matrix, no more than its compressed state. Making
  them wait for the updates instead would hold every gradient until the
  last one exists.

  Returns:
    ``{(dim, r): rows}``, ``rows`` of shape ``(slices, dim, r)``, float32,
    the slices of each group of `projector_groups` in its order.
  """
  return draw_from_keys(stack_keys(key, plans, [index])[0], sketch)


def draw_from_keys(
    row_keys: dict[tuple[int, ...], jax.Array], sketch: Sketch = 'gaussian'
) -> dict[tuple[int, ...], jax.Array]:
  """One projector per key, ``{(dim, r): keys (rows,)} -> (rows, dim, r)``.

  One loop over the rows (`jax.lax.map`) per shape, so that the compiled
  program holds one generator per shape. The compiler's time goes into
  each generator it is given: drawn per leaf, Flora's update compiled 40x
  slower than AdamW's on a LLaMA tree (one shape, ~10 projected leaves per
  layer); batched with `jax.vmap` instead of a loop, XLA fuses the
  generator into each leaf's slice of the batch again.
  """
  return {shape: jax.lax.map(
      lambda k, shape=shape: sample_projector(k, shape, sketch), rows)
          for shape, rows in row_keys.items()}


def stack_keys(
    key: jax.Array, plans: Any, indices: Any
) -> list[dict[tuple[int, ...], jax.Array]]:
  """The key of every projector slice of ``plans``, for several indices.

  Those `random_projector` uses: the leaf's `keys.projection_key`, folded
  with the slice number where the leaf is stacked. Every key of every
  index comes out of the same two or three batched derivations (each a
  hash the compiler would otherwise be given again per leaf, or per
  index).

  Args:
    key: the transform's base key (typed).
    plans: a tree of `LeafPlan`.
    indices: a sequence of projector indices (possibly traced).

  Returns:
    One ``{(dim, r): keys}`` per index, ``keys`` of shape ``(rows,)`` in
    the order of `draw_stacks`.
  """
  flat_plans = jax.tree.leaves(plans)
  groups = projector_groups(plans)
  ordered = [flat_plans[i] for members in groups.values() for i in members]
  if not ordered:
    return [{} for _ in indices]
  path_ids = jnp.asarray([keys.path_id(plan.path) for plan in ordered],
                         jnp.uint32)
  leaf_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, path_ids)
  indices = jnp.stack([jnp.asarray(i, jnp.int32) for i in indices])
  leaf_keys = jax.vmap(
      jax.vmap(jax.random.fold_in, in_axes=(0, None)), in_axes=(None, 0)
  )(leaf_keys, indices)  # (indices, leaves)
  counts = [math.prod(plan.batch_shape) for plan in ordered]
  rows = _fold_slices(leaf_keys[:, np.repeat(np.arange(len(ordered)),
                                             counts)], ordered, counts)
  bounds = np.cumsum([0] + [sum(math.prod(flat_plans[i].batch_shape)
                                for i in members)
                            for members in groups.values()])
  return [{shape: per_index[start:stop] for shape, start, stop in
           zip(groups, bounds[:-1], bounds[1:], strict=True)}
          for per_index in rows]


def _fold_slices(row_keys: jax.Array, plans: list[LeafPlan],
                 counts: list[int]) -> jax.Array:
  """``row_keys`` folded with the slice numbers of the stacked leaves."""
  stacked = np.repeat([bool(plan.batch_shape) for plan in plans], counts)
  if not stacked.any():
    return row_keys
  slices = jnp.concatenate([
      keys.slice_numbers(plan.batch_shape) if plan.batch_shape
      else jnp.zeros((1,), jnp.int32) for plan in plans])
  folded = jax.vmap(jax.vmap(jax.random.fold_in), in_axes=(0, None))(
      row_keys, slices)
  if stacked.all():
    return folded
  data = jnp.where(stacked[:, None], jax.random.key_data(folded),
                   jax.random.key_data(row_keys))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(row_keys))


def unstack(plans: Any, stacks: dict[tuple[int, ...], jax.Array]) -> Any:
  """Splits per-shape stacks of rows (`draw_stacks`) into a tree of leaves.

  Row stacks ``(slices, a, b)`` become ``plan.batch_shape + (a, b)`` per
  projected leaf; None for the others.
  """
  flat_plans, treedef = jax.tree.flatten(plans)
  out: list[jax.Array | None] = [None] * len(flat_plans)
  for shape, members in projector_groups(plans).items():
    start = 0
    for i in members:
      plan = flat_plans[i]
      rows = math.prod(plan.batch_shape)
      stack = stacks[shape]
      out[i] = stack[start:start + rows].reshape(
          plan.batch_shape + stack.shape[1:])
      start += rows
  return jax.tree.unflatten(treedef, out)


def stack(plans: Any, tree: Any) -> dict[tuple[int, ...], jax.Array]:
  """The inverse of `unstack`: per-leaf arrays into per-shape row stacks.

  ``tree`` holds, per projected leaf, an array of shape
  ``plan.batch_shape + rest``; the result ``{(dim, r): (slices,) + rest}``
  in the row order of `draw_stacks`.
  """
  flat_plans = jax.tree.leaves(plans)
  flat = jax.tree.leaves(tree)
  assert len(flat) == sum(plan.projected for plan in flat_plans)
  by_plan = dict(zip([i for i, plan in enumerate(flat_plans) if plan.projected],
                     flat, strict=True))
  return {shape: jnp.concatenate([
      by_plan[i].reshape((-1,) + by_plan[i].shape[
          len(flat_plans[i].batch_shape):]) for i in members])
          for shape, members in projector_groups(plans).items()}


# ------------------------------------- projectors fitted to a gradient
#
# Both return Q of shape plan.projector_shape in float32 with orthonormal
# columns spanning (an estimate of) the top-r singular subspace of the
# compressed axis. Stacked slices go through `compat.each_matrix`, never
# vmap, so a `lax.cond` around them stays a real branch.


def gather_matrix_axes(x: jax.Array) -> jax.Array:
  """Replicates the last two axes of ``x`` where its sharding is Explicit.

  Decompositions (SVD, QR) need whole matrices; under
  `jax.sharding.AxisType.Explicit` they refuse sharded matrix axes instead
  of gathering them. Leading (stacked-slice) axes keep their sharding. With
  Auto axes the compiler inserts the gather itself, so ``x`` is returned
  as it is.
  """
  spec = compat.explicit_spec(x)
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

  Args:
    g: the gradient, ``(..., m, n)``.
    plan: its `LeafPlan` (must be projected).
    canonical_signs: apply `canonicalize_signs`.

  Returns:
    ``Q`` with orthonormal columns, ``plan.projector_shape``, float32.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(2, min_dim=4).leaf_plan('w', (6, 8))
    >>> g = jax.random.normal(jax.random.key(0), (6, 8))
    >>> q = projections.svd_projector(g, plan)
    >>> q.shape, bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
    ((6, 2), True)
  """
  rank = plan.projector_shape[-1]

  def fit(g):
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    if plan.side == 'left':
      return u[..., :, :rank]
    return jnp.swapaxes(vh[..., :rank, :], -1, -2)

  q = compat.each_matrix(fit, gather_matrix_axes(g.astype(jnp.float32)))
  q = _pad_columns(q, rank)
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
  ``Y = A Ω`` with a Gaussian ``Ω`` of ``r + oversampling`` columns
  (hashed from the key, see below), refine
  it with ``power_iterations`` QR-stabilised passes of ``A Aᵀ``, then take the
  top ``r`` left singular vectors of the small matrix ``Qᵀ A``. Here ``A`` is
  ``g`` (side 'left') or ``gᵀ`` (side 'right'). The cost is
  ``O(m n (r + p) (2 q + 2))`` flops against ``O(m n min(m, n))`` for a full
  SVD.

  ``Ω``'s normals come from Box-Muller on a hash of each entry's index and
  the key, not from `jax.random.normal`'s threefry draw: the same
  distribution up to 16-bit uniforms, and a fit that compiles several
  times faster (each refit is its own branch of the compiled update, with
  its own generator). The fitted projectors are stored, so no state needs
  the draw again to be read.

  Args:
    key: a PRNG key for the sketch ``Ω`` (typed, raw ``uint32[2]`` or an
      int seed); slice ``s`` of a stacked leaf draws from
      ``fold_in(key, s)``. Or the slices' typed keys themselves, an array
      of shape ``plan.batch_shape``.
    g: the gradient, ``(..., m, n)``.
    plan: its `LeafPlan` (must be projected).
    power_iterations: q, the number of refining passes.
    oversampling: p, extra sketch columns beyond r.
    canonical_signs: apply `canonicalize_signs`.

  Returns:
    ``Q`` with orthonormal columns, ``plan.projector_shape``, float32.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from flora_jax import projections
    >>> plan = flora_jax.ProjectionRule(2, min_dim=4).leaf_plan('w', (64, 48))
    >>> u = jax.random.normal(jax.random.key(0), (64, 2))
    >>> g = u @ jax.random.normal(jax.random.key(1), (2, 48))  # rank 2
    >>> q = projections.randomized_projector(jax.random.key(2), g, plan)
    >>> exact = projections.svd_projector(g, plan)
    >>> bool(jnp.allclose(jnp.abs(q.T @ exact), jnp.eye(2), atol=1e-4))
    True
  """
  rank = plan.projector_shape[-1]
  a = gather_matrix_axes(g.astype(jnp.float32))
  if plan.side == 'right':
    a = jnp.swapaxes(a, -1, -2)
  rows, cols = a.shape[-2:]
  width = min(rank + oversampling, rows)
  if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = keys.as_prng_key(key)  # a raw uint32[2] key or an int seed
  if key.shape not in ((), plan.batch_shape):
    raise ValueError(
        f'randomized_projector of {plan.path}: key must be one key or one'
        f' per stacked slice, shape {plan.batch_shape}; got shape'
        f' {key.shape}.')

  if not key.shape:
    key = keys.slice_keys(key, plan.batch_shape)
  omega = jax.vmap(lambda k: keys.hashed_normal(k, (cols, width)))(
      key.reshape(-1)).reshape(plan.batch_shape + (cols, width))

  def transpose(x):
    return jnp.swapaxes(x, -1, -2)

  def fit(a, omega):
    sketch = a @ omega
    for _ in range(power_iterations):
      basis, _ = jnp.linalg.qr(sketch)
      co_basis, _ = jnp.linalg.qr(transpose(a) @ basis)
      sketch = a @ co_basis
    basis, _ = jnp.linalg.qr(sketch)
    u_small, _, _ = jnp.linalg.svd(transpose(basis) @ a, full_matrices=False)
    return basis @ u_small[..., :, :rank]

  q = _pad_columns(compat.each_matrix(fit, a, omega), rank)
  return canonicalize_signs(q) if canonical_signs else q


def canonicalize_signs(q: jax.Array) -> jax.Array:
  """Flips each column of ``q`` so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign and LAPACK, cuSOLVER and TPU
  kernels choose differently. Moments carried across a refresh make the sign
  matter, so a fixed rule keeps trajectories identical across backends.

  Args:
    q: projectors, ``(..., dim, r)``.

  Returns:
    ``q`` with some columns negated.

  Example:
    >>> import jax.numpy as jnp
    >>> from flora_jax import projections
    >>> projections.canonicalize_signs(jnp.array([[0.1, 0.5], [-0.9, 0.2]]))
    Array([[-0.1,  0.5],
           [ 0.9,  0.2]], dtype=float32)
  """
  pivot_index = jnp.argmax(jnp.abs(q), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(q, pivot_index, axis=-2)
  return q * jnp.where(pivot < 0, -1.0, 1.0).astype(q.dtype)


def _pad_columns(q: jax.Array, rank: int) -> jax.Array:
  missing = rank - q.shape[-1]
  if missing == 0:
    return q
  return jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, missing)])


