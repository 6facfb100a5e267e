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

import functools
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
from flora_jax._src import refresh
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


class FloraStoredMomentumState(NamedTuple):
  """State of `scale_by_flora_momentum` with ``store_projectors=True``."""

  count: jax.Array  # int32[]: number of updates so far.
  key: jax.Array  # key[]: base key of every projection.
  momentum: optax.Updates  # as in `FloraMomentumState`.
  # Per projected leaf: the projector of its current window, float32
  # (..., dim, r); optax.MaskedNode() for the other leaves.
  projectors: optax.Params
  settings: dict[str, jax.Array]  # as in `FloraMomentumState`.


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
    store_projectors: bool = False,
    refresh_schedule: refresh.RefreshSchedule = 'synchronous',
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

  By default every step regenerates its projectors from the key, as the
  paper does, and stores none. ``store_projectors=True`` keeps each
  window's projectors in the state instead, ``dim * r`` more numbers per
  projected matrix (as many again as a square matrix's momentum; the state
  stays ``O(r (m + n))``), so that a step draws nothing until the next
  resample: that draw is most of what a steady step costs beyond its
  two products (docs: "Speed"). The values are those of the default,
  bit for bit. ``refresh_schedule='staggered'`` (which needs stored
  projectors) also spreads the resamples: each stacked slice of each
  projected leaf gets a phase in ``[0, kappa)``, hashed from its path and
  slice number, and is re-drawn when ``count > 0`` and
  ``(count - phase) % kappa == 0``: every ``kappa`` steps as before, but
  a step re-draws ``1/kappa`` of the slices on average instead of all of
  them (the phases are hashed, not balanced: a few may fall on one step).
  A slice's first window is then at most ``kappa`` steps, and its
  projectors are drawn from the key with the step count instead of the
  window number.

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
    store_projectors: keep each window's projectors in the state instead of
      regenerating them at every step (see above).
    refresh_schedule: ``'synchronous'`` (every projector re-drawn at the
      same step, as published) or ``'staggered'`` (spread over the
      ``kappa`` steps; needs ``store_projectors=True``).

  Returns:
    An `optax.GradientTransformation` whose state is `FloraMomentumState`,
    or `FloraStoredMomentumState` with ``store_projectors=True``.

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
  staggered = _check_storage(store_projectors, refresh_schedule)
  recorded = dict(kappa=kappa, momentum_transfer=momentum_transfer,
                  **projectors.sketch_setting(sketch))
  if store_projectors:
    recorded.update(store_projectors=True, refresh_schedule=refresh_schedule)

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

    count = jnp.zeros([], jnp.int32)
    base_key = keys.as_prng_key(key)
    momentum = jax.tree.map(zeros, plans, params)
    record = settings.record(plans, **recorded,
                             **keys.stacked_draws_setting(plans))
    if not store_projectors:
      return FloraMomentumState(count, base_key, momentum, record)
    return FloraStoredMomentumState(
        count, base_key, momentum,
        projectors=_masked_elsewhere(plans, projectors.random_projectors(
            base_key, plans, 0, sketch)),
        settings=record,
    )

  def update_fn(updates, state, params=None):
    validation.check_updates_match_params(updates, params)
    validation.check_same_paths(updates, state.momentum, 'the momentum')
    plans = rule.plan(updates)
    jax.tree.map(lambda plan, c: validation.check_state_shape(
        plan, c, 'a momentum'), plans, state.momentum)
    _check_state_kind(state, store_projectors)
    settings.check(state.settings, plans, **recorded,
                   **keys.stacked_draws_setting(plans))
    if store_projectors:
      current, momentum, pending_moves = _resample_stored(
          plans, state, kappa, staggered, momentum_transfer, sketch)
    else:
      current, momentum, pending_moves = _resample_regenerated(
          plans, state, kappa, momentum_transfer, sketch)

    def update_leaf(plan, u, c, q, pending_move):
      out, c_new = _momentum_step(
          plan, plan.to_matrix(u.astype(jnp.float32)), c, q, b1, nesterov,
          pending_move)
      return (plan.from_matrix(out, u).astype(u.dtype),
              c_new.astype(momentum_dtype))

    results = jax.tree.map(update_leaf, plans, updates, momentum, current,
                           pending_moves)
    new_updates, new_momentum = tree_util.unzip_leaves(plans, results, 2)
    count = compat.safe_increment(state.count)
    if store_projectors:
      return new_updates, state._replace(
          count=count, momentum=new_momentum,
          projectors=_masked_elsewhere(plans, current))
    return new_updates, state._replace(count=count, momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_storage(store_projectors, refresh_schedule) -> bool:
  """Whether resamples are staggered; raises on what cannot be."""
  validation.check_bool('store_projectors', store_projectors)
  validation.check_choice('refresh_schedule', refresh_schedule,
                          refresh.RefreshSchedule)
  if refresh_schedule != 'staggered':
    return False
  if not store_projectors:
    raise ValueError(
        "refresh_schedule='staggered' needs store_projectors=True: a slice"
        ' re-drawn at its own step must keep its projector until its next'
        ' one (regenerated projectors are all re-drawn at the same steps).'
    )
  return True


def _check_state_kind(state, store_projectors: bool) -> None:
  """Raises if the state does (not) hold projectors, unlike this transform."""
  stored = isinstance(state, FloraStoredMomentumState)
  if stored == store_projectors:
    return
  have, want = ('holds', 'regenerates') if stored else ('has no', 'stores')
  raise ValueError(
      f'The state {have} stored projectors, but this'
      f' scale_by_flora_momentum {want} them: it was made with'
      f' store_projectors={stored}, this transform has'
      f' store_projectors={store_projectors}. Restore it into a transform'
      ' configured as it was saved (the momentum is only meaningful with'
      ' the projectors it was compressed with).'
  )


def _masked_elsewhere(plans, tree):
  """``tree``'s projected leaves, `optax.MaskedNode` for the others."""
  return jax.tree.map(
      lambda plan, x: x if plan.projected else optax.MaskedNode(),
      plans, tree, is_leaf=lambda x: x is None)


def _resample_regenerated(plans, state, kappa, transfer, sketch):
  """This step's projectors, drawn afresh, and each leaf's momentum move.

  Returns ``(projectors, momentum, pending_moves)``: the momentum as
  stored, and per leaf a function moving it into the new subspace when this
  step resamples (applied in `_momentum_step`).
  """
  index = state.count // kappa
  resampled = (state.count > 0) & (state.count % kappa == 0)
  current_keys, previous_keys = projectors.stack_keys(
      state.key, plans, [index, index - 1])
  stacks = projectors.draw_from_keys(current_keys, sketch)
  transitions = _transitions(plans, previous_keys, stacks, resampled,
                             transfer, sketch)

  def move_at_resample(plan, transition):
    if not plan.projected:
      return None

    def moved(c):
      if transition is None:  # momentum_transfer='reset'
        return jnp.zeros_like(c)
      return projectors.apply_basis_change(transition, c, plan.side)

    return lambda c: compat.cond(resampled, moved, lambda c: c, c)

  moves = jax.tree.map(move_at_resample, plans, transitions,
                       is_leaf=lambda x: x is None)
  return projectors.unstack(plans, stacks), state.momentum, moves


def _resample_stored(plans, state, kappa, staggered, transfer, sketch):
  """The stored projectors, re-drawn where due, and the momentum moved.

  Only at steps that re-draw something: the draws in one branch for all
  leaves (one generator per projector shape), each leaf's move in a branch
  of its own (so that its result reads that leaf alone, as
  `flora_jax.fused_train_step` needs); under the staggered schedule only
  the due slices. Returns ``(projectors, momentum, pending_moves)`` as
  `_resample_regenerated` does, the momentum already moved (float32) and
  no move pending (None).
  """
  due = _due_slices(plans, state.count, kappa, staggered)
  any_due = jnp.any(jnp.stack([jnp.any(d) for d in jax.tree.leaves(due)]
                              or [jnp.zeros([], bool)]))
  # Staggered slices re-draw at any step: the count keeps their draws
  # apart; synchronous ones use the window number, as regenerated ones.
  index = state.count if staggered else state.count // kappa
  row_keys = projectors.stack_keys(state.key, plans, [index])[0]

  def draw(row_keys):
    if staggered:
      return _draw_where(row_keys, projectors.stack(plans, due), sketch)
    return projectors.draw_from_keys(row_keys, sketch)

  def nothing(row_keys):
    return {shape: jnp.zeros(rows.shape + shape, jnp.float32)
            for shape, rows in row_keys.items()}

  drawn = projectors.unstack(
      plans, compat.cond(any_due, draw, nothing, row_keys))

  def leaf(plan, q_old, q, c, take):
    if not plan.projected:
      return q_old, c
    move = functools.partial(_moved_momentum, side=plan.side,
                             transfer=transfer)
    each_slice_on_its_own = staggered and bool(take.shape)

    # Both branches give the momentum in float32, as the default's move
    # (`_momentum_step`): rounded to momentum_dtype only once, at the end.
    def redrawn(q_old, q, c):
      q, c = compat.laid_out_like(q, q_old), c.astype(jnp.float32)
      if not each_slice_on_its_own:  # every slice is due
        return q, compat.each_matrix(move, q_old, q, c)
      return (jnp.where(take[..., None, None], q, q_old),
              compat.each_slice_where(take, move, q_old, q, c))

    def kept(q_old, q, c):
      del q
      return q_old, c.astype(jnp.float32)

    return compat.cond(jnp.any(take), redrawn, kept, q_old, q, c)

  results = jax.tree.map(leaf, plans, state.projectors, drawn,
                         state.momentum, due)
  current, momentum = tree_util.unzip_leaves(plans, results, 2)
  return current, momentum, jax.tree.map(lambda _: None, plans)


def _due_slices(plans, count, kappa, staggered: bool):
  """Per projected leaf: which slices re-draw at ``count`` (bool)."""
  def due(plan):
    if not plan.projected:
      return optax.MaskedNode()
    if not staggered:  # one flag for the leaf
      return (count > 0) & (count % kappa == 0)
    phases = keys.resample_phases(plan.path, plan.batch_shape, kappa)
    return (count > 0) & ((count - phases) % kappa == 0)

  return jax.tree.map(due, plans)


def _moved_momentum(q_old, q, c, *, side, transfer: MomentumTransfer):
  """A float32 momentum moved into the subspace of ``q`` (the transfers)."""
  if transfer == 'reset':
    return jnp.zeros_like(c)
  change = projectors.basis_change_matrix(
      q_old, q, least_squares=transfer == 'least_squares')
  return projectors.apply_basis_change(change, c, side)


def _draw_where(rows, due_rows, sketch):
  """``{(dim, r): keys}`` -> projectors where due, zeros elsewhere."""
  def draw(shape, keys_and_due):
    key, take = keys_and_due
    return compat.cond(
        take, lambda: projectors.sample_projector(key, shape, sketch),
        lambda: jnp.zeros(shape, jnp.float32))

  return {shape: jax.lax.map(lambda x, shape=shape: draw(shape, x),
                             (rows[shape], due_rows[shape]))
          for shape in rows}


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
    b1: float,
    nesterov: bool,
    move=None,
) -> tuple[jax.Array, jax.Array]:
  """One leaf's (output, new momentum), in float32; see the formulas above.

  ``move``, if given, takes the momentum into the subspace of ``q`` first
  (at a resample of regenerated projectors).
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
  if move is not None:
    c = move(c)
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
