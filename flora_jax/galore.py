"""GaLore and Fira: any optax optimizer inside a low-rank gradient subspace.

GaLore (Zhao et al., ICML 2024, https://arxiv.org/abs/2403.03507) runs the
optimizer on ``R = down(G)``, the projection of each matrix gradient onto the
span of its top-``r`` singular vectors, refreshed every ``T`` steps, and
applies ``scale * up(N)`` where ``N`` is the optimizer's low-rank output. The
optimizer state of an ``m x n`` matrix shrinks from ``2 m n`` (Adam) to a
``dim x r`` projector plus the moments of an ``r x n`` (or ``m x r``) matrix.

Fira (Chen et al., 2024, https://arxiv.org/abs/2410.01623) adds back what the
projection throws away: the residual ``G - up(R)``, scaled per column (or
row) by ``φ = ||N|| / ||R||`` so that it moves like the adaptive low-rank
part, with a limiter on how fast its norm may grow.

This module provides

* `scale_by_galore` / `scale_by_fira`: the subspace wrapper around any inner
  `optax.GradientTransformation` (one code path; Fira only adds the residual);
* `galore` / `fira`: the published optimizers with Adam inside, in the
  reference code's HF-AdamW flavour or in optax's;
* `limit_norm_growth`: Fira's norm-growth limiter as a transform of its own;
* `scale_by_adam_hf`: Adam as HF-transformers' ``AdamW`` computes it.

Projectors (`svd`, `randomized`, `random`) come from `flora_jax.projection`,
shared with Flora.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from flora_jax import _compat
from flora_jax import _validation
from flora_jax import projection
from flora_jax.projection import MaskOrFn, PRNGKeyLike, Side

PROJECTORS = ('svd', 'randomized', 'random')
FORMULATIONS = ('code', 'paper')
ADAM_FLAVOURS = ('hf', 'optax')

# Fields of optax states that hold a first moment, moved into the new
# subspace by `transfer_moments` (adam, adamw, lion, belief, trace, sgd...).
_FIRST_MOMENT_FIELDS = ('mu', 'trace')
# Fira's guards against division by zero, kept for parity with its code.
_PHI_EPS = 1e-8
_LIMITER_EPS = 1e-8


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


def scale_by_galore(
    inner: optax.GradientTransformation,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projector: str = 'svd',
    key: PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
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

  ``inner`` sees low-rank projections, which have no parameter values: its
  ``params`` are the low-rank shapes as `jax.ShapeDtypeStruct`, enough for
  optimizers that read only shapes (`optax.scale_by_factored_rms`). One that
  needs values is refused at ``init``; put weight decay, trust ratios and
  the like after this transform, as `galore` does.

  Args:
    inner: any `optax.GradientTransformation` that needs no parameter values,
      e.g.
      `optax.scale_by_adam`, `scale_by_adam_hf`, `optax.scale_by_lion`,
      `optax.scale_by_factored_rms`, `optax.trace`.
    rank: the subspace rank r.
    update_proj_gap: T, steps between refreshes of the projector.
    scale: the factor α applied to ``up(N)`` (GaLore's default 0.25).
    projector: ``'svd'`` (exact float32 SVD, the reference), ``'randomized'``
      (range finder with ``power_iterations`` and ``oversampling``, much
      cheaper on large matrices) or ``'random'`` (Flora's Gaussian
      ``N(0, 1/r)`` projector, regenerated from ``key`` and never stored).
    key: an int seed, a typed key or a raw uint32 key.
    transfer_moments: at each refresh move the first moment of ``inner``
      (state fields named ``mu`` or ``trace``) into the new subspace,
      ``m <- down_new(up_old(m))``. Off by default, as in GaLore.
    canonical_signs: flip each singular vector so that its largest entry is
      positive, making results identical across backends. False reproduces
      `optax.contrib.galore` exactly.
    power_iterations, oversampling: of the ``'randomized'`` projector.
    side, min_dim, max_aspect_ratio, mask: which leaves are projected and on
      which side, see `flora_jax.ProjectionRule`. ``'auto'`` compresses the
      smaller dimension, the input dimension on a tie, as the reference
      code does for PyTorch's ``(out, in)`` weights.

  Returns:
    An `optax.GradientTransformation` whose state is `GaLoreState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     flora_jax.scale_by_galore(optax.scale_by_lion(), rank=64),
    ...     optax.add_decayed_weights(1e-2),
    ...     optax.scale_by_learning_rate(1e-4),
    ... )

  References:
    Zhao et al., 2024, https://arxiv.org/abs/2403.03507
  """
  return _scale_by_subspace(
      inner,
      projection.ProjectionRule(rank, side, min_dim, max_aspect_ratio, mask),
      update_proj_gap=update_proj_gap,
      scale=scale,
      projector=projector,
      key=key,
      transfer_moments=transfer_moments,
      canonical_signs=canonical_signs,
      power_iterations=power_iterations,
      oversampling=oversampling,
      residual=None,
  )


