"""GaLore's staggered projector refresh (one device; the mesh-spread refresh
is tested in test_sharding.py).

Each stacked slice of each projected leaf is refitted at its own phase,
every T steps, about 1/T of the SVD cost per step; the published
(synchronous) schedule stays the default and unchanged.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax._src import refresh
from test_galore import _params  # the same small tree as GaLore's tests

GAP = 4
SMALL: dict[str, Any] = dict(min_dim=8)


PARAMS = _params()


def _grads(step):
  key = jax.random.fold_in(jax.random.key(42), step)
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape),
      PARAMS,
  )


@functools.cache
def _run(schedule, gap=GAP, steps=2 * GAP + 2,
         transfer_moments=False) -> tuple[list[Any], list[Any]]:
  """States before and after each of ``steps`` updates (one compilation)."""
  tx = flora_jax.scale_by_galore(
      optax.scale_by_adam(), flora_jax.ProjectionRule(4, **SMALL),
      update_proj_gap=gap, refresh_schedule=schedule,
      transfer_moments=transfer_moments)
  step = jax.jit(tx.update)
  states: list[Any] = [tx.init(PARAMS)]
  updates = []
  for t in range(steps):
    u, state = step(_grads(t), states[-1], PARAMS)
    updates.append(u)
    states.append(state)
  return states, updates


def _changed(before, after):
  """Per projected leaf: bool per stacked slice, the projector changed."""
  q0, q1 = _q(before), _q(after)
  return {name: np.any(np.asarray(q0[name]) != np.asarray(q1[name]),
                       axis=(-2, -1))
          for name in ('wide', 'tall', 'stacked')}


def _q(state: Any) -> Any:
  projectors = state.projectors
  return getattr(projectors, 'projectors', projectors)


def test_each_matrix_refreshes_at_its_own_phase_every_T_steps():
  states, _ = _run('staggered')
  phases = {name: np.asarray(states[0].projectors.phases[name])
            for name in ('wide', 'tall', 'stacked')}
  # Every matrix is fitted at the first update...
  for name, q in _q(states[1]).items():
    if name != 'bias':
      assert np.all(np.any(np.asarray(q) != 0, axis=(-2, -1))), name
  # ...then exactly at the updates with (count - phase) % T == 0.
  for count in range(1, len(states) - 1):
    changed = _changed(states[count], states[count + 1])
    for name, phase in phases.items():
      np.testing.assert_array_equal(
          changed[name], (count - phase) % GAP == 0, f'{name} at {count}')
  # The phases are spread: not all at the same step.
  assert len({int(p) for p in np.concatenate(
      [np.ravel(p) for p in phases.values()])}) == GAP


def test_phases_spread_the_cost_evenly():
  """About n / T matrices per step by count, at most C / T + max c by
  cost; the slices of stacks of one depth L are T / L steps apart."""
  rule = flora_jax.ProjectionRule(4, **SMALL)
  same = {f'layer_{i}': jnp.zeros((16, 16)) for i in range(12)}
  phases = refresh.staggered_phases(rule.plan(same), 5)
  counts = np.bincount([int(p) for p in phases.values()], minlength=5)
  assert counts.max() - counts.min() <= 1, counts

  mixed = {'big': jnp.zeros((64, 64)), 'stack': jnp.zeros((8, 16, 32)),
           'small': jnp.zeros((6, 16, 16))}
  plans = rule.plan(mixed)
  gap = 7
  phases = refresh.staggered_phases(plans, gap)
  cost = np.zeros(gap)
  costs = []
  for name, plan in plans.items():
    for phase in np.ravel(phases[name]):
      assert 0 <= phase < gap
      cost[phase] += refresh.svd_cost(plan)
      costs.append(refresh.svd_cost(plan))
  assert cost.max() <= sum(costs) / gap + max(costs)

  layers = {'q': jnp.zeros((4, 16, 16)), 'up': jnp.zeros((4, 16, 32))}
  phases = refresh.staggered_phases(rule.plan(layers), 40)
  for name in layers:
    np.testing.assert_array_equal(np.diff(phases[name]), 10)


def test_synchronous_default_is_unchanged_and_gap_one_agrees():
  """'synchronous' is the default; with T = 1 both schedules refit every
  matrix at every step and give the same updates bit for bit."""
  default = flora_jax.galore(1e-2, 4, update_proj_gap=1, **SMALL)
  explicit = flora_jax.galore(1e-2, 4, update_proj_gap=1,
                              refresh_schedule='synchronous', **SMALL)
  assert (jax.tree.structure(default.init(PARAMS))
          == jax.tree.structure(explicit.init(PARAMS)))
  sync, _ = _run('synchronous', gap=1, steps=3, transfer_moments=True)
  staggered, _ = _run('staggered', gap=1, steps=3, transfer_moments=True)
  for a, b in zip(sync[1:], staggered[1:], strict=True):
    for x, y in zip(jax.tree.leaves(_q(a)), jax.tree.leaves(_q(b)),
                    strict=True):
      np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a.inner_state),
                    jax.tree.leaves(b.inner_state), strict=True):
      np.testing.assert_array_equal(x, y)


def test_transfer_moves_only_the_refreshed_slices():
  states, _ = _run('staggered', transfer_moments=True)
  phases = states[0].projectors.phases
  count = GAP + 1
  before, after = states[count], states[count + 1]
  g = _grads(count)
  for name in ('wide', 'stacked'):
    q_old, q_new = _q(before)[name], _q(after)[name]
    mu = before.inner_state.mu[name]
    due = (count - np.asarray(phases[name])) % GAP == 0
    for s in np.ndindex(due.shape):
      moved = q_new[s].T @ q_old[s] @ mu[s] if due[s] else mu[s]
      expected = 0.9 * moved + 0.1 * (q_new[s].T @ g[name][s])
      np.testing.assert_allclose(after.inner_state.mu[name][s], expected,
                                 rtol=1e-5, atol=1e-6, err_msg=name)


def test_staggered_galore_trains():
  """Least squares ``|X W - X W*|`` for a matrix and a stack of three: the
  loss falls as fast as with the published schedule."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k1, (64, 32))
  targets = {'a': jax.random.normal(k2, (32, 48)) / 6,
             'stack': jax.random.normal(k3, (3, 32, 40)) / 6}

  def loss(w):
    errors = jax.tree.map(lambda w, t: jnp.einsum('bm,...mn->...bn', x, w - t),
                          w, targets)
    return sum(jnp.mean(e ** 2) for e in jax.tree.leaves(errors))

  def train(schedule):
    tx = flora_jax.galore(1e-1, 8, update_proj_gap=5, min_dim=16,
                          refresh_schedule=schedule)
    params = jax.tree.map(jnp.zeros_like, targets)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(60):
      params, state, value = step(params, state)
      losses.append(float(value))
    return losses

  staggered, synchronous = train('staggered'), train('synchronous')
  assert staggered[-1] < 0.2 * staggered[0]
  assert staggered[-1] < 1.2 * synchronous[-1]


def test_a_state_of_one_schedule_is_refused_by_the_other():
  staggered = flora_jax.galore(1e-2, 4, update_proj_gap=GAP,
                               refresh_schedule='staggered', **SMALL)
  synchronous = flora_jax.galore(1e-2, 4, update_proj_gap=GAP, **SMALL)
  with pytest.raises(ValueError, match='refresh_schedule'):
    synchronous.update(_grads(0), staggered.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match='refresh_schedule'):
    staggered.update(_grads(0), synchronous.init(PARAMS), PARAMS)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(refresh_schedule='rolling'), ValueError, 'refresh_schedule'),
    (dict(refresh_schedule='staggered', projector='random'), ValueError,
     'refresh_schedule'),
    (dict(refresh_schedule='staggered', update_proj_gap=jnp.asarray(3.0)),
     TypeError, 'update_proj_gap'),
    (dict(distribute_refresh='yes'), TypeError, 'distribute_refresh'),
])
def test_bad_refresh_arguments_are_refused(kwargs, error, match):
  with pytest.raises(error, match=match):
    flora_jax.scale_by_galore(optax.scale_by_adam(), 4, **kwargs)
  with pytest.raises(error, match=match):
    flora_jax.fira(1e-2, 4, **kwargs)
