"""Flora: gradient and momentum compression by random projections.

Flora (Hao, Cao & Mou, "Flora: Low-Rank Adapters Are Secretly Gradient
Compressors", ICML 2024, https://arxiv.org/abs/2402.03293) observes that LoRA
with a frozen random down-projection trains like plain gradient descent on a
randomly compressed gradient, and that re-drawing the projection every
``kappa`` steps makes the accumulated update high-rank. Projections are
Gaussian, regenerated from a PRNG key whenever needed, so the optimizer state
of a compressed ``m x n`` matrix is ``r * max(m, n)`` numbers instead of
``m * n``.

This module provides

* `flora_compress`: the compressor on its own, chained before any optimizer;
* `scale_by_flora_momentum`: momentum kept in compressed form;
* `flora`: the paper's optimizer (Adafactor second moment + compressed
  momentum + block-RMS clipping).

Compressed gradient accumulation is `flora_jax.FloraMultiSteps`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from flora_jax import _compat
from flora_jax import _validation
from flora_jax import projection
from flora_jax.projection import MaskOrFn, PRNGKeyLike, Side

_DEFAULT_KAPPA = 1000


class FloraCompressState(NamedTuple):
  """State of `flora_compress`: no per-leaf arrays at all."""

  count: jax.Array  # int32[]: number of updates so far.
  key: jax.Array  # key[]: base key of every projection.


class FloraMomentumState(NamedTuple):
  """State of `scale_by_flora_momentum`."""

  count: jax.Array  # int32[]: number of updates so far.
  key: jax.Array  # key[]: base key of every projection.
  # Per leaf: the compressed momentum C, shaped (..., r, n) for side 'left',
  # (..., m, r) for side 'right'; the full momentum (leaf shape) for leaves
  # that are not projected. dtype: `momentum_dtype`.
  momentum: optax.Updates


def flora_compress(
    rank: int,
    *,
    kappa: int = _DEFAULT_KAPPA,
    key: PRNGKeyLike = 0,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Compresses and decompresses each projected gradient with a random projection.

  Each projected gradient ``G`` (see `flora_jax.ProjectionRule`) is replaced
  by

  .. math::

    \hat G = Q Q^\top G \;\; (\text{side 'left'}) \quad\text{or}\quad
    \hat G = G Q Q^\top \;\; (\text{side 'right'}),
    \qquad Q_{ij} \sim \mathcal N(0, 1/r),

  with ``Q`` re-drawn every ``kappa`` steps from the key in the state. Then
  ``E[Ĝ] = G`` and a single draw has norm about ``sqrt(dim/r) * |G|``.
  Other leaves pass through unchanged.

  What this is: with `optax.sgd` downstream, one step equals one step of LoRA
  that trains the factor B while the other factor A is frozen at the current
  projection (``W + Q B`` for side 'left'): the weight moves by
  ``-lr Q Qᵀ G``. Over resamples the accumulated update has rank up to
  ``r * steps / kappa``, unlike LoRA's.

  What this is not: a memory saving on its own. A downstream optimizer such as
  `optax.adam` still keeps full-size moments of ``Ĝ``. To shrink optimizer
  state use `scale_by_flora_momentum` / `flora` (compressed momentum) or
  `FloraMultiSteps` (compressed gradient accumulation).

  Args:
    rank: projection rank r.
    kappa: a new projection is drawn every ``kappa`` updates.
    key: an int seed, a typed key (`jax.random.key`) or a raw uint32 key.
    side: which axis is compressed, see `flora_jax.ProjectionRule`.
    min_dim: leaves with ``min(m, n) < min_dim`` pass through unchanged.
    max_aspect_ratio: leaves more elongated than this pass through unchanged.
    mask: optax-style mask restricting the projected leaves.

  Returns:
    An `optax.GradientTransformation` whose state is `FloraCompressState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(flora_jax.flora_compress(8, kappa=100), optax.sgd(0.1))

  References:
    Hao, Cao & Mou, 2024, https://arxiv.org/abs/2402.03293
  """
  rule = projection.ProjectionRule(rank, side, min_dim, max_aspect_ratio, mask)
  kappa = _validation.check_positive_or_traced('kappa', kappa)
  projection.check_key_argument(key)

  def init_fn(params):
    rule.plan(params)  # Refuses unusable leaves now rather than at update.
    return FloraCompressState(
        count=jnp.zeros([], jnp.int32), key=projection.as_prng_key(key)
    )

  def update_fn(updates, state, params=None):
    _validation.check_updates_match_params(updates, params)
    plans = rule.plan(updates)
    index = state.count // kappa

    def compress(plan, g):
      if not plan.projected:
        return g
      q = projection.random_projector(state.key, plan, index)
      low_rank = projection.project_down(q, g, plan.side)
      return projection.project_up(q, low_rank, plan.side).astype(g.dtype)

    new_updates = jax.tree.map(compress, plans, updates)
    return new_updates, FloraCompressState(
        count=optax.safe_increment(state.count), key=state.key
    )

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_flora_momentum(
    b1: float = 0.9,
    *,
    rank: int,
    kappa: int = _DEFAULT_KAPPA,
    key: PRNGKeyLike = 0,
    nesterov: bool = False,
    momentum_dtype: Optional[jax.typing.DTypeLike] = None,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Exponential moving average of the updates, stored in compressed form.

  For a projected leaf the state is ``C = down(m)``, ``r * max(m, n)``
  numbers. With ``Q_t`` the projector of the current window of ``kappa``
  steps and ``u_t`` the incoming update:

  .. math::

    C_{t-1} &\leftarrow \mathrm{down}_{Q_t}(\mathrm{up}_{Q_{t-1}}(C_{t-1}))
        \quad\text{(only when } Q \text{ was just re-drawn)} \\
    C_t &= \beta_1 C_{t-1} + (1 - \beta_1)\, \mathrm{down}_{Q_t}(u_t) \\
    \text{output}_t &= \beta_1\, \mathrm{up}_{Q_t}(C_{t-1}) + (1 - \beta_1)\, u_t

  The transfer at a resample moves the momentum into the new subspace, as in
  the paper's Algorithm 2 and its PyTorch code, and the current update enters
  the output exactly: only the history is compressed. (The published optax
  code transfers with the old projection on both sides, which blows the
  momentum up and decorrelates it from the gradient after each resample; it
  is deliberately not offered.)

  With ``nesterov=True`` the output is the published JAX code's
  ``β1 up(C_t) + (1 - β1) u_t`` instead.

  Leaves that are not projected keep a full momentum with the same formulas
  (``up``/``down`` the identity), i.e. ``m_t = β1 m_{t-1} + (1 - β1) u_t`` is
  the output (or ``β1 m_t + (1 - β1) u_t`` with ``nesterov``). No bias
  correction is applied, as in the paper.

  Args:
    b1: momentum decay β1 in [0, 1).
    rank: projection rank r.
    kappa: a new projection is drawn every ``kappa`` updates.
    key: an int seed, a typed key or a raw uint32 key.
    nesterov: use the Nesterov-like output of the published JAX code.
    momentum_dtype: dtype of the stored momentum (None means float32; bfloat16
      halve it again); arithmetic is done in float32.
    side, min_dim, max_aspect_ratio, mask: see `flora_jax.ProjectionRule`.

  Returns:
    An `optax.GradientTransformation` whose state is `FloraMomentumState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     optax.scale_by_factored_rms(),
    ...     flora_jax.scale_by_flora_momentum(0.9, rank=64),
    ...     optax.scale_by_learning_rate(1e-2),
    ... )

  References:
    Hao, Cao & Mou, 2024, Algorithm 2, https://arxiv.org/abs/2402.03293
  """
  rule = projection.ProjectionRule(rank, side, min_dim, max_aspect_ratio, mask)
  kappa = _validation.check_positive_or_traced('kappa', kappa)
  _validation.check_in_range('b1', b1, 0.0, 1.0)
  momentum_dtype = _validation.check_float_dtype('momentum_dtype', momentum_dtype)
  projection.check_key_argument(key)

  def init_fn(params):
    params = projection.unwrap_variables(params)
    plans = rule.plan(params)

    def zeros(plan, leaf):
      _check_real_float_leaf(plan.path, leaf)
      return jnp.zeros(plan.low_rank_shape, momentum_dtype)

    return FloraMomentumState(
        count=jnp.zeros([], jnp.int32),
        key=projection.as_prng_key(key),
        momentum=jax.tree.map(zeros, plans, params),
    )

  def update_fn(updates, state, params=None):
    _validation.check_updates_match_params(updates, params)
    _validation.check_same_paths(updates, state.momentum, 'the momentum')
    plans = rule.plan(updates)
    index = state.count // kappa
    resampled = (state.count > 0) & (state.count % kappa == 0)

    def update_leaf(plan, u, c):
      projection.check_state_shape(plan, c, 'momentum')
      u32 = u.astype(jnp.float32)
      c = c.astype(jnp.float32)
      if not plan.projected:
        c_new = b1 * c + (1 - b1) * u32
        out = b1 * c_new + (1 - b1) * u32 if nesterov else c_new
        return out.astype(u.dtype), c_new.astype(momentum_dtype)

      q = projection.random_projector(state.key, plan, index)

      def transfer(c):
        q_old = projection.random_projector(state.key, plan, index - 1)
        full = projection.project_up(q_old, c, plan.side)
        return projection.project_down(q, full, plan.side)

      c = _compat.cond(resampled, transfer, lambda c: c, c)
      c_new = b1 * c + (1 - b1) * projection.project_down(q, u32, plan.side)
      history = c_new if nesterov else c
      out = b1 * projection.project_up(q, history, plan.side) + (1 - b1) * u32
      return out.astype(u.dtype), c_new.astype(momentum_dtype)

    results = jax.tree.map(update_leaf, plans, updates, state.momentum)
    new_updates, new_momentum = projection.unzip_leaves(plans, results, 2)
    return new_updates, FloraMomentumState(
        count=optax.safe_increment(state.count),
        key=state.key,
        momentum=new_momentum,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _check_real_float_leaf(path: str, leaf: Any) -> None:
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'Parameter {path} has dtype {dtype}; a momentum needs a real'
        ' floating parameter. Exclude it with optax.masked or'
        ' optax.partition.'
    )


def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    kappa: int = _DEFAULT_KAPPA,
    b1: Optional[float] = 0.9,
    *,
    key: PRNGKeyLike = 0,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = False,
    weight_decay: Optional[float] = None,
    weight_decay_mask: MaskOrFn = None,
    nesterov: bool = False,
    momentum_dtype: Optional[jax.typing.DTypeLike] = None,
    side: Side = 'auto',
    min_dim: int = 128,
    max_aspect_ratio: Optional[float] = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""The Flora optimizer: Adafactor with compressed momentum.

  Built from optax pieces, in the order of the paper:

  1. `optax.scale_by_factored_rms`: Adafactor's factored second moment,
     ``u = g / sqrt(v̂)`` (decay ``1 - t^{-decay_rate}``);
  2. `scale_by_flora_momentum`: momentum of ``u`` kept as an
     ``r x max(m, n)`` sketch for projected matrices (skipped if ``b1`` is
     None);
  3. `optax.clip_by_block_rms`: each leaf's update clipped to RMS
     ``clipping_threshold``;
  4. `optax.scale_by_param_block_rms` if ``multiply_by_parameter_scale``
     (Adafactor's relative step size);
  5. `optax.add_decayed_weights`: decoupled weight decay, scaled by the
     learning rate as in `optax.adamw`;
  6. `optax.scale_by_learning_rate`.

  Optimizer state per projected ``m x n`` matrix: ``m + n`` (factored second
  moment) plus ``r * max(m, n)`` (momentum) numbers, against ``2 m n`` for
  Adam.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank: projection rank of the momentum.
    kappa: the momentum projection is re-drawn every ``kappa`` steps.
    b1: momentum decay; None for no momentum (plain Adafactor update).
    key: an int seed, a typed key or a raw uint32 key.
    decay_rate, decay_offset, min_dim_size_to_factor, eps: of
      `optax.scale_by_factored_rms`.
    clipping_threshold: block-RMS clipping threshold, None to disable.
    multiply_by_parameter_scale: scale steps by the parameters' RMS; then
      ``learning_rate`` is relative (needs ``params`` in ``update``).
    weight_decay: decoupled weight decay rate (needs ``params``), None or 0
      for none.
    weight_decay_mask: optax-style mask of the leaves to decay.
    nesterov, momentum_dtype: see `scale_by_flora_momentum`.
    side, min_dim, max_aspect_ratio, mask: which leaves have compressed
      momentum, see `flora_jax.ProjectionRule`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.flora(1e-3, rank=128, kappa=1000)

  References:
    Hao, Cao & Mou, 2024, https://arxiv.org/abs/2402.03293;
    Shazeer & Stern, 2018 (Adafactor), https://arxiv.org/abs/1804.04235
  """
  transforms = [
      optax.scale_by_factored_rms(
          factored=True,
          decay_rate=decay_rate,
          step_offset=decay_offset,
          min_dim_size_to_factor=min_dim_size_to_factor,
          epsilon=eps,
      )
  ]
  if b1 is not None:
    transforms.append(
        scale_by_flora_momentum(
            b1,
            rank=rank,
            kappa=kappa,
            key=key,
            nesterov=nesterov,
            momentum_dtype=momentum_dtype,
            side=side,
            min_dim=min_dim,
            max_aspect_ratio=max_aspect_ratio,
            mask=mask,
        )
    )
  if clipping_threshold is not None:
    transforms.append(optax.clip_by_block_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    transforms.append(optax.scale_by_param_block_rms())
  if _validation.may_be_nonzero(weight_decay):
    transforms.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  return projection.init_on_arrays(optax.chain(*transforms))
