"""Gradient accumulation with a compressed accumulator (Flora, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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
from flora_jax._src.projection import ProjectionRule


class FloraMultiStepsState(NamedTuple):
  """State of `FloraMultiSteps`."""

  mini_step: jax.Array  # int32[]: micro-batches accumulated in this cycle.
  gradient_step: jax.Array  # int32[]: completed cycles = inner steps taken.
  key: jax.Array  # key[]: base key; cycle c uses projection number c.
  inner_opt_state: Any  # the wrapped optimizer's state, untouched mid-cycle.
  # Per leaf: the sum of down(G_i) over the cycle, (..., r, n) for side
  # 'left', (..., m, r) for side 'right'; the full sum (leaf shape) for leaves
  # that are not projected. dtype: `accumulator_dtype`.
  acc_sketch: optax.Updates
  # {'every_k_schedule=... plans=...': int8[]}: what the state was made
  # for; `update` refuses a state made for other settings.
  settings: dict[str, jax.Array]


class FloraMultiSteps:
  r"""`optax.MultiSteps` whose gradient accumulator is a random sketch.

  Over the ``k`` micro-batches of a cycle the wrapper keeps only
  ``C = Σ_i down(G_i)`` for each projected matrix (``r * max(m, n)``
  numbers, instead of the ``m * n`` of `optax.MultiSteps`) and at the end of
  the cycle hands the inner optimizer the decompressed mean

  .. math:: \bar G = \mathrm{up}(C) / k,

  an unbiased estimate of the mean gradient. Each cycle draws a new
  projection. Between cycle boundaries the wrapper emits zero updates and
  leaves the inner state untouched. Leaves that are not projected are
  accumulated exactly.

  Drop-in for ``optax.MultiSteps(opt, every_k_schedule)``: same ``init``,
  ``update``, ``has_updated`` and ``gradient_transformation()``.

  Args:
    opt: the inner optimizer, applied once per cycle.
    every_k_schedule: the number of micro-batches per cycle, an int or a
      function of the number of completed cycles returning one (>= 1;
      checked at ``init`` for the first cycle, and a value below 1 at a
      later cycle counts as 1 rather than dividing by zero).
    rule: which leaves have a compressed accumulator, on which side and at
      which rank: a `flora_jax.ProjectionRule`, or an int r for
      ``ProjectionRule(r)``.
    key: an int seed, a typed key or a raw uint32 key.
    use_grad_mean: pass the mean (True) or the sum (False) of the cycle's
      gradients to the inner optimizer.
    accumulator_dtype: dtype of the stored sketch; None means float32.
    sketch: the projections' entries, ``'gaussian'`` (the paper's) or
      ``'rademacher'`` (cheaper to draw), see `flora_jax.flora_compress`.

  Example:
    >>> import optax, flora_jax
    >>> tx = flora_jax.FloraMultiSteps(optax.adamw(1e-3), 8, rule=64)

  References:
    Hao, Cao & Mou, 2024, Algorithm 1, https://arxiv.org/abs/2402.03293
  """

  @deprecation.flat_projection_arguments
  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: int | Callable[[jax.Array], jax.Array],
      rule: ProjectionRule | int,
      *,
      key: keys.PRNGKeyLike = 0,
      use_grad_mean: bool = True,
      accumulator_dtype: jax.typing.DTypeLike | None = None,
      sketch: projectors.Sketch = 'gaussian',
  ):
    validation.check_transformation('opt', opt)
    if not callable(every_k_schedule):
      validation.check_positive_int('every_k_schedule', every_k_schedule)
    validation.check_key('key', key)
    self._opt = optax.with_extra_args_support(opt)
    self._every_k = every_k_schedule
    self._rule = ProjectionRule.of(rule)
    self._key = key
    self._use_grad_mean = use_grad_mean
    self._accumulator_dtype = validation.check_float_dtype(
        'accumulator_dtype', accumulator_dtype
    )
    self._sketch: projectors.Sketch = sketch
    self._recorded = projectors.sketch_setting(sketch)
    self._announce = projection.plan_announcer(
        'flora_jax.FloraMultiSteps', 'the rest is accumulated full-size'
    )

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer, applied once per cycle."""
    return self._opt

  def _cycle_length(self, gradient_step: jax.Array) -> jax.Array:
    if not callable(self._every_k):
      return jnp.asarray(self._every_k, jnp.int32)
    k = jnp.asarray(self._every_k(gradient_step))
    if k.shape != ():
      raise TypeError(
          f'every_k_schedule must return a scalar, got shape {k.shape}.'
      )
    # A schedule can only be checked where it is evaluated, inside jit:
    # below 1 would divide by zero or flip the sign of the step.
    return jnp.maximum(k.astype(jnp.int32), 1)

  def _check_schedule(self) -> None:
    if not callable(self._every_k):
      return
    first = self._every_k(jnp.zeros([], jnp.int32))
    if validation.is_concrete(first) and int(first) < 1:
      raise ValueError(
          f'every_k_schedule(0) = {int(first)}: a cycle needs at least one'
          ' micro-batch.'
      )

  def init(self, params: optax.Params) -> FloraMultiStepsState:
    """The state before the first micro-batch: an empty sketch per leaf."""
    self._check_schedule()
    params = tree_util.unwrap_variables(params)
    plans = self._rule.plan(params)
    self._announce(plans)
    jax.tree.map(
        lambda plan, leaf: validation.check_real_float_leaf(
            plan.path, leaf, 'gradient accumulation',
            'Exclude it with optax.masked or optax.partition.',
        ),
        plans, params,
    )
    return FloraMultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=jnp.zeros([], jnp.int32),
        key=keys.as_prng_key(self._key),
        inner_opt_state=self._opt.init(params),
        acc_sketch=jax.tree.map(
            lambda plan: jnp.zeros(plan.low_rank_shape,
                                   self._accumulator_dtype),
            plans,
        ),
        settings=settings.record(plans, every_k_schedule=self._every_k_name,
                                 **self._recorded,
                                 **keys.stacked_draws_setting(plans)),
    )

  @property
  def _every_k_name(self) -> Any:
    return 'callable' if callable(self._every_k) else self._every_k

  def update(
      self,
      updates: optax.Updates,
      state: FloraMultiStepsState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, FloraMultiStepsState]:
    """Adds one micro-batch's gradients; at a cycle's end, steps ``opt``.

    Returns zero updates until the cycle's last micro-batch, then the inner
    optimizer's updates for the decompressed mean (or sum) of the cycle.
    """
    validation.check_updates_match_params(updates, params)
    validation.check_same_paths(updates, state.acc_sketch, 'the accumulator')
    plans = self._rule.plan(updates)
    jax.tree.map(lambda plan, acc: validation.check_state_shape(
        plan, acc, 'an accumulator'), plans, state.acc_sketch)
    settings.check(state.settings, plans,
                   every_k_schedule=self._every_k_name, **self._recorded,
                   **keys.stacked_draws_setting(plans))
    cycle = state.gradient_step
    k = self._cycle_length(cycle)
    # Drawn once per step: the same projectors compress now and, at the end
    # of the cycle, decompress (drawn from the state, see
    # `projectors.draw_stacks`).
    drawn = projectors.random_projectors(state.key, plans, cycle,
                                         self._sketch)
    acc = jax.tree.map(self._accumulate, plans, updates, state.acc_sketch,
                       drawn)

    def emit(_):
      mean = jax.tree.map(
          lambda plan, g, a, q: self._decompress(plan, a, q, k, g).astype(
              g.dtype),
          plans, updates, acc, drawn,
      )
      new_updates, inner_state = self._opt.update(
          mean, state.inner_opt_state, params, **extra_args
      )
      return (new_updates, inner_state, jax.tree.map(jnp.zeros_like, acc),
              jnp.zeros([], jnp.int32), compat.safe_increment(cycle))

    emitted = jax.eval_shape(emit, None)[0]

    def hold(_):
      # zeros_like of the incoming updates: under Explicit sharding the
      # branches must agree on sharding too, not only on shape.
      zeros = jax.tree.map(
          lambda u, e: jnp.zeros_like(u, dtype=e.dtype), updates, emitted
      )
      return (zeros, state.inner_opt_state, acc,
              compat.safe_increment(state.mini_step), cycle)

    new_updates, inner_state, acc, mini_step, cycle = compat.cond(
        state.mini_step >= k - 1, emit, hold, None
    )
    return new_updates, FloraMultiStepsState(
        mini_step=mini_step,
        gradient_step=cycle,
        key=state.key,
        inner_opt_state=inner_state,
        acc_sketch=acc,
        settings=state.settings,
    )

  def _accumulate(self, plan, g, acc, q):
    """``acc + down(g)`` for one leaf, stored in the accumulator dtype."""
    g32 = g.astype(jnp.float32)
    if plan.side is not None:
      g32 = projectors.project_down(q, plan.to_matrix(g32), plan.side)
    return (acc.astype(jnp.float32) + g32).astype(self._accumulator_dtype)

  def _decompress(self, plan, acc, q, k, like):
    """``up(acc)``, divided by ``k`` for the mean; float32, laid out like
    ``like``."""
    acc = acc.astype(jnp.float32)
    if plan.side is not None:
      acc = plan.from_matrix(projectors.project_up(q, acc, plan.side), like)
    return acc / k if self._use_grad_mean else acc

  def has_updated(self, state: FloraMultiStepsState) -> jax.Array:
    """True if the last `update` ended a cycle and ran the inner optimizer."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This wrapper as an `optax.GradientTransformationExtraArgs`."""
    # optax types the field with the plain update protocol, not the one with
    # extra arguments that GradientTransformationExtraArgs calls.
    return optax.GradientTransformationExtraArgs(
        self.init, self.update  # pyright: ignore[reportArgumentType]
    )
