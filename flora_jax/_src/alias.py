"""The optimizers: `flora`, `galore`, `fira`, `apollo`, `apollo_mini`.

Each is an `optax.chain`.

Each alias takes its projection settings as flat keyword arguments (``rank``,
``side``, ``min_dim``, ``max_aspect_ratio``, ``projection_mask``) and builds
the `ProjectionRule` that the ``scale_by_*`` transforms take.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import adam_hf
from flora_jax._src import apollo as apollo_lib
from flora_jax._src import deprecation
from flora_jax._src import flora as flora_lib
from flora_jax._src import keys
from flora_jax._src import projectors
from flora_jax._src import subspace
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.fira import Formulation
from flora_jax._src.projection import DimensionNumbersOrFn
from flora_jax._src.projection import MaskOrFn
from flora_jax._src.projection import ProjectionRule
from flora_jax._src.projection import Side

AdamFlavour = Literal['hf', 'optax']


@deprecation.renamed_arguments(mask='projection_mask')
def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    kappa: int = 1000,
    b1: float | None = 0.9,
    *,
    key: keys.PRNGKeyLike = 0,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    eps: float = 1e-30,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = False,
    weight_decay: float | None = None,
    weight_decay_mask: MaskOrFn = None,
    nesterov: bool = False,
    momentum_dtype: jax.typing.DTypeLike | None = None,
    momentum_transfer: flora_lib.MomentumTransfer = 'least_squares',
    sketch: projectors.Sketch = 'gaussian',
    store_projectors: bool = False,
    refresh_schedule: subspace.RefreshSchedule = 'synchronous',
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: float | None = 4.0,
    projection_mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbersOrFn = None,
) -> optax.GradientTransformation:
  r"""The Flora optimizer: Adafactor with compressed momentum.

  Built from optax pieces, in the order of the paper:

  1. `optax.scale_by_factored_rms`: Adafactor's factored second moment,
     ``u = g / sqrt(v̂)`` (decay ``1 - t^{-decay_rate}``);
  2. `scale_by_flora_momentum`: momentum of ``u`` kept as an
     ``r x max(m, n)`` sketch for projected matrices (skipped if ``b1`` is
     None);
  3. `optax.clip_by_block_rms`: each matrix's update clipped to RMS
     ``clipping_threshold``;
  4. `optax.scale_by_param_block_rms` if ``multiply_by_parameter_scale``
     (Adafactor's relative step size);
  5. `optax.add_decayed_weights`: decoupled weight decay, scaled by the
     learning rate as in `optax.adamw`;
  6. `optax.scale_by_learning_rate`.

  In steps 3 and 4 a block is a matrix, the last two axes of a leaf: each
  slice of a stacked ``(L, m, n)`` leaf is clipped and scaled on its own,
  as the layers of an unstacked model are (and as
  `flora_jax.fused_train_step` needs). Leaves of fewer than 3 axes are one
  block, as in optax.

  Optimizer state per projected ``m x n`` matrix: ``m + n`` (factored second
  moment) plus ``r * max(m, n)`` (momentum) numbers, against ``2 m n`` for
  Adam.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: projection rank of the momentum.
    kappa: the momentum projection is re-drawn every ``kappa`` steps.
    b1: momentum decay; None for no momentum (plain Adafactor update).
    key: an int seed, a typed key or a raw uint32 key.
    decay_rate: of `optax.scale_by_factored_rms`.
    decay_offset: ``step_offset`` of `optax.scale_by_factored_rms`.
    min_dim_size_to_factor: of `optax.scale_by_factored_rms`.
    eps: ``epsilon`` of `optax.scale_by_factored_rms`.
    clipping_threshold: block-RMS clipping threshold, None to disable.
    multiply_by_parameter_scale: scale steps by the parameters' RMS; then
      ``learning_rate`` is relative (needs ``params`` in ``update``).
    weight_decay: decoupled weight decay rate (needs ``params``), None or 0
      for none.
    weight_decay_mask: optax-style mask of the leaves to decay.
    nesterov: see `scale_by_flora_momentum`.
    momentum_dtype: see `scale_by_flora_momentum`.
    momentum_transfer: how the momentum moves into a re-drawn subspace,
      see `scale_by_flora_momentum`.
    sketch: the projections' entries, ``'gaussian'`` (the paper's) or
      ``'rademacher'`` (cheaper to draw), see `flora_compress`.
    store_projectors: keep each window's projectors in the state (``dim *
      r`` more numbers per matrix) instead of regenerating them at every
      step, see `scale_by_flora_momentum`.
    refresh_schedule: ``'synchronous'`` or ``'staggered'`` resamples
      (the latter needs ``store_projectors``), see
      `scale_by_flora_momentum`.
    side: which axis is compressed, see `flora_jax.ProjectionRule`.
    min_dim: see `flora_jax.ProjectionRule`.
    max_aspect_ratio: see `flora_jax.ProjectionRule`.
    projection_mask: which leaves may have a compressed momentum (an
      optax-style mask; not the decay mask), see `flora_jax.ProjectionRule`.
      ``mask`` is its deprecated spelling.
    dimension_numbers: where each leaf's matrix is (e.g. a MaxText kernel's
      axes), see `flora_jax.DimensionNumbers`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.flora(1e-3, rank=128, kappa=1000)

  References:
    Hao, Cao & Mou, 2024, https://arxiv.org/abs/2402.03293;
    Shazeer & Stern, 2018 (Adafactor), https://arxiv.org/abs/1804.04235
  """
  validation.check_learning_rate('learning_rate', learning_rate)
  validation.check_finite_at_least('decay_rate', decay_rate, 0.0)
  validation.check_finite_at_least('eps', eps, 0.0)
  validation.check_finite_at_least('weight_decay', weight_decay, 0.0)
  transforms = [
      optax.scale_by_factored_rms(
          factored=True,
          decay_rate=decay_rate,
          step_offset=decay_offset,
          min_dim_size_to_factor=min_dim_size_to_factor,
          epsilon=eps,
      )
  ]
  if b1 is None and (store_projectors
                     or refresh_schedule != 'synchronous'):
    raise ValueError(
        'store_projectors and refresh_schedule are options of the'
        ' compressed momentum, and b1=None has none: drop them, or give'
        ' b1.'
    )
  if b1 is not None:
    rule = ProjectionRule(
        rank, side, min_dim, max_aspect_ratio, projection_mask,
        dimension_numbers=dimension_numbers,
    )
    transforms.append(
        flora_lib.scale_by_flora_momentum(
            b1, rule=rule, kappa=kappa, key=key, nesterov=nesterov,
            momentum_dtype=momentum_dtype, momentum_transfer=momentum_transfer,
            sketch=sketch, store_projectors=store_projectors,
            refresh_schedule=refresh_schedule,
        )
    )
  if clipping_threshold is not None:
    transforms.append(_clip_by_matrix_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    transforms.append(_scale_by_param_matrix_rms())
  if validation.may_be_nonzero(weight_decay):
    transforms.append(
        optax.add_decayed_weights(weight_decay, weight_decay_mask)
    )
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return _checked_tree(optax.chain(*transforms), _factored_moment)


@deprecation.renamed_arguments(mask='projection_mask')
def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    weight_decay: float | None = None,
    *,
    weight_decay_mask: MaskOrFn = None,
    adam: AdamFlavour = 'hf',
    projector: subspace.ProjectorName = 'svd',
    key: keys.PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
    refresh_schedule: subspace.RefreshSchedule = 'synchronous',
    distribute_refresh: bool = True,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: float | None = 4.0,
    projection_mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbersOrFn = None,
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
    b1: Adam's β1.
    b2: Adam's β2.
    eps: Adam's ε; None picks the flavour's default (1e-6 for ``'hf'``,
      1e-8 for ``'optax'``).
    weight_decay: decoupled weight decay (needs ``params`` in ``update``);
      None or 0 for none.
    weight_decay_mask: optax-style mask of the leaves to decay.
    adam: ``'hf'`` or ``'optax'``, see above.
    projector: see `scale_by_galore`.
    key: see `scale_by_galore`.
    transfer_moments: see `scale_by_galore`.
    canonical_signs: see `scale_by_galore`.
    power_iterations: of the ``'randomized'`` projector.
    oversampling: of the ``'randomized'`` projector.
    refresh_schedule: ``'synchronous'`` (the published schedule: every
      projector refitted at the same step) or ``'staggered'`` (each matrix
      at its own phase, about ``1/T`` of the refits per step), see
      `scale_by_galore`.
    distribute_refresh: under a mesh of several devices, share a refresh's
      SVDs among them, see `scale_by_galore`.
    side: which axis is compressed, see `flora_jax.ProjectionRule`.
    min_dim: see `flora_jax.ProjectionRule`.
    max_aspect_ratio: see `flora_jax.ProjectionRule`.
    projection_mask: which leaves may be projected (an optax-style mask; not
      the decay mask), see `flora_jax.ProjectionRule`. ``mask`` is its
      deprecated spelling.
    dimension_numbers: where each leaf's matrix is (e.g. a MaxText kernel's
      axes), see `flora_jax.DimensionNumbers`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.galore(1e-2, rank=128, update_proj_gap=200, scale=0.25)

  References:
    Zhao et al., 2024, https://arxiv.org/abs/2403.03507
  """
  in_subspace = functools.partial(
      subspace.scale_by_galore,
      rule=ProjectionRule(rank, side, min_dim, max_aspect_ratio,
                          projection_mask,
                          dimension_numbers=dimension_numbers),
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
  )
  return _adam_in_subspace(
      in_subspace, learning_rate, b1, b2, eps, weight_decay, weight_decay_mask,
      adam,
  )


