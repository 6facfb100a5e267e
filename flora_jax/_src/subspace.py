"""GaLore: any optax optimizer inside a low-rank gradient subspace.

GaLore (Zhao et al., ICML 2024, https://arxiv.org/abs/2403.03507) runs the
optimizer on ``R = down(G)``, the projection of each matrix gradient onto the
span of its top-``r`` singular vectors, refreshed every ``T`` steps, and
applies ``scale * up(N)`` where ``N`` is the optimizer's low-rank output. The
optimizer state of an ``m x n`` matrix shrinks from ``2 m n`` (Adam) to a
``dim x r`` projector plus the moments of an ``r x n`` (or ``m x r``) matrix.

The wrapper here is the one code path of GaLore and Fira (`FiraResidual`
adds Fira's residual, see ``fira.py``). Where the projectors come from is a
projector source: fitted to the gradient at refreshes and stored (``'svd'``,
``'randomized'``), or Flora's Gaussian projection regenerated from the key
(``'random'``). The optimizer aliases `galore` and `fira` are in ``alias.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_jax._src import compat
from flora_jax._src import deprecation
from flora_jax._src import keys
from flora_jax._src import projection
from flora_jax._src import projectors
from flora_jax._src import settings
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.fira import FiraResidual
from flora_jax._src.fira import Formulation
from flora_jax._src.projection import LeafPlan
from flora_jax._src.projection import ProjectionRule

ProjectorName = Literal['svd', 'randomized', 'random']

# Fields of optax states that hold a first moment, moved into the new
# subspace by `transfer_moments` (adam, adamw, lion, belief, trace, sgd...).
_FIRST_MOMENT_FIELDS = ('mu', 'trace')


class GaLoreState(NamedTuple):
  """State of `scale_by_galore` and `scale_by_fira`."""

  count: jax.Array  # int32[]: updates so far; refresh when count % T == 0.
  key: jax.Array  # key[]: seeds the 'randomized' and 'random' projectors.
  # Per projected leaf, for the fitted projectors ('svd', 'randomized'): Q,
  # f32[..., dim, r], all zeros until the leaf's first usable gradient.
  # optax.MaskedNode() for leaves that are not projected and for the
  # 'random' projector, which is regenerated from `key` instead of stored.
  projectors: optax.Params
  # The inner optimizer's state, initialised on the low-rank shapes
  # (..., r, n) / (..., m, r) of projected leaves and on the full shapes of
  # the others.
  inner_state: optax.OptState
  # Fira's limiter, per projected leaf: the norm of the last (limited)
  # residual of each stacked slice, f32[...], +inf before the first step.
  # optax.MaskedNode() otherwise.
  residual_norms: optax.Params
  # {'update_proj_gap=... projector=... plans=...': int8[]}: what the state
  # was made for; `update` refuses a state made for other settings.
  settings: dict[str, jax.Array]


@deprecation.flat_projection_arguments
def scale_by_galore(
    inner: optax.GradientTransformation,
    rule: ProjectionRule | int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projector: ProjectorName = 'svd',
    key: keys.PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
    residual: FiraResidual | None = None,
) -> optax.GradientTransformation:
  r"""Runs ``inner`` in the low-rank gradient subspace of each projected matrix.

  For a projected leaf ``G`` (see `flora_jax.ProjectionRule`) with projector
  ``Q`` (``dim x r``, orthonormal columns):

  .. math::

    R_t = \mathrm{down}(G_t) = Q^\top G_t \;\text{(side 'left')}
      \;\text{or}\; G_t Q \;\text{(side 'right')}, \qquad
    N_t, s_t = \mathrm{inner.update}(R_t, s_{t-1}), \qquad
    \text{output}_t = \text{scale} \cdot \mathrm{up}(N_t).

  ``Q`` is refitted on steps ``1, T+1, 2T+1, ...`` (``count % T == 0``)
  inside one `jax.lax.cond`, so the factorisation runs only then, also for
  stacked ``(L, m, n)`` leaves (batched linear algebra, not ``vmap``). A
  slice whose gradient is zero or not finite at a refresh keeps its previous
  projector; a slice that never had one is refitted at the next step. Leaves
  that are not projected go through ``inner`` at full size, unscaled.

  A leaf the rule selects is projected only if that shrinks its state: the
  stored projector (and Fira's norms) plus ``inner``'s state of the
  low-rank shape must not exceed ``inner``'s state of the full shape
  (measured with `jax.eval_shape` of ``inner.init``). A rank close to the
  matrix size, or an ``inner`` without per-leaf state such as `optax.sgd`,
  then leaves the leaf exact.

  ``inner`` sees low-rank projections, which have no parameter values: its
  ``params`` are the low-rank shapes as `jax.ShapeDtypeStruct`, enough for
  optimizers that read only shapes (`optax.scale_by_factored_rms`). One that
  needs values is refused at ``init``; put weight decay, trust ratios and
  the like after this transform, as `galore` does.

  Args:
    inner: any `optax.GradientTransformation` that needs no parameter values,
      e.g. `optax.scale_by_adam`, `scale_by_adam_hf`,
      `optax.scale_by_lion`, `optax.scale_by_factored_rms`, `optax.trace`.
    rule: which leaves are projected, on which side and at which rank: a
      `flora_jax.ProjectionRule`, or an int r for ``ProjectionRule(r)``.
      ``side='auto'`` compresses the smaller dimension, the input dimension
      on a tie, as the reference code does for PyTorch's ``(out, in)``
      weights.
    update_proj_gap: T, steps between refreshes of the projector.
    scale: the factor α applied to ``up(N)`` (GaLore's default 0.25).
    projector: ``'svd'`` (exact float32 SVD, the reference),
      ``'randomized'`` (range finder with ``power_iterations`` and
      ``oversampling``, much cheaper on large matrices) or ``'random'``
      (Flora's Gaussian ``N(0, 1/r)`` projector, regenerated from ``key``
      and never stored).
    key: an int seed, a typed key or a raw uint32 key.
    transfer_moments: at each refresh move the first moment of ``inner``
      (state fields named ``mu`` or ``trace``) into the new subspace: the
      least-squares fit of ``up_old(m)`` there, which for orthonormal
      projectors is ``down_new(up_old(m))`` and for ``'random'`` ones never
      grows the moment's norm (see `flora_jax.projections.change_basis`).
      Off by default, as in GaLore.
    canonical_signs: flip each singular vector so that its largest entry is
      positive, making results identical across backends. False reproduces
      `optax.contrib.galore` exactly.
    power_iterations: of the ``'randomized'`` projector.
    oversampling: of the ``'randomized'`` projector.
    residual: None for GaLore; a `FiraResidual` adds Fira's scaled residual
      and norm-growth limiter (that is `scale_by_fira`).

  Returns:
    An `optax.GradientTransformation` whose state is `GaLoreState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     flora_jax.scale_by_galore(optax.scale_by_lion(), 64),
    ...     optax.add_decayed_weights(1e-2),
    ...     optax.scale_by_learning_rate(1e-4),
    ... )

  References:
    Zhao et al., 2024, https://arxiv.org/abs/2403.03507
  """
  validation.check_transformation('inner', inner)
  rule = ProjectionRule.of(rule)
  update_proj_gap = validation.check_positive_or_traced(
      'update_proj_gap', update_proj_gap
  )
  validation.check_key('key', key)
  validation.check_finite_at_least('scale', scale, 0.0)
  validation.check_bool('transfer_moments', transfer_moments)
  validation.check_instance(
      'residual', residual, (FiraResidual, type(None)),
      'None or a flora_jax.FiraResidual',
  )
  source = _projector_source(
      projector, canonical_signs, power_iterations, oversampling
  )

  def plan(tree):
    tree = tree_util.unwrap_variables(tree)
    return _unproject_where_state_grows(
        rule.plan(tree), tree, inner, source, residual
    )

  def recorded_settings(plans):
    # Only regenerated projectors carry data compressed with a draw.
    draws = keys.stacked_draws_setting(plans) if projector == 'random' else {}
    return dict(plans=plans, update_proj_gap=update_proj_gap,
                projector=projector, **draws)

  announce = projection.plan_announcer(
      'flora_jax.scale_by_fira' if residual else 'flora_jax.scale_by_galore'
  )

  def init_fn(params):
    params = tree_util.unwrap_variables(params)
    plans = plan(params)
    announce(plans)
    return _initial_state(inner, plans, source, residual, key, params,
                          settings.record(**recorded_settings(plans)))

  def update_fn(updates, state, params=None):
    validation.check_updates_match_params(updates, params)
    validation.check_same_paths(
        updates,
        jax.tree.map(lambda _: 0, state.projectors, is_leaf=_is_masked_node),
        'the projectors',
    )
    # The parameters' dtypes decided at init what is projected; gradients
    # normally share them, but may be cast.
    plans = plan(updates if params is None else params)
    _check_inner_state_shapes(inner, plans, state.inner_state)
    settings.check(state.settings, **recorded_settings(plans))
    stored, current, inner_state = source.advance(
        plans, updates, state, update_proj_gap, transfer_moments
    )
    low_rank = jax.tree.map(_project, plans, updates, current)
    inner_updates, inner_state = inner.update(
        low_rank, inner_state, _shapes_only(low_rank)
    )
    output = functools.partial(_output, scale=scale, residual=residual)
    results = jax.tree.map(
        output, plans, updates, current, low_rank, inner_updates,
        state.residual_norms,
    )
    new_updates, residual_norms = tree_util.unzip_leaves(plans, results, 2)
    return new_updates, GaLoreState(
        count=compat.safe_increment(state.count),
        key=state.key,
        projectors=stored,
        inner_state=inner_state,
        residual_norms=residual_norms,
        settings=state.settings,
    )

  return optax.GradientTransformation(init_fn, update_fn)


@deprecation.flat_projection_arguments
def scale_by_fira(
    inner: optax.GradientTransformation,
    rule: ProjectionRule | int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    formulation: Formulation = 'code',
    growth_limit: float | None = 1.01,
    projector: ProjectorName = 'svd',
    key: keys.PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
) -> optax.GradientTransformation:
  r"""`scale_by_galore` plus Fira's scaled residual and norm-growth limiter.

  The same transform as ``scale_by_galore(inner, rule, ...,
  residual=FiraResidual(formulation, growth_limit))``; see `FiraResidual`
  for the residual's two formulations and the limiter. The limiter sees the
  residual as ``inner`` scales it: with `fira` the bias correction is
  applied afterwards, as in the code; an inner `optax.scale_by_adam`
  includes it, as in the paper.

  Args:
    inner: as in `scale_by_galore`.
    rule: as in `scale_by_galore`.
    update_proj_gap: as in `scale_by_galore`.
    scale: as in `scale_by_galore`.
    formulation: ``'code'`` (the published code) or ``'paper'``.
    growth_limit: γ >= 1 of the norm-growth limiter, or None for no limiter.
    projector: as in `scale_by_galore`.
    key: as in `scale_by_galore`.
    transfer_moments: as in `scale_by_galore`.
    canonical_signs: as in `scale_by_galore`.
    power_iterations: as in `scale_by_galore`.
    oversampling: as in `scale_by_galore`.

  Returns:
    An `optax.GradientTransformation` whose state is `GaLoreState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     flora_jax.scale_by_fira(optax.scale_by_adam(), 64),
    ...     optax.scale_by_learning_rate(1e-3),
    ... )

  References:
    Chen et al., 2024, https://arxiv.org/abs/2410.01623
  """
  return scale_by_galore(
      inner,
      rule,
      update_proj_gap=update_proj_gap,
      scale=scale,
      projector=projector,
      key=key,
      transfer_moments=transfer_moments,
      canonical_signs=canonical_signs,
      power_iterations=power_iterations,
      oversampling=oversampling,
      residual=FiraResidual(formulation, growth_limit),
  )


def _initial_state(inner, plans, source, residual, key, params,
                   recorded) -> GaLoreState:
  low_rank = _low_rank_params(plans, params)
  inner_state = inner.init(low_rank)
  _check_inner_runs_on_shapes(inner, low_rank, inner_state)
  return GaLoreState(
      count=jnp.zeros([], jnp.int32),
      key=keys.as_prng_key(key),
      projectors=jax.tree.map(source.initial, plans),
      inner_state=inner_state,
      residual_norms=jax.tree.map(
          residual.initial_norm if residual else _masked_node, plans
      ),
      settings=recorded,
  )


def _low_rank_params(plans, params):
  """What ``inner`` is initialised on: f32 zeros of each low-rank shape."""
  return jax.tree.map(
      lambda plan, p: jnp.zeros(plan.low_rank_shape, jnp.float32)
      if plan.projected else p,
      plans, params,
  )


def _low_rank_shapes(plans):
  """The shapes ``inner`` works on: each leaf's low-rank shape, float32."""
  return jax.tree.map(
      lambda plan: jax.ShapeDtypeStruct(plan.low_rank_shape, jnp.float32),
      plans,
  )


def _unproject_where_state_grows(plans, tree, inner, source, residual):
  """Leaves exact every leaf whose state projecting would not shrink.

  A function of the shapes and dtypes of ``tree`` (the parameters), so
  `init` and `update` agree. A projected leaf's inner state is float32 (the
  low-rank arithmetic is), an unprojected one's follows the parameter.
  """
  if not any(plan.projected for plan in jax.tree.leaves(plans)):
    return plans
  full = jax.tree.map(
      lambda plan, x: jax.ShapeDtypeStruct(plan.shape, jnp.result_type(x)),
      plans, tree,
  )
  low = _low_rank_shapes(plans)
  full_bytes, low_bytes = (
      tree_util.bytes_per_parameter(jax.eval_shape(inner.init, shapes), full)
      for shapes in (full, low)
  )

  def keep(key_path, plan):
    if not plan.projected:
      return plan
    extra = 4 * math.prod(plan.batch_shape) if residual else 0
    if source.stores_projectors:
      extra += 4 * math.prod(plan.projector_shape)
    path = tree_util.path_parts(key_path)
    if low_bytes[path] + extra <= full_bytes[path]:
      return plan
    return LeafPlan(plan.path, plan.shape, reason=(
        f'no saving: projected, its state would take'
        f' {low_bytes[path] + extra:,} bytes, {full_bytes[path]:,} full-size'))

  return jax.tree.map_with_path(keep, plans)


def _check_inner_state_shapes(inner, plans, inner_state) -> None:
  """Names the leaf whose update does not fit the state made at init."""
  expected = jax.eval_shape(inner.init, _low_rank_shapes(plans))
  found = jax.tree.leaves_with_path(inner_state)
  wanted = jax.tree.leaves(expected)
  if len(found) != len(wanted):
    return  # A structural difference: `settings.check` explains it.
  for (key_path, leaf), want in zip(found, wanted, strict=True):
    if np.shape(leaf) != want.shape:
      raise ValueError(
          f'The inner optimizer state at {jax.tree_util.keystr(key_path)}'
          f' has shape {np.shape(leaf)}, but the updates need'
          f' {want.shape}: the updates do not match the parameters the'
          ' optimizer was initialised with (a transposed or resized leaf?).'
      )


def _masked_node(_: Any) -> optax.MaskedNode:
  return optax.MaskedNode()


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _project(plan: LeafPlan, g: jax.Array, q: Any) -> jax.Array:
  if plan.side is None:
    return g
  return projectors.project_down(q, g, plan.side)


def _output(plan, g, q, low_rank, inner_update, previous_norm, *, scale,
            residual):
  """One leaf's update and limiter norm (unchanged for unprojected leaves)."""
  if not plan.projected:
    return inner_update, previous_norm
  if residual is None:
    back = projectors.project_up(q, inner_update, plan.side)
    return (scale * back).astype(g.dtype), previous_norm
  out, norm = residual.update(
      plan.side, g, q, low_rank, inner_update, scale, previous_norm
  )
  return out.astype(g.dtype), norm


def _shapes_only(tree):
  """What ``inner`` gets as ``params``: shapes and dtypes, no values."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _check_inner_runs_on_shapes(inner, low_rank, inner_state) -> None:
  """Fails at init, with advice, if ``inner.update`` needs parameter values."""
  try:
    jax.eval_shape(
        lambda u, s: inner.update(u, s, _shapes_only(u)), low_rank, inner_state
    )
  except Exception as err:  # Any failure here is the inner optimizer's own.
    raise ValueError(
        'The inner optimizer failed on the low-rank gradients. It runs on'
        ' projections, which have no parameter values: as `params` it gets'
        ' only their shapes (jax.ShapeDtypeStruct). Apply whatever needs'
        ' parameter values (weight decay, trust ratios, parameter scaling)'
        ' after the projection, e.g. optax.chain(scale_by_galore('
        'optax.scale_by_adam(), ...), optax.add_decayed_weights(1e-2),'
        ' optax.scale_by_learning_rate(lr)), or use galore(weight_decay=...).'
        f' The inner optimizer raised {type(err).__name__}: {err}'
    ) from err


# ------------------------------------------------------ projector sources
#
# A source says where a step's projectors come from. `advance` returns the
# projectors to store in the state, the ones to use at this step, and the
# inner state (its first moments moved into the new subspaces if asked).


@dataclasses.dataclass(frozen=True)
class _FittedProjectors:
  """'svd' and 'randomized': refitted to the gradient, stored in the state."""

  fit: Callable[[LeafPlan, jax.Array, jax.Array], jax.Array]  # (plan, g, key)
  stores_projectors = True

  def initial(self, plan: LeafPlan):
    if plan.projected:
      return jnp.zeros(plan.projector_shape, jnp.float32)
    return optax.MaskedNode()

  def advance(self, plans, updates, state, gap, transfer_moments):
    scheduled = state.count % gap == 0
    refresh_index = state.count // gap

    def refit(plan, g, q_old):
      """One leaf's projectors; the factorisation runs only when due."""
      if not plan.projected:
        return q_old
      missing = _never_fitted(q_old)

      def fit(g, q_old):
        q_new = self.fit(
            plan, g, keys.projection_key(state.key, plan.path, refresh_index)
        )
        usable = jnp.all(jnp.isfinite(g), axis=(-2, -1)) & jnp.any(
            g != 0, axis=(-2, -1)
        )
        usable &= jnp.all(jnp.isfinite(q_new), axis=(-2, -1))
        take = usable & (scheduled | missing)
        return jnp.where(take[..., None, None], q_new, q_old)

      # One branch per leaf, not one for all: a single branch would need
      # every gradient at once and keep them all, and every leaf's SVD
      # outputs, alive until the last factorisation ends.
      return compat.cond(scheduled | jnp.any(missing), fit,
                         lambda g, q_old: q_old, g, q_old)

    stored = jax.tree.map(refit, plans, updates, state.projectors)
    inner_state = state.inner_state
    if transfer_moments:
      # Unchanged leaves have q_old == q_new: moving their moments is a
      # no-op, so one branch for the whole state is exact.
      any_missing = jnp.any(jnp.stack([
          jnp.any(_never_fitted(q))
          for plan, q in zip(jax.tree.leaves(plans),
                             jax.tree.leaves(state.projectors,
                                             is_leaf=_is_masked_node),
                             strict=True)
          if plan.projected
      ] or [False]))
      inner_state = compat.cond(
          scheduled | any_missing,
          lambda s: _transfer_first_moments(s, plans, state.projectors,
                                            stored),
          lambda s: s,
          inner_state,
      )
    return stored, stored, inner_state


@dataclasses.dataclass(frozen=True)
class _RegeneratedProjectors:
  """'random': Flora's Gaussian projection, regenerated from the key."""

  stores_projectors = False

  def initial(self, plan: LeafPlan):
    del plan
    return optax.MaskedNode()

  def advance(self, plans, updates, state, gap, transfer_moments):
    scheduled = state.count % gap == 0
    index = state.count // gap

    def regenerate(index):
      # Each leaf's projector waits for its gradient (see `compat.after`).
      return jax.tree.map(
          lambda plan, g: projectors.random_projector(
              state.key, plan, compat.after(index, g))
          if plan.projected else None,
          plans, updates,
      )

    current = regenerate(index)
    inner_state = state.inner_state
    if transfer_moments:
      inner_state = compat.cond(
          scheduled & (state.count > 0),
          lambda s: _transfer_first_moments(
              s, plans, regenerate(index - 1), current
          ),
          lambda s: s,
          inner_state,
      )
    return state.projectors, current, inner_state


def _projector_source(projector, canonical_signs, power_iterations,
                      oversampling):
  validation.check_choice('projector', projector, ProjectorName)
  validation.check_bool('canonical_signs', canonical_signs)
  for name, value in (('power_iterations', power_iterations),
                      ('oversampling', oversampling)):
    # Arrays come from optax.inject_hyperparams (ints not in static_args);
    # only the randomized projector needs these as Python ints.
    if projector == 'randomized' or not isinstance(value, jax.Array):
      validation.check_non_negative_int(name, value)
  if projector == 'random':
    return _RegeneratedProjectors()
  if projector == 'svd':
    return _FittedProjectors(
        lambda plan, g, key: projectors.svd_projector(
            g, plan, canonical_signs=canonical_signs
        )
    )
  return _FittedProjectors(
      lambda plan, g, key: projectors.randomized_projector(
          key, g, plan, power_iterations=power_iterations,
          oversampling=oversampling, canonical_signs=canonical_signs,
      )
  )


def _never_fitted(q: jax.Array) -> jax.Array:
  """Per stacked slice: True while the stored projector is all zeros."""
  return jnp.all(q == 0, axis=(-2, -1))


def _transfer_first_moments(inner_state, plans, old_projectors, new_projectors):
  """Moves every first moment of ``inner_state`` into the new subspaces."""
  params_structure = jax.tree.structure(plans)

  def holds_moment(x):
    return isinstance(x, tuple) and any(
        f in getattr(x, '_fields', ()) for f in _FIRST_MOMENT_FIELDS
    )

  def move(plan, moment, q_old, q_new):
    if not plan.projected:
      return moment
    # Least squares: for orthonormal (fitted) projectors the same as
    # down_new(up_old(m)); for Gaussian ones ('random') the only stable
    # choice, see `change_basis`.
    moved = projectors.change_basis(
        q_old, q_new, moment, plan.side, least_squares=True
    )
    return moved.astype(moment.dtype)

  def visit(node):
    if not holds_moment(node):
      return node
    changes = {}
    for field in _FIRST_MOMENT_FIELDS:
      moment = getattr(node, field, None)
      if moment is not None and jax.tree.structure(moment) == params_structure:
        changes[field] = jax.tree.map(
            move, plans, moment, old_projectors, new_projectors
        )
    return node._replace(**changes)

  return jax.tree.map(visit, inner_state, is_leaf=holds_moment)
