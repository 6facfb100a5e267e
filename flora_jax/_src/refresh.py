"""When and where GaLore's fitted projectors are refreshed.

Two ways to make a refresh step cheaper than refitting every projector on
every device at once (`scale_by_galore` uses them):

* a staggered schedule (`staggered_phases`): each projected matrix gets a
  phase in ``[0, T)`` and is refitted when ``(count - phase) % T == 0``,
  the phases spread so that every step refits about ``1/T`` of the
  factorisation cost; `fit_where` refits only the due slices of a stack;
* refits spread over a mesh (`spread_fit`): the matrices of one fit shape
  are stacked and split over the devices of the ambient mesh, each device
  factorising its share, instead of every device repeating every SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from flora_jax._src import compat
from flora_jax._src.projection import LeafPlan

RefreshSchedule = Literal['synchronous', 'staggered']

# fit_one(g, key) -> q: one matrix (m, n) to its projector (dim, r).
FitOne = Callable[[jax.Array, jax.Array], jax.Array]


def svd_cost(plan: LeafPlan) -> float:
  """Flops of one slice's SVD, up to a constant: ``m n min(m, n)``."""
  m, n = plan.matrix_shape[-2:]
  return float(m * n * min(m, n))


def staggered_phases(
    plans: Any, gap: int, cost: Callable[[LeafPlan], float] = svd_cost
) -> Any:
  r"""The refresh phase of every projected matrix, spread evenly by cost.

  The matrices (every stacked slice of every projected leaf) are laid out in
  a fixed order on a circle of circumference ``T = gap``, each taking an arc
  proportional to its ``cost``; a matrix's phase is where the middle of its
  arc falls:

  .. math::

    \text{phase}_k = \Big\lfloor T \, \frac{C_{<k} + c_k / 2}{C}
      \Big\rfloor \bmod T,

  where ``C_{<k}`` is the cost of the matrices before it and ``C`` the
  total. Every step then refits matrices of total cost at most
  ``C / T + max_k c_k``. The order is slice-major (slice 0 of every leaf in
  tree order, then slice 1, ...): where the projected leaves are stacks of
  one depth ``L`` (a scanned model), the slices of each are ``T / L``
  steps apart.

  Args:
    plans: a tree of `LeafPlan`.
    gap: T, the steps between two refreshes of a matrix.
    cost: a slice's relative cost (default: its SVD's flops).

  Returns:
    A tree like ``plans``: int32 phases of shape ``plan.batch_shape`` for
    projected leaves, `optax.MaskedNode` for the others.

  Example:
    >>> import jax.numpy as jnp, flora_jax
    >>> from flora_jax._src import refresh
    >>> rule = flora_jax.ProjectionRule(4, min_dim=8)
    >>> plans = rule.plan({'a': jnp.zeros((16, 16)),
    ...                    'b': jnp.zeros((2, 16, 16))})
    >>> phases = refresh.staggered_phases(plans, 6)
    >>> int(phases['a']), phases['b'].tolist()  # order: a, b[0], b[1]
    (1, [3, 5])
  """
  flat, treedef = jax.tree.flatten(plans)
  matrices = sorted(
      (s, i) for i, plan in enumerate(flat) if plan.projected
      for s in range(math.prod(plan.batch_shape))
  )
  total = sum(cost(flat[i]) for _, i in matrices)
  phases = {i: np.zeros(math.prod(plan.batch_shape), np.int32)
            for i, plan in enumerate(flat) if plan.projected}
  before = 0.0
  for s, i in matrices:
    c = cost(flat[i])
    phases[i][s] = int(gap * (before + c / 2) / total) % gap
    before += c
  return jax.tree.unflatten(treedef, [
      jnp.asarray(phases[i].reshape(plan.batch_shape)) if plan.projected
      else optax.MaskedNode()
      for i, plan in enumerate(flat)
  ])


def usable(g: jax.Array, q: jax.Array) -> jax.Array:
  """Per stacked slice: the gradient is finite and nonzero, its fit finite."""
  matrix = (-2, -1)
  return (jnp.all(jnp.isfinite(g), axis=matrix)
          & jnp.any(g != 0, axis=matrix)
          & jnp.all(jnp.isfinite(q), axis=matrix))


def fit_where(
    fit_one: FitOne, g: jax.Array, q_old: jax.Array, take: jax.Array,
    keys: jax.Array,
) -> jax.Array:
  """Refits the slices of a stack where ``take``, one after another.

  Each slice's factorisation is its own `jax.lax.cond` inside a
  `jax.lax.map`, so a step that refreshes one slice of an ``(L, m, n)``
  leaf runs one SVD, not ``L``. The other slices keep ``q_old``. (Where
  `compat.cond` selects instead of branching, every slice is fitted.)

  Args:
    fit_one: ``(matrix, key) -> projector`` of one slice.
    g: the gradient, ``(..., m, n)``.
    q_old: the stored projectors, ``(..., dim, r)``.
    take: bool, the leaf's batch shape: which slices to refit.
    keys: the slices' keys (`keys.slice_keys`), the leaf's batch shape.

  Returns:
    The projectors, ``q_old``'s shape: new where ``take``, else ``q_old``.
  """
  return compat.each_slice_where(
      take, lambda g, key, q: compat.laid_out_like(fit_one(g, key), q),
      g, keys, q_old)