@deprecation.renamed_arguments(mask='projection_mask')
def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    weight_decay: float | None = None,
    *,
    formulation: Formulation = 'code',
    growth_limit: float | None = 1.01,
    weight_decay_mask: MaskOrFn = None,
    adam: AdamFlavour = 'hf',
    projector: subspace.ProjectorName = 'svd',
    key: keys.PRNGKeyLike = 0,
    transfer_moments: bool = False,
    canonical_signs: bool = True,
    power_iterations: int = 2,
    oversampling: int = 8,
    refresh_schedule: subspace.RefreshSchedule = 'synchronous',
    distribute_refresh: bool = True,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: float | None = 4.0,
    projection_mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbersOrFn = None,
) -> optax.GradientTransformation:
  r"""Fira-AdamW: GaLore-AdamW plus the scaled residual and its limiter.

  The reference ``FiraAdamW`` with the defaults: per step
  ``W <- (W - lr c_t (α up(N) + lim(S))) (1 - lr wd)`` with
  ``S = φ ⊙ (G − α up(R))``; see `FiraResidual` for φ, the limiter and the
  paper's formulation, and `galore` for the Adam flavours. The reference
  scripts use α = 0.25 up to 350M parameters and 0.0625 for 1B/7B.

  Args:
    learning_rate: as in `galore`.
    rank: as in `galore`.
    update_proj_gap: as in `galore`.
    scale: as in `galore`.
    b1: as in `galore`.
    b2: as in `galore`.
    eps: as in `galore`.
    weight_decay: as in `galore`.
    formulation: ``'code'`` or ``'paper'``, see `FiraResidual`.
    growth_limit: γ >= 1 of the norm-growth limiter, None for no limiter.
    weight_decay_mask: as in `galore`.
    adam: as in `galore`.
    projector: as in `galore`.
    key: as in `galore`.
    transfer_moments: as in `galore`.
    canonical_signs: as in `galore`.
    power_iterations: as in `galore`.
    oversampling: as in `galore`.
    refresh_schedule: as in `galore`.
    distribute_refresh: as in `galore`.
    side: as in `galore`.
    min_dim: as in `galore`.
    max_aspect_ratio: as in `galore`.
    projection_mask: as in `galore`.
    dimension_numbers: as in `galore`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.fira(1e-2, rank=128, scale=0.25)

  References:
    Chen et al., 2024, https://arxiv.org/abs/2410.01623
  """
  in_subspace = functools.partial(
      subspace.scale_by_fira,
      rule=ProjectionRule(rank, side, min_dim, max_aspect_ratio,
                          projection_mask,
                          dimension_numbers=dimension_numbers),
      update_proj_gap=update_proj_gap,
      scale=scale,
      formulation=formulation,
      growth_limit=growth_limit,
      projector=projector,
      key=key,
      transfer_moments=transfer_moments,
      canonical_signs=canonical_signs,
      power_iterations=power_iterations,
      oversampling=oversampling,
      refresh_schedule=refresh_schedule,
      distribute_refresh=distribute_refresh,
  )
  return _adam_in_subspace(
      in_subspace, learning_rate, b1, b2, eps, weight_decay, weight_decay_mask,
      adam,
  )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    weight_decay: float | None = None,
    *,
    granularity: apollo_lib.Granularity = 'channel',
    growth_limit: float | None = 1.01,
    weight_decay_mask: MaskOrFn = None,
    adam: AdamFlavour = 'hf',
    key: keys.PRNGKeyLike = 0,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: float | None = 4.0,
    projection_mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbersOrFn = None,
) -> optax.GradientTransformation:
  r"""APOLLO-AdamW: the gradient scaled per channel as Adam would scale it.

  Per projected matrix ``W <- (W - lr c_t α lim(S ⊙ G)) (1 - lr wd)``: Adam
  runs on a random projection ``R = down(G)`` (Gaussian, redrawn from the
  key every ``update_proj_gap`` steps, never stored) and ``S``, the ratio of
  the norms of its output ``N = m / (sqrt(v) + ε)`` and of ``R`` per channel
  (the axis that is not compressed), scales the raw gradient; ``lim`` is
  the norm-growth limiter, ``c_t`` the bias correction (see `galore` for
  the Adam flavours and the decay of the updated weights; see
  `scale_by_apollo`). Leaves that are not projected get the same AdamW at
  full size. The defaults are the paper's: rank 256, T = 200, α = 1, γ =
  1.01; the paper trains LLaMA with learning rate 1e-2.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: r of the random projection.
    update_proj_gap: T, steps between new projections.
    scale: α, the factor on the scaled gradient. The published code's
      ``scale`` is α²: it multiplies by its square root.
    b1: Adam's β1.
    b2: Adam's β2.
    eps: Adam's ε; None picks the flavour's default (1e-6 for ``'hf'``,
      1e-8 for ``'optax'``).
    weight_decay: decoupled weight decay (needs ``params``), None or 0 for
      none.
    granularity: ``'channel'`` (APOLLO) or ``'tensor'`` (one scale per
      matrix, APOLLO-Mini's).
    growth_limit: γ >= 1 of the norm-growth limiter, None for none.
    weight_decay_mask: optax-style mask of the leaves to decay.
    adam: ``'hf'`` (the published code's) or ``'optax'``, as in `galore`.
    key: an int seed, a typed key or a raw uint32 key.
    side: as in `galore`.
    min_dim: as in `galore`.
    max_aspect_ratio: as in `galore`.
    projection_mask: as in `galore`.
    dimension_numbers: as in `galore`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.apollo(1e-2, rank=256)

  References:
    Zhu et al., 2025, https://arxiv.org/abs/2412.05270
  """
  in_subspace = functools.partial(
      apollo_lib.scale_by_apollo,
      rule=ProjectionRule(rank, side, min_dim, max_aspect_ratio,
                          projection_mask,
                          dimension_numbers=dimension_numbers),
      update_proj_gap=update_proj_gap,
      scale=scale,
      granularity=granularity,
      growth_limit=growth_limit,
      key=key,
  )
  return _adam_in_subspace(
      in_subspace, learning_rate, b1, b2, eps, weight_decay, weight_decay_mask,
      adam,
  )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 1,
    update_proj_gap: int = 200,
    scale: float = apollo_lib.APOLLO_MINI_SCALE,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformation:
  r"""APOLLO-Mini: `apollo` with one scale per matrix, from a rank-1 sketch.

  ``apollo(..., rank=1, scale=sqrt(128), granularity='tensor')``: the
  scale of each matrix (each stacked slice) is ``||N|| / ||R||`` over the
  whole rank-1 projection, so the state per ``m x n`` matrix is two vectors
  of the uncompressed side's length and one norm, close to SGD's.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: r of the projection (1 in the paper).
    update_proj_gap: T, steps between new projections.
    scale: α (the paper's sqrt(128); ``scale=128`` in the published code).
    b1: Adam's β1.
    b2: Adam's β2.
    eps: as in `apollo`.
    weight_decay: as in `apollo`.
    **kwargs: the other keyword arguments of `apollo`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.apollo_mini(1e-2)

  References:
    Zhu et al., 2025, https://arxiv.org/abs/2412.05270
  """
  kwargs.setdefault('granularity', 'tensor')
  return apollo(learning_rate, rank, update_proj_gap, scale, b1, b2, eps,
                weight_decay, **kwargs)


