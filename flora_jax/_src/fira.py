"""Fira's scaled residual and its norm-growth limiter.

Fira (Chen et al., 2024, https://arxiv.org/abs/2410.01623) adds back to a
GaLore update what the projection throws away: the residual ``G - up(R)``,
scaled per column (or row) by ``φ = ||N|| / ||R||`` so that it moves like
the adaptive low-rank part, with a limiter on how fast its norm may grow.
`scale_by_galore` applies the residual when given a `FiraResidual`;
`limit_norm_growth` is the limiter as a transform of its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import deprecation
from flora_jax._src import projectors
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.projection import LeafPlan

Formulation = Literal['code', 'paper']

# Fira's guards against division by zero, kept for parity with its code.
_PHI_EPS = 1e-8
_LIMITER_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class FiraResidual:
  r"""Fira's residual term: which formulation, and the norm-growth limit.

  With ``R = down(G)``, ``N`` the inner optimizer's output on ``R``, α the
  GaLore scale and, per column (side 'left') or row (side 'right') of the
  axis that is not compressed, norms taken over the rank axis,

  .. math::

    \phi = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}},

  the residual ``S`` and the update are

  * ``formulation='code'`` (default; the published code, which produced the
    published numbers): ``S = φ ⊙ (G − α up(R))`` and update
    ``α up(N) + lim(S)``. For ``α != 1`` this ``S`` is not orthogonal to the
    subspace and is not scaled by α (4-16x the paper's at α = 0.25-0.0625).
  * ``formulation='paper'``: ``S = φ ⊙ (G − up(R))`` (the projection onto
    the orthogonal complement for an orthonormal Q) and update
    ``α (up(N) + lim(S))``.

  ``lim`` is the norm-growth limiter, per stacked slice: if
  ``||S_t|| > γ (||S_{t-1}|| + 1e-8)`` then ``S_t`` is rescaled to that
  bound; the stored norm is the limited one and survives projector
  refreshes; the first step is not limited.

  Attributes:
    formulation: ``'code'`` or ``'paper'``, see above.
    growth_limit: γ >= 1 (Fira uses 1.01), or None for no limiter.

  Example:
    >>> import optax, flora_jax
    >>> tx = flora_jax.scale_by_galore(
    ...     optax.scale_by_adam(), 64,
    ...     residual=flora_jax.FiraResidual(formulation='paper'))

  References:
    Chen et al., 2024, Sections 3.2-3.3, https://arxiv.org/abs/2410.01623
  """

  formulation: Formulation = 'code'
  growth_limit: float | None = 1.01

  def __post_init__(self):
    validation.check_choice('formulation', self.formulation, Formulation)
    validation.check_in_range('growth_limit', self.growth_limit, 1.0, math.inf)

  def initial_norm(self, plan: LeafPlan):
    """The limiter's state for one leaf: +inf per stacked slice."""
    return initial_limiter_norms(plan, self.growth_limit)

  def update(
      self,
      side: str,
      g: jax.Array,
      q: jax.Array,
      low_rank: jax.Array,
      inner_update: jax.Array,
      scale: float,
      previous_norm: jax.Array,
      *,
      orthonormal: bool = False,
  ) -> tuple[jax.Array, jax.Array]:
    """One projected leaf's float32 update and its limiter norm.

    Args:
      side: the leaf's compressed side, ``'left'`` or ``'right'``.
      g: its gradient ``G``.
      q: its projector.
      low_rank: ``R = down(G)``.
      inner_update: ``N``, the inner optimizer's output on ``R``.
      scale: α.
      previous_norm: the limiter's stored norm.
      orthonormal: whether ``QᵀQ = I`` (fitted projectors), which spares
        the limiter the Gram matrix ``QᵀQ`` and its product with ``R``.
    """
    rank_axis = -2 if side == 'left' else -1
    phi = jnp.linalg.norm(inner_update, axis=rank_axis, keepdims=True) / (
        jnp.linalg.norm(low_rank, axis=rank_axis, keepdims=True) + _PHI_EPS
    )
    g = g.astype(jnp.float32)
    # S = φ ⊙ (G − c up(R)), with c = α in the code's formulation.
    c = scale if self.formulation == 'code' else 1.0
    if self.growth_limit is None:
      factor = phi
    else:
      norm = _residual_norm(side, g, q, low_rank, phi, c, orthonormal)
      shrink = growth_divisor(norm, previous_norm, self.growth_limit)
      factor = phi / shrink[..., None, None]
      previous_norm = norm / shrink
    # α up(N) + m lim(S) with m = 1 (code) or α (paper), written with one
    # up-projection, since φ ⊙ up(X) = up(φ ⊙ X) for a per-column (per-row)
    # φ: no full-size residual or second product is ever formed.
    outer = 1.0 if self.formulation == 'code' else scale
    low = scale * inner_update - outer * c * factor * low_rank
    return (projectors.project_up(q, low, side) + outer * factor * g,
            previous_norm)


def _residual_norm(side, g, q, low_rank, phi, c, orthonormal):
  """``||φ ⊙ (G − c up(R))||`` per stacked slice, through ``R`` and ``QᵀQ``.

  Per column ``j`` (side 'left'; rows for 'right'), with ``R = QᵀG``:
  ``||g_j − c Q r_j||² = ||g_j||² − 2c ||r_j||² + c² r_jᵀ (QᵀQ) r_j``, exact
  for any ``Q``; only ``G``'s column norms touch the full-size matrix. For
  an orthonormal ``Q`` the last term is ``c² ||r_j||²``: at rank 128 the
  Gram matrix and its product with ``R`` would cost 10-17% of the flops of
  the step's two projections on LLaMA's matrices.
  """
  rank_axis = -2 if side == 'left' else -1
  low_squares = jnp.sum(low_rank * low_rank, axis=rank_axis)
  if orthonormal:
    curvature = low_squares
  else:
    gram = projectors.gram(q, q)
    product = gram @ low_rank if side == 'left' else low_rank @ gram
    curvature = jnp.sum(low_rank * product, axis=rank_axis)
  squares = (jnp.sum(g * g, axis=rank_axis) - 2 * c * low_squares
             + c * c * curvature)
  weights = jnp.squeeze(phi, rank_axis) ** 2
  # The rank axis is summed out: what remains of the kept axis is last.
  total = jnp.sum(weights * jnp.maximum(squares, 0.0), axis=-1)
  return jnp.sqrt(total)


def initial_limiter_norms(plan: LeafPlan, growth_limit: float | None):
  """A projected leaf's limiter state: +inf per stacked slice (so that the
  first step passes); MaskedNode without a limiter or a projection."""
  if plan.projected and growth_limit is not None:
    return jnp.full(plan.batch_shape, jnp.inf, jnp.float32)
  return optax.MaskedNode()


def limit_growth(x, previous_norm, growth_limit):
  """Rescales ``x`` so that its norm is at most ``γ (previous + 1e-8)``.

  Returns the limited ``x`` (float32) and its norm.
  """
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x)))
  shrink = growth_divisor(norm, previous_norm, growth_limit)
  return x / shrink, norm / shrink


