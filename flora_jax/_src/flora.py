"""Flora: gradient and momentum compression by random projections.

Flora (Hao, Cao & Mou, "Flora: Low-Rank Adapters Are Secretly Gradient
Compressors", ICML 2024, https://arxiv.org/abs/2402.03293) observes that LoRA
with a frozen random down-projection trains like plain gradient descent on a
randomly compressed gradient, and that re-drawing the projection every
``kappa`` steps makes the accumulated update high-rank. Projections are
Gaussian, regenerated from a PRNG key whenever needed, so the optimizer state
of a compressed ``m x n`` matrix is ``r * max(m, n)`` numbers instead of
``m * n``.

This module holds the transforms: `flora_compress` (the compressor on its
own) and `scale_by_flora_momentum` (momentum kept in compressed form). The
optimizer alias `flora` is in `alias.py`, compressed gradient accumulation
(`FloraMultiSteps`) in `accumulation.py`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import compat
from flora_jax._src import deprecation
from flora_jax._src import keys
from flora_jax._src import projection
from flora_jax._src import projectors
from flora_jax._src import settings
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.projection import LeafPlan
from flora_jax._src.projection import ProjectionRule

MomentumTransfer = Literal['least_squares', 'paper', 'reset']


class FloraCompressState(NamedTuple):
  """State of `flora_compress`: no per-leaf arrays at all."""

  count: jax.Array  # int32[]: number of updates so far.
  key: jax.Array  # key[]: base key of every projection.
  # {'kappa=... plans=...': int8[]}: what the state was made for; `update`
  # refuses a state made for other settings (see `adopt_settings`).
  settings: dict[str, jax.Array]


class FloraMomentumState(NamedTuple):
  """State of `scale_by_flora_momentum`."""

  count: jax.Array  # int32[]: number of updates so far.
  key: jax.Array  # key[]: base key of every projection.
  # Per leaf: the compressed momentum C, shaped (..., r, n) for side 'left',
  # (..., m, r) for side 'right'; the full momentum (leaf shape) for leaves
  # that are not projected. dtype: `momentum_dtype`.
  momentum: optax.Updates
  # {'kappa=... momentum_transfer=... plans=...': int8[]}, as in
  # `FloraCompressState`.
  settings: dict[str, jax.Array]


@deprecation.flat_projection_arguments
def flora_compress(
    rule: ProjectionRule | int,
    *,
    kappa: int = 1000,
    key: keys.PRNGKeyLike = 0,
    sketch: projectors.Sketch = 'gaussian',
) -> optax.GradientTransformation:
  r"""Replaces each projected gradient by its random-projection round trip.

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
    rule: which leaves are projected, on which side and at which rank: a
      `flora_jax.ProjectionRule`, or an int r for ``ProjectionRule(r)``.
    kappa: a new projection is drawn every ``kappa`` updates.
    key: an int seed, a typed key (`jax.random.key`) or a raw uint32 key.
    sketch: the entries of ``Q``: ``'gaussian'`` (the paper's) or
      ``'rademacher'`` (``±1/sqrt(r)``: also unbiased, and cheaper to draw;
      see `flora_jax.projections.sample_projector`).

  Returns:
    An `optax.GradientTransformation` whose state is `FloraCompressState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(flora_jax.flora_compress(8, kappa=100), optax.sgd(0.1))

  References:
    Hao, Cao & Mou, 2024, https://arxiv.org/abs/2402.03293
  """
  rule = ProjectionRule.of(rule)
  kappa = validation.check_positive_or_traced('kappa', kappa)
  validation.check_key('key', key)
  sketch_record = projectors.sketch_setting(sketch)
  announce = projection.plan_announcer(
      'flora_jax.flora_compress', 'the rest passes uncompressed'
  )

  def init_fn(params):
    plans = rule.plan(params)
    announce(plans)
    return FloraCompressState(
        count=jnp.zeros([], jnp.int32),
        key=keys.as_prng_key(key),
        settings=settings.record(plans, kappa=kappa, **sketch_record),
    )

  def update_fn(updates, state, params=None):
    validation.check_updates_match_params(updates, params)
    plans = rule.plan(updates)
    settings.check(state.settings, plans, kappa=kappa, **sketch_record)
    drawn = projectors.random_projectors(
        state.key, plans, state.count // kappa, sketch)

    def compress(plan, g, q):
      if not plan.projected:
        return g
      low_rank = projectors.project_down(q, plan.to_matrix(g), plan.side)
      back = projectors.project_up(q, low_rank, plan.side)
      return plan.from_matrix(back, g).astype(g.dtype)

    new_updates = jax.tree.map(compress, plans, updates, drawn)
    return new_updates, FloraCompressState(
        count=compat.safe_increment(state.count),
        key=state.key,
        settings=state.settings,
    )

  return optax.GradientTransformation(init_fn, update_fn)


@deprecation.flat_projection_arguments
def scale_by_flora_momentum(
    b1: float = 0.9,
    *,
    rule: ProjectionRule | int,
    kappa: int = 1000,
    key: keys.PRNGKeyLike = 0,
    nesterov: bool = False,
    momentum_dtype: jax.typing.DTypeLike | None = None,
    momentum_transfer: MomentumTransfer = 'least_squares',
    sketch: projectors.Sketch = 'gaussian',
) -> optax.GradientTransformation:
  r"""Exponential moving average of the updates, stored in compressed form.

  For a projected leaf the state is ``C = down(m)``, ``r * max(m, n)``
  numbers. With ``Q_t`` the projector of the current window of ``kappa``
  steps and ``u_t`` the incoming update:

  .. math::

    C_{t-1} &\leftarrow \mathrm{down}_{Q_t}(\mathrm{up}_{Q_{t-1}}(C_{t-1}))
        \quad\text{(only when } Q \text{ was just re-drawn)} \\
    C_t &= \beta_1 C_{t-1} + (1 - \beta_1)\, \mathrm{down}_{Q_t}(u_t) \\
    \text{output}_t &= \beta_1\, \mathrm{up}_{Q_t}(C_{t-1})
        + (1 - \beta_1)\, u_t

  The current update enters the output exactly: only the history is
  compressed. The transfer at a resample (``momentum_transfer``) moves the
  momentum into the new subspace:

  * ``'least_squares'`` (default): the ``C`` whose ``up_{Q_t}(C)`` is
    closest to ``up_{Q_{t-1}}(C_{t-1})``, i.e. the old momentum projected
    orthogonally onto the new subspace (`flora_jax.projections.change_basis`
    with ``least_squares=True``). Its norm never grows, so the momentum is
    stable at every ``kappa``.
  * ``'paper'``: ``down_{Q_t}(up_{Q_{t-1}}(C))``, the paper's Algorithm 2
    and its PyTorch code. Unbiased, but each transfer multiplies the
    momentum's expected norm by ``sqrt(dim / r)`` while ``kappa`` steps
    shrink it by ``b1^kappa``: when ``sqrt(dim / r) b1^kappa > 1`` the
    momentum grows geometrically (to NaN in a long run). `init` refuses
    such a configuration, naming the leaf.
  * ``'reset'``: start again from zero.

  Measured on the byte-level LM benchmark
  (``benchmarks/benchmark_momentum_transfer.py``, docs: "Flora"), see the
  table there for the choice of default. (The published optax code
  transfers with the old projection on both sides, which blows the momentum
  up and decorrelates it from the gradient after each resample; it is
  deliberately not offered.)

  With ``nesterov=True`` the output is the published JAX code's
  ``β1 up(C_t) + (1 - β1) u_t`` instead.

  Leaves that are not projected keep a full momentum with the same formulas
  (``up``/``down`` the identity), i.e. ``m_t = β1 m_{t-1} + (1 - β1) u_t`` is
  the output (or ``β1 m_t + (1 - β1) u_t`` with ``nesterov``). No bias
  correction is applied, as in the paper.

  Args:
    b1: momentum decay β1 in [0, 1).
    rule: which leaves have a compressed momentum, on which side and at which
      rank: a `flora_jax.ProjectionRule`, or an int r for
      ``ProjectionRule(r)``.
    kappa: a new projection is drawn every ``kappa`` updates.
    key: an int seed, a typed key or a raw uint32 key.
    nesterov: use the Nesterov-like output of the published JAX code.
    momentum_dtype: dtype of the stored momentum (None means float32;
      bfloat16 halves it again); arithmetic is done in float32.
    momentum_transfer: how the momentum moves into a re-drawn subspace:
      ``'least_squares'``, ``'paper'`` or ``'reset'`` (see above).
    sketch: the entries of the projections, ``'gaussian'`` or
      ``'rademacher'``, see `flora_compress`.

  Returns:
    An `optax.GradientTransformation` whose state is `FloraMomentumState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(
    ...     optax.scale_by_factored_rms(),
    ...     flora_jax.scale_by_flora_momentum(0.9, rule=64),
    ...     optax.scale_by_learning_rate(1e-2),
    ... )

  References:
    Hao, Cao & Mou, 2024, Algorithm 2, https://arxiv.org/abs/2402.03293
  """
  rule = ProjectionRule.of(rule)
  kappa = validation.check_positive_or_traced('kappa', kappa)
  validation.check_in_range('b1', b1, 0.0, 1.0)
  validation.check_bool('nesterov', nesterov)
  momentum_dtype = validation.check_float_dtype(
      'momentum_dtype', momentum_dtype
  )
  validation.check_key('key', key)
  validation.check_choice(
      'momentum_transfer', momentum_transfer, MomentumTransfer
  )
  recorded = dict(kappa=kappa, momentum_transfer=momentum_transfer,
                  **projectors.sketch_setting(sketch))

  announce = projection.plan_announcer('flora_jax.scale_by_flora_momentum')

  def init_fn(params):
    params = tree_util.unwrap_variables(params)
    plans = rule.plan(params)
    announce(plans)
    if momentum_transfer == 'paper':
      jax.tree.map(lambda plan: _check_paper_transfer(plan, b1, kappa), plans)

    def zeros(plan, leaf):
      validation.check_real_float_leaf(
          plan.path, leaf, 'a momentum',
          'Exclude it with optax.masked or optax.partition.',
      )
      return jnp.zeros(plan.low_rank_shape, momentum_dtype)

    return FloraMomentumState(
        count=jnp.zeros([], jnp.int32),
        key=keys.as_prng_key(key),
        momentum=jax.tree.map(zeros, plans, params),
        settings=settings.record(
            plans, **recorded, **keys.stacked_draws_setting(plans)),
    )

  def update_fn(updates, state, params=None):
    validation.check_updates_match_params(updates, params)
    validation.check_same_paths(updates, state.momentum, 'the momentum')
    plans = rule.plan(updates)
    jax.tree.map(lambda plan, c: validation.check_state_shape(
        plan, c, 'a momentum'), plans, state.momentum)
    settings.check(state.settings, plans, **recorded,
                   **keys.stacked_draws_setting(plans))
    index = state.count // kappa
    resampled = (state.count > 0) & (state.count % kappa == 0)
    current_keys, previous_keys = projectors.stack_keys(
        state.key, plans, [index, index - 1])
    stacks = projectors.draw_from_keys(current_keys, sketch)
    drawn = projectors.unstack(plans, stacks)
    transitions = _transitions(plans, previous_keys, stacks, resampled,
                               momentum_transfer, sketch)

    def update_leaf(plan, u, c, q, transition):
      out, c_new = _momentum_step(
          plan, plan.to_matrix(u.astype(jnp.float32)), c, q, transition,
          b1, nesterov, resampled,
      )
      return (plan.from_matrix(out, u).astype(u.dtype),
              c_new.astype(momentum_dtype))

    results = jax.tree.map(update_leaf, plans, updates, state.momentum,
                           drawn, transitions)
    new_updates, new_momentum = tree_util.unzip_leaves(plans, results, 2)
    return new_updates, FloraMomentumState(
        count=compat.safe_increment(state.count),
        key=state.key,
        momentum=new_momentum,
        settings=state.settings,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _transitions(
    plans, previous_keys, stacks, resampled, transfer: MomentumTransfer,
    sketch: projectors.Sketch,
):
  """Each projected leaf's ``r x r`` basis change at a resample, else zeros.

  One branch for all leaves, on the per-shape stacks of projectors
  (`projectors.draw_stacks`): the previous projectors are drawn in one
  batch from ``previous_keys``, and the matrices solved one after another
  in one loop. None for every leaf with ``transfer='reset'``.
  """
  if transfer == 'reset':
    return jax.tree.map(lambda _: None, plans)
  least_squares = transfer == 'least_squares'

  def changes(stacks):
    previous = projectors.draw_from_keys(previous_keys, sketch)
    return {shape: compat.each_matrix(
        lambda q_old, q: projectors.basis_change_matrix(
            q_old, q, least_squares=least_squares),
        previous[shape], q_new) for shape, q_new in stacks.items()}

  def unchanged(stacks):
    return {shape: jnp.zeros(q.shape[:-2] + (q.shape[-1],) * 2, q.dtype)
            for shape, q in stacks.items()}

  return projectors.unstack(
      plans, compat.cond(resampled, changes, unchanged, stacks))


def _momentum_step(
    plan: LeafPlan,
    u: jax.Array,
    c: jax.Array,
    q: jax.Array | None,
    transition: jax.Array | None,
    b1: float,
    nesterov: bool,
    resampled: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """One leaf's (output, new momentum), in float32; see the formulas above.

  ``transition`` moves the momentum into the subspace of ``q`` at a
  resample (None: start again from zero).
  """
  side = plan.side
  if side is None:  # not projected: a full momentum
    c = c.astype(jnp.float32)
    c_new = b1 * c + (1 - b1) * u
    out = b1 * c_new + (1 - b1) * u if nesterov else c_new
    return out, c_new
  assert q is not None

  # Everything below waits for this leaf's update (`compat.after`): its
  # full-size temporaries (the up-projection, the output) then live only
  # while this leaf is updated, not from the start of the step.
  c = compat.after(c, u).astype(jnp.float32)

  def moved(c, transition):
    if transition is None:  # momentum_transfer='reset'
      return jnp.zeros_like(c)
    return projectors.apply_basis_change(transition, c, side)

  c = compat.cond(resampled, moved, lambda c, _: c, c, transition)
  c_new = b1 * c + (1 - b1) * projectors.project_down(q, u, side)
  history = c_new if nesterov else c
  out = b1 * projectors.project_up(q, history, side) + (1 - b1) * u
  return out, c_new


def _check_paper_transfer(plan: LeafPlan, b1, kappa) -> None:
  """Refuses a paper transfer that grows the momentum at every resample."""
  rank = plan.rank
  if rank is None or not (validation.is_concrete(b1)
                          and validation.is_concrete(kappa)):
    return
  growth = math.sqrt(plan.dim / rank) * float(b1) ** int(kappa)
  if growth > 1:
    shortest = math.ceil(math.log(math.sqrt(rank / plan.dim))
                         / math.log(float(b1)))
    raise ValueError(
        f"momentum_transfer='paper' diverges for leaf {plan.path}: each"
        f' resample multiplies its momentum norm by about sqrt(dim / r) ='
        f' sqrt({plan.dim} / {rank}) while kappa={kappa} steps decay it'
        f' by b1^kappa = {float(b1)}^{kappa}; the product {growth:.3g} > 1'
        f' grows it geometrically. Use kappa >= {shortest}, or'
        " momentum_transfer='least_squares' (stable at any kappa)."
    )