def _adam_in_subspace(
    in_subspace: Callable[[optax.GradientTransformation],
                          optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float | None,
    weight_decay: float | None,
    weight_decay_mask: MaskOrFn,
    adam: AdamFlavour,
) -> optax.GradientTransformation:
  """The `galore`/`fira`/`apollo` chain around ``in_subspace(inner Adam)``."""
  validation.check_learning_rate('learning_rate', learning_rate)
  validation.check_choice('adam', adam, AdamFlavour)
  validation.check_in_range('b1', b1, 0.0, 1.0)
  validation.check_in_range('b2', b2, 0.0, 1.0)
  validation.check_finite_at_least('eps', eps, 0.0)
  validation.check_finite_at_least('weight_decay', weight_decay, 0.0)
  decays = validation.may_be_nonzero(weight_decay)
  if adam == 'hf':
    eps = 1e-6 if eps is None else eps
    transforms = [
        in_subspace(adam_hf.scale_by_adam_hf(b1, b2, eps, correct_bias=False)),
        optax.scale_by_schedule(adam_hf.hf_bias_correction(b1, b2)),
        optax.scale_by_learning_rate(learning_rate),
    ]
    if decays:
      decay = adam_hf.decay_after_update(learning_rate, weight_decay)
      if weight_decay_mask is not None:
        decay = optax.masked(decay, weight_decay_mask)
      transforms.append(decay)
  else:
    eps = 1e-8 if eps is None else eps
    transforms = [in_subspace(optax.scale_by_adam(b1, b2, eps))]
    if decays:
      transforms.append(
          optax.add_decayed_weights(weight_decay, weight_decay_mask)
      )
    transforms.append(optax.scale_by_learning_rate(learning_rate))
  return _checked_tree(optax.chain(*transforms), _projectors)


def _matrix_rms(x: jax.Array) -> jax.Array:
  """The RMS of each matrix of ``x`` (its last two axes), kept as axes."""
  axes = tuple(range(max(x.ndim - 2, 0), x.ndim))
  return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(x)), axis=axes, keepdims=True))