def growth_divisor(norm, previous_norm, growth_limit):
  """The limiter's divisor: ``max(||x|| / (γ (previous + 1e-8)), 1)``."""
  return jnp.maximum(
      norm / (growth_limit * (previous_norm + _LIMITER_EPS)), 1.0
  )


class LimitNormGrowthState(NamedTuple):
  """State of `limit_norm_growth`."""

  # Per leaf: the norm of the last (limited) update, f32[]; +inf before the
  # first step so that it passes unlimited.
  previous_norms: optax.Updates


@deprecation.renamed_arguments(max_growth='growth_limit')
def limit_norm_growth(
    growth_limit: float = 1.01,
) -> optax.GradientTransformation:
  r"""Fira's norm-growth limiter, per leaf, for any optimizer.

  .. math::

    u_t \leftarrow \frac{u_t}{\max\big(1,\ \lVert u_t\rVert /
      (\gamma (\lVert u_{t-1}\rVert + 10^{-8}))\big)}

  so the norm of each leaf's update grows by at most a factor γ per step,
  which damps loss spikes. The norm kept for the next step is the limited
  one; the first update passes unchanged.

  Args:
    growth_limit: γ >= 1 (Fira uses 1.01). ``max_growth`` is its deprecated
      spelling.

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
  validation.check_in_range('growth_limit', growth_limit, 1.0, math.inf)

  def init_fn(params):
    params = tree_util.unwrap_variables(params)
    return LimitNormGrowthState(
        previous_norms=jax.tree.map(
            lambda _: jnp.full([], jnp.inf, jnp.float32), params
        )
    )

  def update_fn(updates, state, params=None):
    del params
    validation.check_same_paths(updates, state.previous_norms, 'the limiter')
    results = jax.tree.map(
        lambda u, previous: limit_growth(u, previous, growth_limit),
        updates,
        state.previous_norms,
    )
    limited, norms = tree_util.unzip_leaves(updates, results, 2)
    limited = jax.tree.map(lambda x, u: x.astype(u.dtype), limited, updates)
    return limited, LimitNormGrowthState(previous_norms=norms)

  return optax.GradientTransformation(init_fn, update_fn)
