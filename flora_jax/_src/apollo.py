"""APOLLO: Adam's scaling, learnt in a random subspace, applied to ``G``.

APOLLO (Zhu et al., MLSys 2025, https://arxiv.org/abs/2412.05270) keeps
Adam's moments only for ``R = down(G)``, a Gaussian projection of each
matrix gradient (regenerated from the key every ``T`` steps, never stored,
no SVD), and uses them for one thing: how much Adam would rescale each
channel of the gradient. The update is the raw full-rank gradient times
that scaling, so no up-projection is ever computed. APOLLO-Mini takes one
scale per matrix from a rank-1 projection: state close to SGD's.

The transform is the shared subspace core (`scale_by_galore`'s) with the
``'random'`` projector source and `ApolloScaling` as its output rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import optax

from flora_jax._src import adam_hf
from flora_jax._src import fira
from flora_jax._src import keys
from flora_jax._src import subspace
from flora_jax._src import validation
from flora_jax._src.projection import LeafPlan
from flora_jax._src.projection import ProjectionRule

Granularity = Literal['channel', 'tensor']

# The published code's guard against dividing by a zero projection.
_RATIO_EPS = 1e-8

APOLLO_MINI_SCALE = math.sqrt(128.0)
"""APOLLO-Mini's α: the paper's ``sqrt(128)`` (``scale=128`` in its code,
which multiplies by the square root of its ``scale``)."""


@dataclasses.dataclass(frozen=True)
class ApolloScaling:
  r"""APOLLO's output rule: the raw gradient, scaled as Adam scales ``R``.

  With ``R = down(G)`` and ``N`` the inner optimizer's output on it, the
  scaling ``s`` is, per channel of the axis that is not compressed
  (``granularity='channel'``; norms over the rank axis) or per matrix
  (``'tensor'``; Frobenius norms),

  .. math::

    s = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}}, \qquad
    \text{update} = \alpha \, \mathrm{lim}(s \odot G),

  where ``lim`` is Fira's norm-growth limiter per stacked slice (see
  `flora_jax.FiraResidual`; the first step is not limited) and α the
  ``scale``.

  Attributes:
    granularity: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    growth_limit: γ >= 1 of the limiter (1.01 in the paper), None for none.
  """

  granularity: Granularity = 'channel'
  growth_limit: float | None = 1.01

  def __post_init__(self):
    validation.check_choice('granularity', self.granularity, Granularity)
    validation.check_in_range('growth_limit', self.growth_limit, 1.0, math.inf)

  def initial_norm(self, plan: LeafPlan):
    """The limiter's state for one leaf: +inf per stacked slice."""
    return fira.initial_limiter_norms(plan, self.growth_limit)

  def update(self, side, g, q, low_rank, inner_update, scale, previous_norm,
             *, orthonormal=False):
    """One projected leaf's float32 update and its limiter norm."""
    del q, orthonormal  # APOLLO never projects back up.
    axes = ((-2 if side == 'left' else -1,) if self.granularity == 'channel'
            else (-2, -1))
    ratio = _norm(inner_update, axes) / (_norm(low_rank, axes) + _RATIO_EPS)
    g = g.astype(jnp.float32)
    if self.growth_limit is not None:
      norm = jnp.sqrt(jnp.sum(jnp.square(ratio * g), axis=(-2, -1)))
      shrink = fira.growth_divisor(norm, previous_norm, self.growth_limit)
      ratio = ratio / shrink[..., None, None]
      previous_norm = norm / shrink
    return scale * ratio * g, previous_norm


def _norm(x, axes):
  """Euclidean norm over ``axes``, kept as size-1 axes."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def scale_by_apollo(
    inner: optax.GradientTransformation | None = None,
    rule: ProjectionRule | int = 256,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    granularity: Granularity = 'channel',
    growth_limit: float | None = 1.01,
    key: keys.PRNGKeyLike = 0,
) -> optax.GradientTransformation:
  r"""APOLLO's scaled gradient: Adam run on a random projection, applied to G.

  For a projected leaf ``G`` (see `flora_jax.ProjectionRule`), with a
  Gaussian projector ``Q`` (``dim x r``, entries ``N(0, 1/r)``) regenerated
  from ``key`` every ``update_proj_gap`` steps (never stored):

  .. math::

    R_t = \mathrm{down}(G_t), \qquad
    N_t, s_t = \mathrm{inner.update}(R_t, s_{t-1}), \qquad
    \text{output}_t = \alpha \, \mathrm{lim}(S_t \odot G_t),

  with ``S_t = ||N_t|| / (||R_t|| + 1e-8)``, the norms taken per channel of
  the axis that is not compressed (over the rank axis) or, with
  ``granularity='tensor'``, per matrix (each stacked slice), and ``lim``
  Fira's norm-growth limiter per stacked slice (``||x_t||`` at most γ times
  the last limited norm; the first step passes, see
  `flora_jax.FiraResidual`).
  Leaves that are not projected go through ``inner`` at full size. The
  state per projected ``m x n`` matrix is ``inner``'s on the low-rank shape
  (Adam: ``2 r n``) and one norm; the moments are not moved at a new
  projection, as in the paper.

  Args:
    inner: the optimizer whose scaling is learnt, run on the projections
      (and on the unprojected leaves); None for `scale_by_adam_hf`, the
      published code's Adam flavour, bias correction included (the
      `apollo` alias runs it without, and corrects after the limiter, as
      the published code does).
    rule: which leaves are projected, on which side and at which rank: a
      `flora_jax.ProjectionRule`, or an int r. The channels are the axis
      that is not compressed.
    update_proj_gap: T, steps between new projections (200 in the paper).
    scale: α, the factor on the scaled gradient (1 for APOLLO, sqrt(128)
      for APOLLO-Mini in the paper).
    granularity: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    growth_limit: γ >= 1 of the limiter (1.01 in the paper), None for none.
    key: an int seed, a typed key or a raw uint32 key.

  Returns:
    An `optax.GradientTransformation` whose state is `flora_jax.GaLoreState`
    (``projectors`` empty, ``residual_norms`` the limiter's norms).

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     flora_jax.scale_by_apollo(optax.scale_by_adam(), 64),
    ...     optax.scale_by_learning_rate(1e-2),
    ... )

  References:
    Zhu et al., 2025, Algorithm 1, https://arxiv.org/abs/2412.05270
  """
  if inner is None:
    inner = adam_hf.scale_by_adam_hf()
  output_rule = ApolloScaling(granularity, growth_limit)
  return subspace.in_subspace(
      inner, rule, update_proj_gap=update_proj_gap, scale=scale,
      projector='random', key=key, transfer_moments=False,
      canonical_signs=True, power_iterations=0, oversampling=0,
      refresh_schedule='synchronous', distribute_refresh=False,
      output_rule=output_rule, name='flora_jax.scale_by_apollo',
      recorded=dict(apollo=granularity),
  )