def _clip_by_matrix_rms(threshold: float) -> optax.GradientTransformation:
  """`optax.clip_by_block_rms`, one block per matrix of a stacked leaf."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda u: u / jnp.maximum(1.0, _matrix_rms(u) / threshold), updates
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _scale_by_param_matrix_rms(
    min_scale: float = 1e-3,
) -> optax.GradientTransformation:
  """`optax.scale_by_param_block_rms`, one block per stacked matrix."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('flora(multiply_by_parameter_scale=True) needs'
                       ' params in update().')
    return jax.tree.map(
        lambda u, p: u * jnp.maximum(_matrix_rms(p), min_scale), updates,
        params,
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _factored_moment(chain_state: Any) -> Any:
  """`flora`'s factored second moment: a leaf (maybe a dummy) per param."""
  return chain_state[0].v


def _projectors(chain_state: Any) -> Any:
  """The subspace chains' projectors: a leaf or MaskedNode per param."""
  return subspace.stored_projectors(chain_state[0].projectors)


def _checked_tree(
    tx: optax.GradientTransformation,
    parameter_tree: Callable[[optax.OptState], optax.Params],
) -> optax.GradientTransformation:
  """``tx`` that compares the updates' tree with the params' at `update`.

  The chains start with optax transforms, which would fail on a mismatched
  tree with a bare pytree error before the projecting transform's own check
  names the leaf. ``parameter_tree`` picks a tree with the parameters' paths
  out of the chain's state.

  ``init`` sees arrays: Python numbers are converted and NNX Variables
  unwrapped. optax initialisers keep each Variable, sharding metadata
  included, around the state leaf made from it, which suits a moment of the
  parameter's shape but not a factored statistic of another shape
  (`optax.scale_by_factored_rms`): `nnx.Optimizer` would reshard its
  ``(m,)`` vector with the parameter's 2-D spec and fail. The state's
  shardings come from `state_shardings` instead.
  """

  def init_fn(params):
    params = jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, (int, float)) else x,
        tree_util.unwrap_variables(params),
    )
    return tx.init(params)

  def update_fn(updates, state, params=None):
    validation.check_same_paths(
        updates, parameter_tree(state), 'the optimizer'
    )
    return tx.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)