def mesh_axes() -> tuple[str, ...]:
  """The axes of the ambient mesh a refit can be spread over.

  Those of `jax.sharding.get_abstract_mesh` (the mesh of `jax.set_mesh`)
  that are not Manual (inside a `jax.shard_map`); empty when there is no
  mesh or it has one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types,
                                          strict=True)
               if kind != AxisType.Manual)
  if math.prod(mesh.shape[name] for name in axes) <= 1:
    return ()
  return axes


def spread_fit(
    fit_one: FitOne,
    matrices: Sequence[jax.Array],
    keys: Sequence[jax.Array],
    takes: Sequence[jax.Array],
    q_olds: Sequence[jax.Array],
    axes: tuple[str, ...],
) -> list[jax.Array]:
  """Refits stacks of same-shaped matrices, spread over the mesh's devices.

  The slices of ``matrices`` (float32) are stacked into one ``(k, m, n)``
  array, padded to a multiple of the number of devices ``D`` of ``axes``
  and split over them along ``k``; each device runs ``fit_one`` on its
  ``k / D`` matrices one after another (`jax.lax.map`, so that no batched
  LAPACK kernel runs, see `flora_jax._src.compat.each_matrix`), skipping
  those not in ``takes``. The projectors come back laid out as ``q_olds``
  (replicated outside Explicit sharding).

  The stack is a float32 copy of the matrices, ``k m n`` numbers split over
  the devices: run this inside the refresh branch only. It moves there one
  mesh axis at a time (an all-to-all per axis), which XLA's partitioner
  does without replicating the stack on every device.

  Args:
    fit_one: ``(matrix, key) -> projector`` of one matrix.
    matrices: gradients ``(..., m, n)`` sharing ``(m, n)``.
    keys: per matrix, its slices' keys (`keys.slice_keys`).
    takes: per matrix, bool of its batch shape: which slices to refit.
    q_olds: per matrix, its stored projectors ``(..., dim, r)``.
    axes: the mesh axes to spread over (`mesh_axes`).

  Returns:
    Per matrix, the new projectors where ``takes``, ``q_olds`` elsewhere.
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = tuple(name for name in axes
                   if mesh.axis_types[mesh.axis_names.index(name)]
                   == AxisType.Explicit)
  def fit(args):
    return _spread_fit(fit_one, *args, axes=axes)

  args = (list(matrices), list(keys), list(takes), list(q_olds))
  if not explicit:
    return fit(args)
  # Explicit types would fix each reshuffle's layout; let the compiler pick
  # them, and give the projectors back in their stored layouts.
  spread = jax.sharding.auto_axes(
      fit, axes=explicit,
      out_sharding=[jax.typeof(q).sharding.spec for q in q_olds])
  return cast(list[jax.Array], spread(args))


def _spread_fit(fit_one, matrices, keys, takes, q_olds, *, axes):
  devices = math.prod(jax.sharding.get_abstract_mesh().shape[name]
                      for name in axes)
  sizes = [math.prod(q.shape[:-2]) for q in q_olds]
  stack = jnp.concatenate([
      g.astype(jnp.float32).reshape((-1,) + g.shape[-2:]) for g in matrices])
  key_data = jnp.concatenate([
      jax.random.key_data(k).reshape((size, -1))
      for k, size in zip(keys, sizes, strict=True)])
  take = jnp.concatenate([t.reshape(-1) for t in takes])
  q_stack = jnp.concatenate([
      q.reshape((-1,) + q.shape[-2:]) for q in q_olds])
  pad = -stack.shape[0] % devices

  def padded(x):
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

  impl = jax.random.key_impl(keys[0])

  def local(stack, key_data, take, q_stack):
    keys = jax.random.wrap_key_data(key_data, impl=impl)
    return fit_where(fit_one, stack, q_stack, take, keys)

  out = jax.shard_map(
      local, in_specs=P(axes), out_specs=P(axes), axis_names=set(axes),
  )(_spread_stack(padded(stack), axes), padded(key_data), padded(take),
    _spread_stack(padded(q_stack), axes))
  out = _gather_stack(out, axes)
  starts = np.cumsum([0] + sizes)
  return [out[a:b].reshape(q.shape)
          for a, b, q in zip(starts[:-1], starts[1:], q_olds, strict=True)]


def _spread_stack(stack: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``stack`` split along axis 0 over ``axes``, one mesh axis at a time.

  Asked to go straight from matrices sharded along two mesh axes to a
  stack sharded along both, XLA's partitioner replicates the stack first
  ("involuntary full rematerialization"); moved axis by axis, wherever the
  matrix axes hold them, each move is an all-to-all.
  """
  free = P.UNCONSTRAINED
  for i in range(1, len(axes) + 1):
    stack = jax.lax.with_sharding_constraint(stack, P(axes[:i], free, free))
  return jax.lax.with_sharding_constraint(stack, P(axes, None, None))


def _gather_stack(stack: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """The projectors split by `_spread_stack`, replicated axis by axis.

  Then each leaf's layout is a slice of them; from the split stack XLA
  would replicate it in one piece to lay out each leaf.
  """
  for i in reversed(range(len(axes))):
    stack = jax.lax.with_sharding_constraint(
        stack, P(axes[:i] or None, None, None))
  return stack
