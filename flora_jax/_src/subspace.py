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
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_jax._src import compat
from flora_jax._src import deprecation
from flora_jax._src import keys
from flora_jax._src import projection
from flora_jax._src import projectors
from flora_jax._src import refresh
from flora_jax._src import settings
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.fira import FiraResidual
from flora_jax._src.fira import Formulation
from flora_jax._src.projection import LeafPlan
from flora_jax._src.projection import ProjectionRule
from flora_jax._src.refresh import RefreshSchedule

ProjectorName = Literal['svd', 'randomized', 'random']

# Fields of optax states that hold a first moment, moved into the new
# subspace by `transfer_moments` (adam, adamw, lion, belief, trace, sgd...).
_FIRST_MOMENT_FIELDS = ('mu', 'trace')


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`, `scale_by_fira` and `scale_by_apollo`."""

  count: jax.Array  # int32[]: updates so far; refresh when count % T == 0.
  key: jax.Array  # key[]: seeds the 'randomized' and 'random' projectors.
  # Per projected leaf, for the fitted projectors ('svd', 'randomized'): Q,
  # f32[..., dim, r], all zeros until the leaf's first usable gradient.
  # optax.MaskedNode() for leaves that are not projected and for the
  # 'random' projector, which is regenerated from `key` instead of stored.
  # With refresh_schedule='staggered', a `StaggeredProjectors` of these
  # and each stacked slice's refresh phase.
  projectors: optax.Params
  # The inner optimizer's state, initialised on the low-rank shapes
  # (..., r, n) / (..., m, r) of projected leaves and on the full shapes of
  # the others.
  inner_state: optax.OptState
  # The norm-growth limiter of Fira (and APOLLO), per projected leaf: the
  # norm of the last (limited) residual (APOLLO: scaled gradient) of each
  # stacked slice, f32[...], +inf before the first step.
  # optax.MaskedNode() otherwise.
  residual_norms: optax.Params
  # {'update_proj_gap=... projector=... plans=...': int8[]}: what the state
  # was made for; `update` refuses a state made for other settings.
  settings: dict[str, jax.Array]


class StaggeredProjectors(NamedTuple):
  """`GaLoreState.projectors` under ``refresh_schedule='staggered'``."""

  # Per projected leaf, Q as in `GaLoreState.projectors`.
  projectors: optax.Params
  # Per projected leaf, int32[...] per stacked slice: the slice is refitted
  # when (count - phase) % T == 0 (see `refresh.staggered_phases`); fixed at
  # init from the whole tree, and kept here so that every part of it (a
  # layer of `flora_jax.fused_train_step`) refreshes on the same steps.
  phases: optax.Params


def stored_projectors(projectors: Any) -> Any:
  """The tree of Q of `GaLoreState.projectors`, staggered or not."""
  if isinstance(projectors, StaggeredProjectors):
    return projectors.projectors
  return projectors


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
    refresh_schedule: RefreshSchedule = 'synchronous',
    distribute_refresh: bool = True,
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

  With ``refresh_schedule='synchronous'`` (GaLore's and Fira's published
  schedule) every ``Q`` is refitted on steps ``1, T+1, 2T+1, ...``
  (``count % T == 0``), each leaf inside its own `jax.lax.cond`, so the
  factorisation runs only then, also for stacked ``(L, m, n)`` leaves
  (slice by slice, not ``vmap``). With ``'staggered'`` every matrix (each
  stacked slice of a leaf on its own) is fitted at the first step and then
  refitted every ``T`` steps at its own phase ``p`` (``(count - p) % T ==
  0``): the phases are spread over ``[0, T)`` by SVD cost (see
  `flora_jax._src.refresh.staggered_phases`), so that each step refits
  about ``1/T`` of the cost instead of one step in ``T`` refitting all of
  it; the phases are fixed at ``init`` and kept in the state (a
  `StaggeredProjectors`). A due slice of a stack is fitted alone, except
  where the stack's slices are sharded (Explicit sharding): there the whole
  stack is fitted, where its slices are, and the due slices kept. A slice
  whose gradient is zero or not finite at a refresh keeps its previous
  projector; a slice that never had one is
  refitted at the next step. Leaves that are not projected go through
  ``inner`` at full size, unscaled.

  Under a mesh of more than one device (``jax.set_mesh(mesh)`` around the
  traced update: `jax.sharding.get_abstract_mesh`, its axes that are not
  Manual) and with ``distribute_refresh``, a refresh shares its
  factorisations among the devices instead of every device repeating all
  of them: the gradients of the projected leaves that have the same matrix
  shape, side and rank (every stacked slice counted) are stacked, split
  over all the mesh's devices, each device fits its share one matrix at a
  time, and the projectors are gathered back into their layouts. The
  projectors are the single-device ones. The stack is a float32 copy of
  that group's gradients (``k m n`` numbers for ``k`` matrices of ``m x
  n``, split over the devices), made inside the refresh branch only, for
  one group at a time. With ``'staggered'``, steps at which a group has
  never-fitted slices (the first step) are spread this way; the few slices
  due at the other steps are fitted on every device.

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
    refresh_schedule: ``'synchronous'`` (every projector at the same steps,
      as published) or ``'staggered'`` (each stacked slice of each leaf at
      its own phase, fitted ``projector`` only; ``update_proj_gap`` must be
      a Python int). Recorded in the state's settings: a state made with
      one is refused by the other.
    distribute_refresh: share a refresh's factorisations among the devices
      of the mesh the update is traced under (see above); no effect without
      a mesh of more than one device, or with ``projector='random'``.
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
  validation.check_instance(
      'residual', residual, (FiraResidual, type(None)),
      'None or a flora_jax.FiraResidual',
  )
  return in_subspace(
      inner, rule, update_proj_gap=update_proj_gap, scale=scale,
      projector=projector, key=key, transfer_moments=transfer_moments,
      canonical_signs=canonical_signs, power_iterations=power_iterations,
      oversampling=oversampling, refresh_schedule=refresh_schedule,
      distribute_refresh=distribute_refresh, output_rule=residual,
      name='flora_jax.scale_by_fira' if residual else
      'flora_jax.scale_by_galore',
  )


class OutputRule(Protocol):
  """How a projected leaf's update is formed from ``G``, ``R`` and ``N``.

  None is GaLore's ``scale * up(N)``; `FiraResidual` adds Fira's residual;
  APOLLO scales the raw gradient (``apollo.ApolloScaling``).
  """

  def initial_norm(self, plan: LeafPlan) -> Any:
    """Per projected leaf, the state it keeps (MaskedNode for none)."""
    ...

  def update(self, side, g, q, low_rank, inner_update, scale,
             previous_norm, *, orthonormal: bool) -> tuple[jax.Array, Any]:
    """One projected leaf's float32 update (matrix view) and its state.

    ``orthonormal``: whether ``QᵀQ = I``.
    """
    ...


def in_subspace(
    inner: optax.GradientTransformation,
    rule: ProjectionRule | int,
    *,
    update_proj_gap: int,
    scale: float,
    projector: ProjectorName,
    key: keys.PRNGKeyLike,
    transfer_moments: bool,
    canonical_signs: bool,
    power_iterations: int,
    oversampling: int,
    refresh_schedule: RefreshSchedule,
    distribute_refresh: bool,
    output_rule: OutputRule | None,
    name: str,
    recorded: dict[str, Any] | None = None,
) -> optax.GradientTransformation:
  """The one code path of GaLore, Fira and APOLLO (see `scale_by_galore`).

  ``output_rule`` forms each projected leaf's update (None: GaLore's).
  ``recorded``: more settings for the state's record, for methods whose
  states have the same structure as another's.
  """
  validation.check_transformation('inner', inner)
  rule = ProjectionRule.of(rule)
  update_proj_gap = validation.check_positive_or_traced(
      'update_proj_gap', update_proj_gap
  )
  validation.check_key('key', key)
  validation.check_finite_at_least('scale', scale, 0.0)
  validation.check_bool('transfer_moments', transfer_moments)
  extra_settings = dict(recorded or {})
  staggered = _check_schedule(refresh_schedule, projector, update_proj_gap)
  source = _projector_source(
      projector, canonical_signs, power_iterations, oversampling,
      staggered=staggered,
      distribute=validation.check_bool('distribute_refresh',
                                       distribute_refresh),
  )

  def plan(tree):
    tree = tree_util.unwrap_variables(tree)
    return _unproject_where_state_grows(
        rule.plan(tree), tree, inner, source, output_rule
    )

  def recorded_settings(plans):
    # Only regenerated projectors carry data compressed with a draw.
    draws = keys.stacked_draws_setting(plans) if projector == 'random' else {}
    # Only when staggered: states of the published schedule keep the
    # settings (and checkpoints) of earlier versions.
    schedule = dict(refresh_schedule=refresh_schedule) if staggered else {}
    return dict(plans=plans, update_proj_gap=update_proj_gap,
                projector=projector, **draws, **schedule, **extra_settings)

  announce = projection.plan_announcer(name)

  def init_fn(params):
    params = tree_util.unwrap_variables(params)
    plans = plan(params)
    announce(plans)
    return _initial_state(inner, plans, source, output_rule, key, params,
                          settings.record(**recorded_settings(plans)),
                          update_proj_gap)

  def update_fn(updates, state, params=None):
    validation.check_updates_match_params(updates, params)
    validation.check_same_paths(
        updates,
        jax.tree.map(lambda _: 0, stored_projectors(state.projectors),
                     is_leaf=_is_masked_node),
        'the projectors',
    )
    # The parameters' dtypes decided at init what is projected; gradients
    # normally share them, but may be cast.
    plans = plan(updates if params is None else params)
    _check_inner_state_shapes(inner, plans, state.inner_state)
    settings.check(state.settings, **recorded_settings(plans))
    # Projected leaves as their matrix views (free for the default layout).
    matrices = projection.to_matrices(plans, updates)
    stored, current, inner_state = source.advance(
        plans, matrices, state, update_proj_gap, transfer_moments
    )
    low_rank = jax.tree.map(_project, plans, matrices, current)
    inner_updates, inner_state = inner.update(
        low_rank, inner_state, _shapes_only(low_rank)
    )
    output = functools.partial(_output, scale=scale, rule=output_rule,
                               orthonormal=source.orthonormal)
    results = jax.tree.map(
        output, plans, matrices, current, low_rank, inner_updates,
        state.residual_norms,
    )
    new_updates, residual_norms = tree_util.unzip_leaves(plans, results, 2)
    return projection.from_matrices(plans, new_updates, updates), GaLoreState(
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
    refresh_schedule: RefreshSchedule = 'synchronous',
    distribute_refresh: bool = True,
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
    refresh_schedule: as in `scale_by_galore`.
    distribute_refresh: as in `scale_by_galore`.

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
      refresh_schedule=refresh_schedule,
      distribute_refresh=distribute_refresh,
      residual=FiraResidual(formulation, growth_limit),
  )


def _initial_state(inner, plans, source, output_rule, key, params,
                   recorded, gap) -> GaLoreState:
  low_rank = _low_rank_params(plans, params)
  inner_state = inner.init(low_rank)
  _check_inner_runs_on_shapes(inner, low_rank, inner_state)
  stored = jax.tree.map(source.initial, plans)
  if getattr(source, 'staggered', False):
    stored = StaggeredProjectors(
        stored, refresh.staggered_phases(plans, gap, source.cost))
  return GaLoreState(
      count=jnp.zeros([], jnp.int32),
      key=keys.as_prng_key(key),
      projectors=stored,
      inner_state=inner_state,
      residual_norms=jax.tree.map(
          output_rule.initial_norm if output_rule else _masked_node, plans
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


def _unproject_where_state_grows(plans, tree, inner, source, output_rule):
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
    extra = 4 * math.prod(plan.batch_shape) if output_rule else 0
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
            rule, orthonormal):
  """One leaf's update and output-rule state (unchanged if unprojected)."""
  if not plan.projected:
    return inner_update, previous_norm
  if rule is None:
    back = projectors.project_up(q, inner_update, plan.side)
    return (scale * back).astype(g.dtype), previous_norm
  out, norm = rule.update(
      plan.side, g, q, low_rank, inner_update, scale, previous_norm,
      orthonormal=orthonormal,
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
  cost: Callable[[LeafPlan], float] = refresh.svd_cost  # of one slice's fit
  staggered: bool = False
  distribute: bool = True
  stores_projectors = True
  orthonormal = True  # the SVD's and QR's Q, fitted in float32

  def initial(self, plan: LeafPlan):
    if plan.projected:
      return jnp.zeros(plan.projector_shape, jnp.float32)
    return optax.MaskedNode()

  def advance(self, plans, updates, state, gap, transfer_moments):
    old = stored_projectors(state.projectors)
    schedule = _Schedule.of(self.staggered, state, gap, plans)
    axes = refresh.mesh_axes() if self.distribute else ()
    if axes:
      new = self._spread_refits(plans, updates, old, schedule, axes)
    else:
      new = jax.tree.map(
          lambda plan, g, q_old, phase, keys: self._refit(
              plan, g, q_old, schedule, phase, keys),
          plans, updates, old, schedule.phases, schedule.slice_keys,
      )
    inner_state = state.inner_state
    if transfer_moments:
      inner_state = _transfer_first_moments(
          inner_state, plans, old, new,
          when=jax.tree.map(
              lambda plan, q, phase: schedule.any_taken(q, phase)
              if plan.projected else None,
              plans, old, schedule.phases),
          only_changed=self.staggered,
      )
    stored = (StaggeredProjectors(new, state.projectors.phases)
              if self.staggered else new)
    return stored, new, inner_state

  def _fit_one(self, plan):
    """Fits one slice of ``plan``'s leaf: ``(matrix, key) -> Q``."""
    matrix = LeafPlan(plan.path, plan.matrix_shape[-2:], plan.side,
                      plan.rank)
    return lambda g, key: self.fit(matrix, g, key)

  def _refit(self, plan, g, q_old, schedule, phase, keys):
    """One leaf's projectors; the factorisation runs only when due.

    ``keys``: those of its slices' fits, ``plan.batch_shape``.
    """
    if not plan.projected:
      return q_old
    if not self.staggered:
      return self._refit_all(plan, g, q_old, schedule, keys)
    take = schedule.taken(q_old, phase)

    def fit(g, q_old):
      if plan.batch_shape and not any(
          compat.explicit_spec(g)[:len(plan.batch_shape)]):
        # Only the due slices: one SVD per step, not one per slice.
        q_new = refresh.fit_where(
            self._fit_one(plan), projectors.gather_matrix_axes(g), q_old,
            take, keys)
      else:
        # A stack sharded along its slices (Explicit) is fitted where its
        # slices are, all of them (see `compat.each_matrix`).
        q_new = self.fit(plan, g, keys)
      ok = take & refresh.usable(g, q_new)
      return jnp.where(ok[..., None, None], q_new, q_old)

    # One branch per leaf, as in `_refit_all`.
    return compat.cond(jnp.any(take), fit, lambda g, q_old: q_old, g, q_old)

  def _refit_all(self, plan, g, q_old, schedule, keys):
    """The synchronous refit of one leaf: every slice, when scheduled."""
    scheduled = schedule.scheduled
    missing = _never_fitted(q_old)

    def fit(g, q_old):
      q_new = self.fit(plan, g, keys)
      take = refresh.usable(g, q_new) & (scheduled | missing)
      return jnp.where(take[..., None, None], q_new, q_old)

    # One branch per leaf, not one for all: a single branch would need
    # every gradient at once and keep them all, and every leaf's SVD
    # outputs, alive until the last factorisation ends.
    return compat.cond(scheduled | jnp.any(missing), fit,
                       lambda g, q_old: q_old, g, q_old)

  def _spread_refits(self, plans, updates, old, schedule, axes):
    """The refits of a step, those of each fit shape spread over ``axes``."""
    flat_plans, treedef = jax.tree.flatten(plans)
    leaves = list(zip(flat_plans, treedef.flatten_up_to(updates),
                      treedef.flatten_up_to(old),
                      treedef.flatten_up_to(schedule.phases),
                      treedef.flatten_up_to(schedule.slice_keys),
                      strict=True))
    groups: dict[Any, list[int]] = {}
    for i, plan in enumerate(flat_plans):
      if plan.projected:
        groups.setdefault((plan.matrix_shape[-2:], plan.side, plan.rank),
                          []).append(i)
    new = [leaf[2] for leaf in leaves]
    for members in groups.values():
      refitted = self._refit_group([leaves[i] for i in members], schedule,
                                   axes)
      for i, q in zip(members, refitted, strict=True):
        new[i] = q
    return jax.tree.unflatten(treedef, new)

  def _refit_group(self, group, schedule, axes):
    """The projectors of leaves of one fit shape, their fits spread over the
    devices of ``axes`` (see `refresh.spread_fit`).

    ``group``: (plan, gradient, stored projectors, phases, slice keys) per
    leaf.
    """
    plans, gs, qs, phases, keys = (list(x) for x in zip(*group, strict=True))
    takes = [schedule.taken(q, phase)
             for q, phase in zip(qs, phases, strict=True)]

    def spread(gs, qs):
      q_news = refresh.spread_fit(
          self._fit_one(plans[0]), gs, keys, takes, qs, axes)
      return [jnp.where((take & refresh.usable(g, q_new))[..., None, None],
                        q_new, q_old)
              for g, q_new, q_old, take in zip(gs, q_news, qs, takes,
                                                strict=True)]

    def locally(gs, qs):
      return [self._refit(plan, g, q, schedule, phase, k)
              for plan, g, q, phase, k in zip(plans, gs, qs, phases, keys,
                                              strict=True)]

    missing = jnp.any(jnp.stack([jnp.any(_never_fitted(q)) for q in qs]))
    if self.staggered:
      # Few slices are due at a step: those are fitted where they are; the
      # first fit of all of them is spread.
      return compat.cond(missing, spread, locally, gs, qs)
    # One branch per group, not per leaf: its stack holds all its gradients.
    return compat.cond(schedule.scheduled | missing, spread,
                       lambda gs, qs: qs, gs, qs)


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """Which slices a step refits, and the keys their fits draw from."""

  count: jax.Array
  gap: Any
  phases: Any  # per leaf: int32 phases (staggered), else 0
  staggered: bool
  # Per projected leaf: its slices' keys, plan.batch_shape; None elsewhere.
  slice_keys: Any

  @classmethod
  def of(cls, staggered, state, gap, plans):
    if staggered:
      phases = state.projectors.phases
    else:
      # A placeholder of the projectors' structure (masked leaves kept).
      phases = jax.tree.map(lambda _: 0, state.projectors)
    # Staggered slices refresh at any step: the count keeps their fits'
    # draws apart (the first fit and the first refresh share count // T).
    key_index = state.count if staggered else state.count // gap
    # Derived for all leaves at once, outside the refits' branches: derived
    # per leaf inside each branch, the key hashes took most of the compile
    # time of a randomized refit (the SVD's fits ignore them).
    slice_keys = projectors.unstack(
        plans, projectors.stack_keys(state.key, plans, [key_index])[0])
    return cls(state.count, gap, phases, staggered, slice_keys)

  @property
  def scheduled(self) -> jax.Array:
    """Synchronous: whether this step refreshes every projector."""
    return self.count % self.gap == 0

  def taken(self, q_old: jax.Array, phase: Any) -> jax.Array:
    """Per stacked slice: due now, or never fitted."""
    missing = _never_fitted(q_old)
    if not self.staggered:
      return self.scheduled | missing
    return ((self.count - phase) % self.gap == 0) | missing

  def any_taken(self, q_old: jax.Array, phase: Any) -> jax.Array:
    return jnp.any(self.taken(q_old, phase))


@dataclasses.dataclass(frozen=True)
class _RegeneratedProjectors:
  """'random': Flora's Gaussian projection, regenerated from the key."""

  stores_projectors = False
  orthonormal = False

  def initial(self, plan: LeafPlan):
    del plan
    return optax.MaskedNode()

  def advance(self, plans, updates, state, gap, transfer_moments):
    scheduled = state.count % gap == 0
    index = state.count // gap

    def regenerate(index):
      return projectors.random_projectors(state.key, plans, index)

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


def _check_schedule(refresh_schedule, projector, update_proj_gap) -> bool:
  """Whether the refresh is staggered; raises on what cannot be."""
  validation.check_choice('refresh_schedule', refresh_schedule,
                          RefreshSchedule)
  if refresh_schedule != 'staggered':
    return False
  if projector == 'random':
    raise ValueError(
        "refresh_schedule='staggered' staggers the refits of fitted"
        " projectors ('svd', 'randomized'); projector='random' regenerates"
        " its projectors from the key at no cost, use 'synchronous'.")
  # The phases are laid out over T at init.
  validation.check_positive_int('update_proj_gap', update_proj_gap)
  return True


def _projector_source(projector, canonical_signs, power_iterations,
                      oversampling, *, staggered=False, distribute=True):
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
        ),
        staggered=staggered, distribute=distribute,
    )
  return _FittedProjectors(
      lambda plan, g, key: projectors.randomized_projector(
          key, g, plan, power_iterations=power_iterations,
          oversampling=oversampling, canonical_signs=canonical_signs,
      ),
      # The sketch's products dominate: m n (r + p) per pass.
      cost=lambda plan: float(math.prod(plan.matrix_shape[-2:])
                              * (plan.rank + oversampling)),
      staggered=staggered, distribute=distribute,
  )


def _never_fitted(q: jax.Array) -> jax.Array:
  """Per stacked slice: True while the stored projector is all zeros."""
  return jnp.all(q == 0, axis=(-2, -1))


def _transfer_first_moments(inner_state, plans, old_projectors, new_projectors,
                            *, when=None, only_changed=False):
  """Moves every first moment of ``inner_state`` into the new subspaces.

  ``when``: None to move every leaf's moments, or a tree like ``plans`` of
  bool scalars, each leaf's moments then moved in its own `jax.lax.cond`.
  ``only_changed``: keep the moments of slices whose projector is the same
  (moving them would change them by float rounding).
  """
  params_structure = jax.tree.structure(plans)
  if when is None:
    when = jax.tree.map(lambda _: None, plans)

  def holds_moment(x):
    return isinstance(x, tuple) and any(
        f in getattr(x, '_fields', ()) for f in _FIRST_MOMENT_FIELDS
    )

  def move(plan, moment, q_old, q_new, due):
    if not plan.projected:
      return moment

    def change(moment, q_old, q_new):
      # Least squares: for orthonormal (fitted) projectors the same as
      # down_new(up_old(m)); for Gaussian ones ('random') the only stable
      # choice, see `change_basis`.
      moved = projectors.change_basis(
          q_old, q_new, moment, plan.side, least_squares=True
      ).astype(moment.dtype)
      if not only_changed:
        return moved
      changed = jnp.any(q_old != q_new, axis=(-2, -1))
      return jnp.where(changed[..., None, None], moved, moment)

    if due is None:
      return change(moment, q_old, q_new)
    # One branch per leaf, like the refits.
    return compat.cond(due, change, lambda moment, *_: moment, moment, q_old,
                       q_new)

  def visit(node):
    if not holds_moment(node):
      return node
    changes = {}
    for field in _FIRST_MOMENT_FIELDS:
      moment = getattr(node, field, None)
      if moment is not None and jax.tree.structure(moment) == params_structure:
        changes[field] = jax.tree.map(
            move, plans, moment, old_projectors, new_projectors, when
        )
    return node._replace(**changes)

  return jax.tree.map(visit, inner_state, is_leaf=holds_moment)