def scale_by_fira(
    inner: optax.GradientTransformation,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    formulation: str = 'code',
    growth_limit: Optional[float] = 1.01,
    projector: str = 'svd',
    key: PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""`scale_by_galore` plus Fira's scaled residual and norm-growth limiter.

  With ``R = down(G)``, ``N`` the inner output and the norm-based scaling,
  per column (side 'left') or row (side 'right') of the axis that is not
  compressed, norms taken over the rank axis,

  .. math::

    \phi = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}},

  the residual and the output are

  * ``formulation='code'`` (default; the published code, which produced the
    published numbers): ``S = φ ⊙ (G − α up(R))`` and output
    ``α up(N) + lim(S)``. For ``α != 1`` this ``S`` is not orthogonal to the
    subspace and is not scaled by α (4-16x the paper's at α = 0.25-0.0625).
  * ``formulation='paper'``: ``S = φ ⊙ (G − up(R))`` (the projection onto
    the orthogonal complement for an orthonormal Q) and output
    ``α (up(N) + lim(S))``.

  ``lim`` is the norm-growth limiter, per stacked slice: if
  ``||S_t|| > γ (||S_{t-1}|| + 1e-8)`` then ``S_t`` is rescaled to that
  bound; the stored norm is the limited one and survives refreshes; the
  first step is not limited (``growth_limit=None`` disables it). The limiter
  sees ``S`` as ``inner`` scales it: with `fira` the bias correction is
  applied afterwards, as in the code; an inner `optax.scale_by_adam`
  includes it, as in the paper.

  Args:
    inner, rank, update_proj_gap, scale, projector, key, transfer_moments,
      canonical_signs, power_iterations, oversampling, side, min_dim,
      max_aspect_ratio, mask: as in `scale_by_galore`.
    formulation: ``'code'`` or ``'paper'``, see above.
    growth_limit: γ >= 1, or None for no limiter.

  Returns:
    An `optax.GradientTransformation` whose state is `GaLoreState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     flora_jax.scale_by_fira(optax.scale_by_adam(), rank=64),
    ...     optax.scale_by_learning_rate(1e-3),
    ... )

  References:
    Chen et al., 2024, https://arxiv.org/abs/2410.01623
  """
  _validation.check_choice('formulation', formulation, FORMULATIONS)
  if growth_limit is not None:
    _validation.check_in_range(
        'growth_limit', growth_limit, 1.0, math.inf
    )
  return _scale_by_subspace(
      inner,
      projection.ProjectionRule(rank, side, min_dim, max_aspect_ratio, mask),
      update_proj_gap=update_proj_gap,
      scale=scale,
      projector=projector,
      key=key,
      transfer_moments=transfer_moments,
      canonical_signs=canonical_signs,
      power_iterations=power_iterations,
      oversampling=oversampling,
      residual=(formulation, growth_limit),
  )


def _check_non_negative_int(name: str, value: Any) -> int:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < 0
  ):
    raise ValueError(f'{name} must be a non-negative int, got {value!r}.')
  return int(value)


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _scale_by_subspace(
    inner: optax.GradientTransformation,
    rule: projection.ProjectionRule,
    *,
    update_proj_gap,
    scale,
    projector: str,
    key: PRNGKeyLike,
    transfer_moments: bool,
    canonical_signs: bool,
    power_iterations: int,
    oversampling: int,
    residual: Optional[tuple[str, Optional[float]]],
) -> optax.GradientTransformation:
  """The one implementation behind `scale_by_galore` and `scale_by_fira`."""
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        'inner must be an optax.GradientTransformation, got'
        f' {type(inner).__name__}.'
    )
  update_proj_gap = _validation.check_positive_or_traced(
      'update_proj_gap', update_proj_gap
  )
  _validation.check_choice('projector', projector, PROJECTORS)
  power_iterations = _check_non_negative_int('power_iterations', power_iterations)
  oversampling = _check_non_negative_int('oversampling', oversampling)
  projection.check_key_argument(key)
  stores_projector = projector != 'random'
  formulation, growth_limit = residual if residual else (None, None)

  def init_fn(params):
    params = projection.unwrap_variables(params)
    plans = rule.plan(params)

    def initial_projector(plan):
      if plan.projected and stores_projector:
        return jnp.zeros(plan.projector_shape, jnp.float32)
      return optax.MaskedNode()

    def low_rank_like(plan, p):
      if plan.projected:
        return jnp.zeros(plan.low_rank_shape, jnp.float32)
      return p

    def initial_residual_norm(plan):
      if plan.projected and growth_limit is not None:
        return jnp.full(plan.batch_shape, jnp.inf, jnp.float32)
      return optax.MaskedNode()

    low_rank = jax.tree.map(low_rank_like, plans, params)
    inner_state = inner.init(low_rank)
    _check_inner_runs_on_shapes(inner, low_rank, inner_state)
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        key=projection.as_prng_key(key),
        projectors=jax.tree.map(initial_projector, plans),
        inner_state=inner_state,
        residual_norms=jax.tree.map(initial_residual_norm, plans),
    )

  def fit_projector(plan, g, refresh_index, key):
    if projector == 'svd':
      return projection.svd_projector(g, plan, canonical_signs=canonical_signs)
    return projection.randomized_projector(
        projection.projection_key(key, plan.path, refresh_index),
        g,
        plan,
        power_iterations=power_iterations,
        oversampling=oversampling,
        canonical_signs=canonical_signs,
    )

  def update_fn(updates, state, params=None):
    _validation.check_updates_match_params(updates, params)
    _validation.check_same_paths(
        updates,
        jax.tree.map(lambda _: 0, state.projectors, is_leaf=_is_masked_node),
        'the projectors',
    )
    plans = rule.plan(updates)
    count = state.count
    scheduled = count % update_proj_gap == 0
    refresh_index = count // update_proj_gap

    if stores_projector:

      def never_fitted(plan, q):
        return jnp.all(q == 0, axis=(-2, -1)) if plan.projected else None

      missing = jax.tree.map(never_fitted, plans, state.projectors)

      def refresh(projectors, inner_state):
        def refit(plan, g, q_old, missing_slices):
          if not plan.projected:
            return q_old
          q_new = fit_projector(plan, g, refresh_index, state.key)
          usable = jnp.all(jnp.isfinite(g), axis=(-2, -1)) & jnp.any(
              g != 0, axis=(-2, -1)
          )
          usable &= jnp.all(jnp.isfinite(q_new), axis=(-2, -1))
          take = usable & (scheduled | missing_slices)
          return jnp.where(take[..., None, None], q_new, q_old)

        new_projectors = jax.tree.map(
            refit, plans, updates, projectors, missing
        )
        if transfer_moments:
          inner_state = _transfer_first_moments(
              inner_state, plans, projectors, new_projectors
          )
        return new_projectors, inner_state

      any_missing = jnp.any(
          jnp.stack([jnp.any(m) for m in jax.tree.leaves(missing)] or [False])
      )
      projectors, inner_state = _compat.cond(
          scheduled | any_missing,
          refresh,
          lambda *args: args,
          state.projectors,
          state.inner_state,
      )
      current = projectors
    else:
      projectors = state.projectors

      def regenerate(index):
        return jax.tree.map(
            lambda plan: projection.random_projector(state.key, plan, index)
            if plan.projected
            else None,
            plans,
        )

      current = regenerate(refresh_index)
      inner_state = state.inner_state
      if transfer_moments:
        inner_state = _compat.cond(
            scheduled & (count > 0),
            lambda s: _transfer_first_moments(
                s, plans, regenerate(refresh_index - 1), current
            ),
            lambda s: s,
            inner_state,
        )

    def project(plan, g, q):
      if not plan.projected:
        return g
      return projection.project_down(q, g, plan.side)

    low_rank = jax.tree.map(project, plans, updates, current)
    inner_updates, inner_state = inner.update(
        low_rank, inner_state, _shapes_only(low_rank)
    )

    def output(plan, g, q, r, n, previous_norm):
      if not plan.projected:
        return n, previous_norm
      back = projection.project_up(q, n, plan.side)
      if formulation is None:
        return (scale * back).astype(g.dtype), previous_norm
      rank_axis = -2 if plan.side == 'left' else -1
      phi = jnp.linalg.norm(n, axis=rank_axis, keepdims=True) / (
          jnp.linalg.norm(r, axis=rank_axis, keepdims=True) + _PHI_EPS
      )
      r_back = projection.project_up(q, r, plan.side)
      if formulation == 'code':
        s = phi * (g.astype(jnp.float32) - scale * r_back)
      else:
        s = phi * (g.astype(jnp.float32) - r_back)
      if growth_limit is not None:
        s, previous_norm = _limit_growth(
            s, previous_norm, growth_limit, axes=(-2, -1)
        )
      out = scale * back + s if formulation == 'code' else scale * (back + s)
      return out.astype(g.dtype), previous_norm

    results = jax.tree.map(
        output,
        plans,
        updates,
        current,
        low_rank,
        inner_updates,
        state.residual_norms,
    )
    new_updates, residual_norms = projection.unzip_leaves(plans, results, 2)
    return new_updates, GaLoreState(
        count=optax.safe_increment(count),
        key=state.key,
        projectors=projectors,
        inner_state=inner_state,
        residual_norms=residual_norms,
    )

  return optax.GradientTransformation(init_fn, update_fn)


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
    moved = projection.change_basis(q_old, q_new, moment, plan.side)
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


def _limit_growth(x, previous_norm, max_growth, *, axes=None):
  """Rescales ``x`` so that its norm is at most ``γ (previous + 1e-8)``.

  Returns the limited ``x`` and its norm (over ``axes``; all if None).
  """
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
  shrink = jnp.maximum(norm / (max_growth * (previous_norm + _LIMITER_EPS)), 1.0)
  if axes is not None:
    shrink_b = jnp.expand_dims(shrink, axes)
  else:
    shrink_b = shrink
  return x / shrink_b, norm / shrink


class LimitNormGrowthState(NamedTuple):
  """State of `limit_norm_growth`."""

  # Per leaf: the norm of the last (limited) update, f32[]; +inf before the
  # first step so that it passes unlimited.
  previous_norms: optax.Updates


def limit_norm_growth(max_growth: float = 1.01) -> optax.GradientTransformation:
  r"""Fira's norm-growth limiter, per leaf, for any optimizer.

  .. math::

    u_t \leftarrow \frac{u_t}{\max\big(1,\ \lVert u_t\rVert /
      (\gamma (\lVert u_{t-1}\rVert + 10^{-8}))\big)}

  so the norm of each leaf's update grows by at most a factor γ per step,
  which damps loss spikes. The norm kept for the next step is the limited
  one; the first update passes unchanged.

  Args:
    max_growth: γ >= 1 (Fira uses 1.01).

  Returns:
    An `optax.GradientTransformation` whose state is `LimitNormGrowthState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     optax.scale_by_adam(), flora_jax.limit_norm_growth(1.01),
    ...     optax.scale_by_learning_rate(1e-3))

  References:
    Chen et al., 2024, Section 3.3, https://arxiv.org/abs/2410.01623
  """
  _validation.check_in_range('max_growth', max_growth, 1.0, math.inf)

  def init_fn(params):
    params = projection.unwrap_variables(params)
    return LimitNormGrowthState(
        previous_norms=jax.tree.map(
            lambda _: jnp.full([], jnp.inf, jnp.float32), params
        )
    )

  def update_fn(updates, state, params=None):
    del params
    _validation.check_same_paths(updates, state.previous_norms, 'the limiter')
    results = jax.tree.map(
        lambda u, previous: _limit_growth(u, previous, max_growth),
        updates,
        state.previous_norms,
    )
    limited, norms = projection.unzip_leaves(updates, results, 2)
    limited = jax.tree.map(lambda x, u: x.astype(u.dtype), limited, updates)
    return limited, LimitNormGrowthState(previous_norms=norms)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    correct_bias: bool = True,
) -> optax.GradientTransformation:
  r"""Adam as HF-transformers' ``AdamW`` (and GaLore's and Fira's code) computes it.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = c_t \frac{m_t}{\sqrt{v_t} + \epsilon}, \quad
    c_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}

  ``ε`` is added before the bias correction, unlike `optax.scale_by_adam`
  (``m̂ / (sqrt(v̂) + ε)``); ``correct_bias=False`` drops ``c_t``.

  Args:
    b1, b2: moment decays in [0, 1).
    eps: added to ``sqrt(v)``.
    correct_bias: multiply by ``c_t``.

  Returns:
    An `optax.GradientTransformation` whose state is `optax.ScaleByAdamState`.

  References:
    Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101
  """
  _validation.check_in_range('b1', b1, 0.0, 1.0)
  _validation.check_in_range('b2', b2, 0.0, 1.0)

  def init_fn(params):
    params = projection.unwrap_variables(params)
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    factor = _hf_bias_correction(b1, b2)(state.count) if correct_bias else 1.0
    new_updates = jax.tree.map(
        lambda m, v, u: (factor * m / (jnp.sqrt(v) + eps)).astype(u.dtype),
        mu,
        nu,
        updates,
    )
    return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _hf_bias_correction(b1, b2) -> Callable[[jax.Array], jax.Array]:
  """``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` as a function of the 0-based count.

  ``1 - b^t`` is computed as ``-expm1(t log b)`` with ``log b`` in double
  precision when ``b`` is a Python number: in float32, ``1 - 0.999^t``
  loses 5 significant digits for small t, which the reference (Python floats)
  does not.
  """

  def log(b):
    if isinstance(b, numbers.Real):
      return math.log(b) if b > 0 else -math.inf
    return jnp.log(b)

  log1, log2 = log(b1), log(b2)

  def factor(count):
    t = (count + 1).astype(jnp.float32)
    return jnp.sqrt(-jnp.expm1(t * log2)) / -jnp.expm1(t * log1)

  return factor


def _decay_after_update(
    learning_rate: optax.ScalarOrSchedule, weight_decay
) -> optax.GradientTransformation:
  """``W <- (W + Δ) (1 - lr wd)``: HF AdamW's decay of the updated weights."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'galore/fira with weight_decay needs params: call'
          ' tx.update(grads, state, params).'
      )
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    new_updates = jax.tree.map(
        lambda d, p: (d - lr * weight_decay * (p + d)).astype(d.dtype),
        updates,
        params,
    )
    return new_updates, optax.ScaleByScheduleState(
        count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _adam_in_subspace(
    make_wrapper: Callable[[optax.GradientTransformation], Any],
    learning_rate,
    b1,
    b2,
    eps,
    weight_decay,
    weight_decay_mask,
    adam: str,
) -> optax.GradientTransformation:
  """The `galore`/`fira` chain around ``make_wrapper(inner Adam)``."""
  _validation.check_choice('adam', adam, ADAM_FLAVOURS)
  decays = _validation.may_be_nonzero(weight_decay)
  if adam == 'hf':
    eps = 1e-6 if eps is None else eps
    transforms = [
        make_wrapper(scale_by_adam_hf(b1, b2, eps, correct_bias=False)),
        optax.scale_by_schedule(_hf_bias_correction(b1, b2)),
        optax.scale_by_learning_rate(learning_rate),
    ]
    if decays:
      decay = _decay_after_update(learning_rate, weight_decay)
      if weight_decay_mask is not None:
        decay = optax.masked(decay, weight_decay_mask)
      transforms.append(decay)
  else:
    eps = 1e-8 if eps is None else eps
    transforms = [make_wrapper(optax.scale_by_adam(b1, b2, eps))]
    if decays:
      transforms.append(
          optax.add_decayed_weights(weight_decay, weight_decay_mask)
      )
    transforms.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*transforms)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: Optional[float] = None,
    weight_decay: Optional[float] = None,
    *,
    weight_decay_mask: MaskOrFn = None,
    adam: str = 'hf',
    projector: str = 'svd',
    key: PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""GaLore-AdamW: Adam in the top-``r`` gradient subspace of each matrix.

  With ``adam='hf'`` (default) this is the reference ``GaLoreAdamW``: per
  step ``W <- (W - lr c_t α up(N_t)) (1 - lr wd)``, where ``N = m / (sqrt(v)
  + ε)`` is computed on ``R = down(G)`` (ε = 1e-6, added before the bias
  correction ``c_t``, see `scale_by_adam_hf`) and the decay hits the updated
  weights. Leaves that are not projected get the same AdamW at full size,
  unscaled. With ``adam='optax'`` it is `optax.scale_by_adam` (ε = 1e-8 on
  the bias-corrected moments) with `optax.add_decayed_weights` on the
  current weights, as in `optax.contrib.galore`.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: subspace rank (reference default 128).
    update_proj_gap: T, steps between projector refreshes (default 200).
    scale: α, the factor on projected updates (default 0.25).
    b1, b2, eps: Adam's; ``eps=None`` picks the flavour's default.
    weight_decay: decoupled weight decay (needs ``params`` in ``update``);
      None or 0 for none.
    weight_decay_mask: optax-style mask of the leaves to decay.
    adam: ``'hf'`` or ``'optax'``, see above.
    projector, key, transfer_moments, canonical_signs, side, min_dim,
      max_aspect_ratio, mask: see `scale_by_galore`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.galore(1e-2, rank=128, update_proj_gap=200, scale=0.25)

  References:
    Zhao et al., 2024, https://arxiv.org/abs/2403.03507
  """

  def wrapper(inner):
    return scale_by_galore(
        inner,
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        projector=projector,
        key=key,
        transfer_moments=transfer_moments,
        canonical_signs=canonical_signs,
        side=side,
        min_dim=min_dim,
        max_aspect_ratio=max_aspect_ratio,
        mask=mask,
    )

  return _adam_in_subspace(
      wrapper, learning_rate, b1, b2, eps, weight_decay, weight_decay_mask, adam
  )


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: Optional[float] = None,
    weight_decay: Optional[float] = None,
    *,
    formulation: str = 'code',
    growth_limit: Optional[float] = 1.01,
    weight_decay_mask: MaskOrFn = None,
    adam: str = 'hf',
    projector: str = 'svd',
    key: PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Fira-AdamW: GaLore-AdamW plus the scaled residual and its limiter.

  The reference ``FiraAdamW`` with the defaults: per step
  ``W <- (W - lr c_t (α up(N) + lim(S))) (1 - lr wd)`` with
  ``S = φ ⊙ (G − α up(R))``; see `scale_by_fira` for φ, the limiter and the
  paper's formulation, and `galore` for the Adam flavours. The reference
  scripts use α = 0.25 up to 350M parameters and 0.0625 for 1B/7B.

  Args:
    learning_rate, rank, update_proj_gap, scale, b1, b2, eps, weight_decay,
      weight_decay_mask, adam: as in `galore`.
    formulation, growth_limit: see `scale_by_fira`.
    projector, key, transfer_moments, canonical_signs, side, min_dim,
      max_aspect_ratio, mask: see `scale_by_galore`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.fira(1e-2, rank=128, scale=0.25)

  References:
    Chen et al., 2024, https://arxiv.org/abs/2410.01623
  """

  def wrapper(inner):
    return scale_by_fira(
        inner,
        rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        formulation=formulation,
        growth_limit=growth_limit,
        projector=projector,
        key=key,
        transfer_moments=transfer_moments,
        canonical_signs=canonical_signs,
        side=side,
        min_dim=min_dim,
        max_aspect_ratio=max_aspect_ratio,
        mask=mask,
    )

  return _adam_in_subspace(
      wrapper, learning_rate, b1, b2, eps, weight_decay, weight_decay_mask, adam
  )
