"""Tests of `flora_jax.FloraMultiSteps` (Flora, Algorithm 1).

Small shapes throughout: leaves are projected only when min(m, n) >= min_dim,
so the transforms here use ``min_dim=8``.

Compiling an update with projected leaves is slow on CPU (each threefry
projector draw costs ~1 s of XLA compile), so the scenarios that need a
compiled run are stepped together by two jitted step functions, compiled
concurrently once per module by the `runs` fixture, plus `_SGD3_UPDATE`
(reused for the many-keys test); the tests read the recorded trajectories.
Error-path tests use `jax.eval_shape`, which traces without compiling.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import projections
from flora_jax import ProjectionRule

M, N = 16, 24  # a projected matrix: auto side 'left', sketch (R, N).
R = 4
L = 3  # stacked matrices
MIN_DIM = 8
NSTEPS = 10  # micro-batches fed to every scenario
N_DRAWS = 400  # keys for the unbiasedness test


def _params(dtype=jnp.float32):
  return {
      'w': jnp.zeros((M, N), dtype),  # projected, side 'left'
      'b': jnp.zeros((N,), dtype),  # never projected (ndim 1)
  }


def _stacked_params():
  # side 'right' (the unstacked 'w' of `_params` covers side 'left').
  return {'t': jnp.zeros((L, N, M))}  # sketch (L, N, R)


def _grads(params, seed, num=NSTEPS):
  """`num` random float32 gradient trees shaped like `params` (numpy RNG:
  no per-shape compilation of jax.random)."""
  rng = np.random.default_rng(seed)
  return [
      jax.tree.map(
          lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
          params,
      )
      for _ in range(num)
  ]


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


_RULE_FIELDS = ('rank', 'side', 'min_dim', 'max_aspect_ratio',
                'projection_mask')


def _flora(inner, k, *, key=0, **kw):
  """FloraMultiSteps with the tests' rule; rule fields in ``kw`` override it."""
  rule = {name: kw.pop(name) for name in list(kw) if name in _RULE_FIELDS}
  return flora_jax.FloraMultiSteps(inner, k, _rule(**rule), key=key, **kw)


def _rule(**kw):
  kw.setdefault('rank', R)
  kw.setdefault('min_dim', MIN_DIM)
  return ProjectionRule(**kw)


def _mask_all_false(tree):
  return jax.tree.map(lambda _: False, tree)


def _schedule(step):
  return jnp.where(step == 0, 2, 3)  # cycles of 2, 3, 3, ...


# Transforms shared between scenarios and tests.
TX_ADAM3 = _flora(optax.adam(1e-2), 3)
TX_SGD3 = _flora(optax.sgd(1.0), 3, key=7)
TX_STACKED = _flora(optax.sgd(1.0), 2, key=5)
# Compiled once, used for the 'sgd3' trajectory and the N_DRAWS keys.
_SGD3_UPDATE = jax.jit(TX_SGD3.update)


@dataclasses.dataclass
class Scenario:
  tx: Any  # has .init/.update (FloraMultiSteps, MultiSteps or an optax GT)
  params: Any
  grads: list
  # 0 / 1: which of two jitted step functions (compiled concurrently) runs
  # it; 2: run by `_SGD3_UPDATE`.
  group: int


def _scenarios():
  p = _params()
  g = _grads(p, seed=1)
  sp = _stacked_params()
  # group 0 / 1: two step functions compiled concurrently (2 cores).
  return {
      # 1. cycle logic vs optax.MultiSteps
      'adam3': Scenario(TX_ADAM3, p, g, 0),
      'ms_adam3': Scenario(optax.MultiSteps(optax.adam(1e-2), 3), p, g, 1),
      # k = 1 (every step emits), unprojected to save a compilation.
      'adam1': Scenario(
          _flora(optax.adam(1e-2), 1, projection_mask=_mask_all_false), p, g, 1
      ),
      'ms_adam1': Scenario(optax.MultiSteps(optax.adam(1e-2), 1), p, g, 1),
      # 2. unprojected leaves
      'sgd3': Scenario(TX_SGD3, p, g, 2),
      'ms_sgd3': Scenario(optax.MultiSteps(optax.sgd(1.0), 3), p, g, 0),
      'adam3_mask_false': Scenario(
          _flora(optax.adam(1e-2), 3, projection_mask=_mask_all_false), p, g, 1
      ),
      'adam3_rank_ge_dim': Scenario(
          _flora(optax.adam(1e-2), 3, rank=M), p, g, 1
      ),
      'sgd3_mask_false': Scenario(
          _flora(optax.sgd(1.0), 3, projection_mask=_mask_all_false), p, g, 0
      ),
      'sgd3_rank_ge_dim': Scenario(
          _flora(optax.sgd(1.0), 3, rank=M), p, g, 0
      ),
      # 6. stacked leaves
      'stacked': Scenario(TX_STACKED, sp, _grads(sp, seed=6), 0),
      # 7. options
      'sched': Scenario(_flora(optax.sgd(1.0), _schedule), p, g, 1),
      'ms_sched': Scenario(
          optax.MultiSteps(optax.sgd(1.0), _schedule), p, g, 1
      ),
      'sgd3_sum': Scenario(
          _flora(optax.sgd(1.0), 3, key=7, use_grad_mean=False), p, g, 1
      ),
      'chain': Scenario(
          optax.chain(optax.scale(2.0), TX_SGD3.gradient_transformation()),
          p, g, 1,
      ),
      'adam3_bf16': Scenario(
          TX_ADAM3, _params(jnp.bfloat16), [_cast(t, jnp.bfloat16) for t in g],
          0,
      ),
  }


@dataclasses.dataclass
class Run:
  scenario: Scenario
  init: Any
  updates: list  # per step
  states: list  # per step, after the update

  def prev_state(self, i):
    return self.init if i == 0 else self.states[i - 1]


def _warm_eager_projectors():
  # First eager use of jax.random.normal compiles it per shape; do it here,
  # concurrently with the step functions, for the shapes the tests use.
  key = jax.random.key(0)
  for plan in jax.tree.leaves(_rule().plan({**_params(), **_stacked_params()})):
    if plan.projected:
      projections.random_projector(key, plan, 0).block_until_ready()


@pytest.fixture(scope='module')
def runs():
  scenarios = _scenarios()
  groups = [
      sorted(n for n, s in scenarios.items() if s.group == gid)
      for gid in (0, 1, 2)
  ]
  assert groups[2] == ['sgd3']

  def make_step(names):
    @jax.jit
    def step(states, grads, params):
      return {
          n: scenarios[n].tx.update(grads[n], states[n], params[n])
          for n in names
      }
    return step

  steps = [make_step(names) for names in groups[:2]]
  steps.append(lambda st, g, p: {'sgd3': _SGD3_UPDATE(g['sgd3'], st['sgd3'],
                                                      p['sgd3'])})
  states = {n: s.tx.init(s.params) for n, s in scenarios.items()}
  out = {n: Run(s, states[n], [], []) for n, s in scenarios.items()}

  def run_step(gid, i):
    names = groups[gid]
    return steps[gid](
        {n: states[n] for n in names},
        {n: scenarios[n].grads[i] for n in names},
        {n: scenarios[n].params for n in names},
    )

  for i in range(NSTEPS):
    if i == 0:  # compile both step functions (and warm-ups) concurrently
      with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_step, gid, 0) for gid in (0, 1, 2)]
        warm = pool.submit(_warm_eager_projectors)
        results = [f.result() for f in futures]
        warm.result()
    else:
      results = [run_step(gid, i) for gid in (0, 1, 2)]
    for res in results:
      for n, (u, new_state) in res.items():
        states[n] = new_state
        out[n].updates.append(u)
        out[n].states.append(new_state)
  return out


@pytest.fixture(scope='module')
def draws(runs):
  """The cycle-0 update of `FloraMultiSteps(sgd(1.0), 3, key=seed)` for
  seeds 0..N_DRAWS-1, all fed the same 3 micro-batches of 'sgd3'."""
  params, grads = _params(), runs['sgd3'].scenario.grads[:3]
  out = []
  for seed in range(N_DRAWS):
    # Construct with key=seed (the public way to pick the key); the update
    # itself depends on the key only through the state, so the compiled
    # update of TX_SGD3 (same configuration) serves every seed.
    state = _flora(optax.sgd(1.0), 3, key=seed).init(params)
    for g in grads:
      u, state = _SGD3_UPDATE(g, state, params)
    out.append(u)
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *out)


def _tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  return all(
      x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
      for x, y in zip(la, lb, strict=True)
  )


def _all_zero(tree):
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def _no_zero_leaf(tree):
  return all(np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------- 1. cycle logic


@pytest.mark.parametrize('k', [1, 3])
def test_cycle_boundaries_and_counters_match_multisteps(runs, k):
  run, ref = runs[f'adam{k}'], runs[f'ms_adam{k}']
  tx, ref_tx = run.scenario.tx, ref.scenario.tx
  assert not bool(tx.has_updated(run.init))
  assert int(run.init.mini_step) == 0 and int(run.init.gradient_step) == 0

  n_emits = 0
  for i in range(NSTEPS):
    u, state, prev = run.updates[i], run.states[i], run.prev_state(i)
    ref_state = ref.states[i]
    assert int(state.mini_step) == int(ref_state.mini_step), i
    assert int(state.gradient_step) == int(ref_state.gradient_step), i
    assert bool(tx.has_updated(state)) == bool(ref_tx.has_updated(ref_state))
    assert state.mini_step.dtype == jnp.int32
    assert state.gradient_step.dtype == jnp.int32

    boundary = (i + 1) % k == 0
    assert bool(tx.has_updated(state)) == boundary, i
    if boundary:
      n_emits += 1
      # The inner optimizer ran once more: count and moments changed.
      assert int(state.inner_opt_state[0].count) == n_emits
      assert not np.array_equal(
          state.inner_opt_state[0].mu['w'], prev.inner_opt_state[0].mu['w']
      )
      assert not np.array_equal(
          state.inner_opt_state[0].nu['b'], prev.inner_opt_state[0].nu['b']
      )
      assert _no_zero_leaf(u)
      assert _all_zero(state.acc_sketch)  # reset for the next cycle
    else:
      assert _all_zero(u)
      assert _tree_equal(state.inner_opt_state, prev.inner_opt_state)
      assert _no_zero_leaf(state.acc_sketch)
    # Same tree, shapes and dtypes on both branches.
    assert jax.tree.structure(u) == jax.tree.structure(run.scenario.params)
    for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(run.scenario.params),
                    strict=True):
      assert x.shape == p.shape and x.dtype == p.dtype
    # The key never changes: the cycle index selects the projection.
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(run.init.key)
    )
  assert n_emits == NSTEPS // k


def test_sketch_shapes_and_key_in_state():
  params = {
      'w': jnp.zeros((M, N)),  # left: (R, N)
      'v': jnp.zeros((N, M)),  # right: (N, R)
      'b': jnp.zeros((N,)),
      'small': jnp.zeros((4, 6)),  # below min_dim: full size
      'long': jnp.zeros((8, 80)),  # aspect ratio 10 > 4: full size
  }
  tx = _flora(optax.sgd(1.0), 2, key=123)
  state = tx.init(params)
  shapes = jax.tree.map(jnp.shape, state.acc_sketch)
  assert shapes == {
      'w': (R, N), 'v': (N, R), 'b': (N,), 'small': (4, 6), 'long': (8, 80)
  }
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.acc_sketch))
  assert _all_zero(state.acc_sketch)
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
      jax.random.key_data(state.key),
      jax.random.key_data(jax.random.key(123)),
  )


# -------------------------------------- 2. unprojected leaves == MultiSteps


@pytest.mark.parametrize('config', ['mask_false', 'rank_ge_dim', 'bias_only'])
@pytest.mark.parametrize('inner', ['adam', 'sgd'])
def test_unprojected_leaves_match_multisteps(runs, config, inner):
  name = f'{inner}3' if config == 'bias_only' else f'{inner}3_{config}'
  run, ref = runs[name], runs[f'ms_{inner}3']
  plans = run.scenario.tx._rule.plan(run.scenario.params)
  projected = {leaf: plan.projected for leaf, plan in plans.items()}
  if config == 'bias_only':
    assert projected == {'w': True, 'b': False}
    compared = ['b']
  else:
    assert projected == {'w': False, 'b': False}
    compared = ['w', 'b']
    assert run.init.acc_sketch['w'].shape == (M, N)

  n_emits = 0
  for i in range(NSTEPS):
    u, s, ru, rs = run.updates[i], run.states[i], ref.updates[i], ref.states[i]
    n_emits += bool(ref.scenario.tx.has_updated(rs))
    assert int(s.gradient_step) == int(rs.gradient_step)
    for leaf in compared:
      np.testing.assert_allclose(u[leaf], ru[leaf], rtol=2e-5, atol=1e-7)
      # Mid-cycle: the exact sum vs MultiSteps' running mean.
      np.testing.assert_allclose(
          s.acc_sketch[leaf] / max(int(s.mini_step), 1),
          rs.acc_grads[leaf],
          rtol=2e-5,
          atol=1e-6,
      )
  assert n_emits == NSTEPS // 3
  assert _no_zero_leaf(run.updates[2])  # not trivially zero


# ------------------------------------------- 3. exact Algorithm-1 update


def _expected_sgd1_update(key, plan, cycle, grads_in_cycle, k):
  """-up(Q_c, sum_i down(Q_c, G_i)) / k, from the public core functions."""
  q = projections.random_projector(key, plan, cycle)
  acc = jnp.zeros(plan.low_rank_shape, jnp.float32)
  for g in grads_in_cycle:
    acc = acc + projections.project_down(q, g, plan.side)
  return -(projections.project_up(q, acc, plan.side) / k)


def test_projected_update_is_up_of_summed_sketch_per_cycle(runs):
  run, k = runs['sgd3'], 3
  grads = run.scenario.grads
  plan = _rule().plan(run.scenario.params)['w']
  assert plan.projected and plan.side == 'left'
  key = run.init.key
  np.testing.assert_array_equal(
      jax.random.key_data(key), jax.random.key_data(jax.random.key(7))
  )
  for cycle in (0, 1, 2):
    step = (cycle + 1) * k - 1
    u, state = run.updates[step], run.states[step]
    assert int(state.gradient_step) == cycle + 1
    cycle_grads = grads[cycle * k:(cycle + 1) * k]
    expected = _expected_sgd1_update(
        key, plan, cycle, [g['w'] for g in cycle_grads], k
    )
    np.testing.assert_allclose(u['w'], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        u['b'], -sum(g['b'] for g in cycle_grads) / k, rtol=1e-6, atol=1e-7
    )
    # Mid-cycle the state holds exactly sum_i down(Q_c, G_i).
    q = projections.random_projector(key, plan, cycle)
    np.testing.assert_allclose(
        run.states[step - 1].acc_sketch['w'],
        sum(projections.project_down(q, g['w'], 'left')
            for g in cycle_grads[:2]),
        rtol=1e-5, atol=1e-5,
    )

  # A new projection per cycle.
  q0 = projections.random_projector(key, plan, 0)
  q1 = projections.random_projector(key, plan, 1)
  assert q0.shape == (M, R)
  assert not np.allclose(q0, q1)
  # Cycle 1's update is not explained by cycle 0's projector.
  wrong = _expected_sgd1_update(
      key, plan, 0, [g['w'] for g in grads[k:2 * k]], k
  )
  assert not np.allclose(run.updates[2 * k - 1]['w'], wrong, atol=1e-3)


def test_projected_update_is_a_rank_r_estimate_not_the_mean(runs):
  run, k = runs['sgd3'], 3
  u = np.asarray(run.updates[k - 1]['w'])
  exact = -sum(g['w'] for g in run.scenario.grads[:k]) / k
  assert np.linalg.matrix_rank(u) == R
  assert not np.allclose(u, exact, atol=1e-2)


def test_different_keys_give_different_projections(runs, draws):
  main, k = runs['sgd3'], 3  # key=7
  w = draws['w']
  assert not np.allclose(w[0], w[1])
  assert not np.allclose(w[0], main.updates[k - 1]['w'])
  # Same seed -> same projection -> same update as the 'sgd3' run.
  np.testing.assert_array_equal(w[7], main.updates[k - 1]['w'])
  # Unprojected leaves do not depend on the key.
  np.testing.assert_array_equal(draws['b'][0], main.updates[k - 1]['b'])


# -------------------------------------------------------- 4. unbiasedness


def test_unbiased_over_many_keys(runs, draws):
  k = 3
  grads = runs['sgd3'].scenario.grads[:k]
  target = np.asarray(-sum(g['w'] for g in grads) / k, np.float64)
  samples = np.asarray(draws['w'], np.float64)  # (N_DRAWS, M, N)
  assert samples.shape == (N_DRAWS, M, N)
  assert np.all(np.isfinite(samples))
  # The draws really used N_DRAWS different projections.
  assert len({x.tobytes() for x in samples}) == N_DRAWS
  # The bias is exact for every draw.
  np.testing.assert_allclose(
      draws['b'],
      np.broadcast_to(-sum(g['b'] for g in grads) / k, (N_DRAWS, N)),
      rtol=1e-5, atol=1e-6,
  )

  # Each draw is a noisy rank-R estimate: for Gaussian Q,
  # E||QQ^T g - g||^2 = (M + 1)/R ||g||^2, i.e. relative error ~ 2 here.
  per_draw_rel = np.linalg.norm(samples - target, axis=(1, 2)) / (
      np.linalg.norm(target)
  )
  assert 1.0 < np.median(per_draw_rel) < 4.0

  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / math.sqrt(N_DRAWS)  # Monte-Carlo std error

  def consistent(t):
    # Elementwise: each entry within 5 standard errors (the mean of 400
    # draws is close to normal; P(|z| > 5) ~ 6e-7 per entry, 384 entries).
    # In norm: for an unbiased estimator E||mean - t||^2 = sum(se^2); the
    # sum of 384 such terms concentrates, so 2x its root is generous.
    z = np.abs(mean - t) / se
    norm_ok = np.linalg.norm(mean - t) <= 2.0 * math.sqrt(np.sum(se**2))
    return bool(np.max(z) < 5.0 and norm_ok)

  assert consistent(target)
  # Power: the same criterion rejects a 30% bias and the zero estimate
  # (relative standard error of the mean is ~0.1 here).
  assert np.sqrt(np.sum(se**2)) / np.linalg.norm(target) < 0.15
  assert not consistent(1.3 * target)
  assert not consistent(0.7 * target)
  assert not consistent(np.zeros_like(target))


# ------------------------------------------------------------ 5. memory


def test_state_bytes_formula_and_smaller_than_multisteps(capsys):
  m, n, r = 512, 1024, 32
  params = {
      'w': jax.ShapeDtypeStruct((m, n), jnp.float32),
      'b': jax.ShapeDtypeStruct((n,), jnp.float32),
  }
  inner = optax.adam(1e-3)
  tx = flora_jax.FloraMultiSteps(inner, 4, r)  # default min_dim=128
  state = jax.eval_shape(tx.init, params)
  ref_state = jax.eval_shape(optax.MultiSteps(inner, 4).init, params)

  assert state.acc_sketch['w'].shape == (r, max(m, n))
  assert state.acc_sketch['w'].dtype == jnp.float32
  assert state.acc_sketch['b'].shape == (n,)
  assert ref_state.acc_grads['w'].shape == (m, n)

  inner_bytes = flora_jax.memory.state_bytes(jax.eval_shape(inner.init, params))
  assert inner_bytes == 4 + 2 * (m * n + n) * 4  # adam: count, mu, nu
  assert flora_jax.memory.state_bytes(state.inner_opt_state) == inner_bytes
  sketch_bytes = flora_jax.memory.state_bytes(state.acc_sketch['w'])
  assert sketch_bytes == r * max(m, n) * 4
  assert flora_jax.memory.state_bytes(ref_state.acc_grads['w']) == m * n * 4
  acc_bytes = flora_jax.memory.state_bytes(state.acc_sketch)
  assert acc_bytes == r * max(m, n) * 4 + n * 4
  assert flora_jax.memory.state_bytes(state.key) == 8  # typed threefry key
  total = flora_jax.memory.state_bytes(state)
  assert total == inner_bytes + acc_bytes + 4 + 4 + 8 + 1  # + settings
  ref_total = flora_jax.memory.state_bytes(ref_state)
  assert ref_total == inner_bytes + (m * n + n) * 4 + 4 + 4
  assert total < ref_total
  assert ref_total - total == (m * n - r * max(m, n)) * 4 - 9
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err == ''


def test_state_bytes_right_side_and_accumulator_dtype():
  m, n, r = 256, 128, 16  # auto side 'right' (n < m): sketch (m, r)
  params = {'w': jax.ShapeDtypeStruct((m, n), jnp.float32)}
  tx = flora_jax.FloraMultiSteps(
      optax.sgd(1.0), 2, r, accumulator_dtype=jnp.bfloat16
  )
  state = jax.eval_shape(tx.init, params)
  assert state.acc_sketch['w'].shape == (m, r)
  assert state.acc_sketch['w'].dtype == jnp.bfloat16
  assert flora_jax.memory.state_bytes(state) == (
      r * max(m, n) * 2 + 4 + 4 + 8 + 1)


# ---------------------------------------------------------- 6. stacked


def test_stacked_leaves_sketch_shape_and_per_slice_projectors(runs):
  run, k = runs['stacked'], 2
  assert run.init.acc_sketch['t'].shape == (L, N, R)  # (L, m, r)
  plan = _rule().plan(run.scenario.params)['t']
  assert plan.side == 'right' and plan.projector_shape == (L, M, R)
  # The (L, r, n) case: side 'left' for a stacked (L, M, N) leaf.
  left = _rule().plan({'s': jnp.zeros((L, M, N))})['s']
  assert left.side == 'left' and left.low_rank_shape == (L, R, N)
  assert TX_STACKED.init({'s': jnp.zeros((L, M, N))}).acc_sketch['s'].shape == (
      L, R, N)

  key = run.init.key
  for cycle in (0, 1):
    step = (cycle + 1) * k - 1
    u = run.updates[step]['t']
    grads = [g['t'] for g in run.scenario.grads[cycle * k:step + 1]]
    q = projections.random_projector(key, plan, cycle)
    assert q.shape == (L, M, R)
    for i in range(L):
      for j in range(i + 1, L):
        assert not np.allclose(q[i], q[j])
    for layer in range(L):
      # Slice layer is compressed with its own Q[layer], independently ...
      acc = sum(projections.project_down(q[layer], g[layer], 'right')
                for g in grads)
      expected = -projections.project_up(q[layer], acc, 'right') / k
      np.testing.assert_allclose(u[layer], expected, rtol=1e-5, atol=1e-6)
      # ... and not with the projector of another slice.
      other = q[(layer + 1) % L]
      acc = sum(projections.project_down(other, g[layer], 'right')
                for g in grads)
      wrong = -projections.project_up(other, acc, 'right') / k
      assert not np.allclose(u[layer], wrong, atol=1e-3)
    # The mid-cycle sketch has the stacked low-rank shape.
    assert run.states[step - 1].acc_sketch['t'].shape == (L, N, R)


# ----------------------------------------------------- 7. jit and options


def test_jit_matches_eager(runs):
  # One non-jitted update from the jitted trajectory's state: the emitting
  # step of cycle 1 (k = 3), which uses projector 1 and the accumulated
  # sketch. (Each eager call recompiles the cond, ~1-2 s, hence only one.)
  run, i = runs['sgd3'], 5
  tx, params = run.scenario.tx, run.scenario.params
  u, state = tx.update(run.scenario.grads[i], run.prev_state(i), params)
  js = run.states[i]
  assert _no_zero_leaf(u)
  assert jax.tree.structure(u) == jax.tree.structure(run.updates[i])
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(run.updates[i]),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(state.mini_step) == int(js.mini_step) == 0
  assert int(state.gradient_step) == int(js.gradient_step) == 2
  for a, b in zip(
      jax.tree.leaves((state.inner_opt_state, state.acc_sketch)),
      jax.tree.leaves((js.inner_opt_state, js.acc_sketch)), strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_callable_every_k_schedule(runs):
  run, ref = runs['sched'], runs['ms_sched']
  tx = run.scenario.tx
  emitted_at = []
  for i in range(NSTEPS):
    s, rs = run.states[i], ref.states[i]
    assert int(s.mini_step) == int(rs.mini_step)
    assert int(s.gradient_step) == int(rs.gradient_step)
    assert bool(tx.has_updated(s)) == bool(ref.scenario.tx.has_updated(rs))
    np.testing.assert_allclose(
        run.updates[i]['b'], ref.updates[i]['b'], rtol=1e-5, atol=1e-7
    )
    if bool(tx.has_updated(s)):
      emitted_at.append(i)
  assert emitted_at == [1, 4, 7]
  # The second cycle has 3 micro-batches: their sum / 3, projector 1.
  plan = _rule().plan(run.scenario.params)['w']
  grads = run.scenario.grads
  for cycle, lo, hi in ((0, 0, 2), (1, 2, 5)):
    expected = _expected_sgd1_update(
        run.init.key, plan, cycle, [g['w'] for g in grads[lo:hi]], hi - lo
    )
    np.testing.assert_allclose(
        run.updates[hi - 1]['w'], expected, rtol=1e-5, atol=1e-6
    )


def test_use_grad_mean_false_is_k_times_mean(runs):
  mean_run, sum_run, k = runs['sgd3'], runs['sgd3_sum'], 3
  for i in range(NSTEPS):
    for name in ('w', 'b'):
      np.testing.assert_allclose(
          sum_run.updates[i][name], k * mean_run.updates[i][name],
          rtol=1e-5, atol=1e-6,
      )
  np.testing.assert_allclose(
      sum_run.updates[k - 1]['b'],
      -sum(g['b'] for g in sum_run.scenario.grads[:k]),
      rtol=1e-5, atol=1e-6,
  )
  assert _no_zero_leaf(sum_run.updates[k - 1])


def test_gradient_transformation_inside_chain(runs):
  # chain(scale(2), FloraMultiSteps(sgd)) == 2 * FloraMultiSteps(sgd): sgd is
  # linear and the scaling by 2 is exact in floating point.
  chain_run, direct = runs['chain'], runs['sgd3']
  assert isinstance(
      TX_SGD3.gradient_transformation(), optax.GradientTransformation
  )
  for i in range(NSTEPS):
    for a, b in zip(
        jax.tree.leaves(chain_run.updates[i]),
        jax.tree.leaves(direct.updates[i]), strict=True,
    ):
      np.testing.assert_allclose(a, 2.0 * b, rtol=1e-6, atol=1e-7)
    inner_state = chain_run.states[i][1]
    assert bool(TX_SGD3.has_updated(inner_state)) == ((i + 1) % 3 == 0)
  params = chain_run.scenario.params
  new_params = optax.apply_updates(params, chain_run.updates[2])
  assert not np.allclose(new_params['w'], params['w'])


def test_bf16_params_keep_bf16_updates(runs):
  run, ref = runs['adam3_bf16'], runs['adam3']  # same tx, float32 grads
  assert run.scenario.grads[0]['w'].dtype == jnp.bfloat16
  assert run.init.inner_opt_state[0].mu['w'].dtype == jnp.bfloat16
  for i in range(NSTEPS):
    u, s = run.updates[i], run.states[i]
    for x in jax.tree.leaves(u):
      assert x.dtype == jnp.bfloat16
      assert np.all(np.isfinite(np.asarray(x, np.float32)))
    assert s.acc_sketch['w'].dtype == jnp.float32  # accumulator_dtype
    if (i + 1) % 3 == 0:
      assert _no_zero_leaf(u)
      # Same maths as the float32 run, up to bf16 rounding of the gradients,
      # of adam's bf16 moments and of the emitted update.
      for name in ('w', 'b'):
        got = np.asarray(u[name], np.float32)
        want = np.asarray(ref.updates[i][name])
        np.testing.assert_allclose(
            got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max()
        )
    else:
      assert _all_zero(u)
  params = run.scenario.params
  assert optax.apply_updates(params, run.updates[2])['w'].dtype == jnp.bfloat16


# ------------------------------------------------------------ 8. errors


@pytest.mark.parametrize('k', [0, -1])
def test_bad_every_k_raises_value_error(k):
  with pytest.raises(ValueError, match='every_k_schedule'):
    _flora(optax.sgd(1.0), k)


@pytest.mark.parametrize('k', [2.0, True, '2'])
def test_non_int_every_k_raises_type_error(k):
  with pytest.raises(TypeError, match='every_k_schedule'):
    _flora(optax.sgd(1.0), k)


@pytest.mark.parametrize('rank', [0, -3])
def test_bad_rank_raises_value_error(rank):
  with pytest.raises(ValueError, match='rank'):
    _flora(optax.sgd(1.0), 2, rank=rank)


@pytest.mark.parametrize(
    'opt',
    [optax.adam, (lambda p: p, lambda g, s, p=None: (g, s)), 'sgd', None],
    ids=['factory', 'tuple', 'str', 'none'],
)
def test_opt_not_a_gradient_transformation_raises_type_error(opt):
  with pytest.raises(TypeError, match='GradientTransformation'):
    flora_jax.FloraMultiSteps(opt, 2, R)


@pytest.mark.parametrize(
    'key',
    [1.5, 'abc', True, None, np.float32(3.0), jnp.array(1.0),
     jnp.zeros((3,), jnp.uint32)],
    ids=['float', 'str', 'bool', 'none', 'np_float', 'jnp_float',
         'uint32x3'],
)
def test_bad_key_type_raises_type_error(key):
  with pytest.raises(TypeError, match='key'):
    _flora(optax.sgd(1.0), 2, key=key)


@pytest.mark.parametrize(
    'key',
    [3, np.int32(3), jnp.array(3, jnp.int32), jax.random.key(3),
     jax.random.PRNGKey(3)],
    ids=['int', 'np_int', 'jnp_int', 'typed', 'raw'],
)
def test_valid_key_forms_agree(key):
  state = _flora(optax.sgd(1.0), 2, key=key).init(_params())
  np.testing.assert_array_equal(
      jax.random.key_data(state.key),
      jax.random.key_data(jax.random.key(3)),
  )


def _nested(inner=None):
  tx = _flora(inner or optax.sgd(1.0), 2)
  params = {'layer': {'w': jnp.zeros((M, N)), 'b': jnp.zeros((N,))}}
  return tx, params, tx.init(params)


def _trace_update(tx, updates, state, params):
  """Traces (does not compile) one update; shape errors surface here."""
  return jax.eval_shape(tx.update, updates, state, params)


def test_missing_leaf_raises_value_error_naming_path():
  tx, params, state = _nested()
  bad = {'layer': {'w': jnp.ones((M, N))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['b'\]"):
    _trace_update(tx, bad, state, params)


def test_extra_leaf_raises_value_error_naming_path():
  tx, params, state = _nested()
  bad = {'layer': {'w': jnp.ones((M, N)), 'b': jnp.ones((N,)),
                   'extra': jnp.ones((3,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['extra'\]"):
    _trace_update(tx, bad, state, params)


def test_unprojected_leaf_shape_mismatch_raises_value_error_naming_path():
  tx, params, state = _nested()
  bad = {'layer': {'w': jnp.ones((M, N)), 'b': jnp.ones((N + 1,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['b'\]"):
    _trace_update(tx, bad, state, params)


def test_projected_leaf_kept_dim_mismatch_raises_value_error_naming_path():
  # 'w' is compressed on the rows; other columns change the sketch shape.
  tx, params, state = _nested()
  bad = {'layer': {'w': jnp.ones((M, N + 2)), 'b': jnp.ones((N,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\]"):
    _trace_update(tx, bad, state, params)


def test_projected_leaf_compressed_dim_mismatch_raises_value_error():
  tx, params, state = _nested()
  bad = {'layer': {'w': jnp.ones((M + 4, N)), 'b': jnp.ones((N,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\]"):
    _trace_update(tx, bad, state, params)


def test_unprojected_to_projected_shape_change_raises_value_error():
  tx = _flora(optax.sgd(1.0), 2)
  params = {'w': jnp.zeros((R, N))}
  state = tx.init(params)
  assert state.acc_sketch['w'].shape == (R, N)
  with pytest.raises(ValueError, match=r"\['w'\]"):
    _trace_update(tx, {'w': jnp.ones((M, N))}, state, params)


def test_projected_leaf_compressed_dim_mismatch_with_adam_names_path():
  tx, params, state = _nested(optax.adam(1e-2))
  bad = {'layer': {'w': jnp.ones((M + 4, N)), 'b': jnp.ones((N,))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\]"):
    _trace_update(tx, bad, state, params)


def test_integer_projected_leaf_raises_type_error_naming_path():
  tx = _flora(optax.sgd(1.0), 2)
  params = {'emb': {'table': jnp.zeros((M, N), jnp.int32)},
            'b': jnp.zeros((N,), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['emb'\]\['table'\]"):
    tx.init(params)
  # Float params but integer gradients for the projected leaf.
  params_f = {'emb': {'table': jnp.zeros((M, N))}, 'b': jnp.zeros((N,))}
  state = tx.init(params_f)
  bad = {'emb': {'table': jnp.ones((M, N), jnp.int32)}, 'b': jnp.ones((N,))}
  with pytest.raises(TypeError, match=r"\['emb'\]\['table'\]"):
    _trace_update(tx, bad, state, params_f)


@pytest.mark.parametrize('inner', [optax.sgd(1.0), optax.adam(1.0)])
def test_integer_leaf_is_refused_at_init_unless_masked_out(inner):
  """Accumulating an int leaf failed inside lax.cond ('equal output types').

  Not projecting it (projection_mask) is not enough: an accumulator needs a
  float leaf. `optax.masked` around the wrapper leaves it out.
  """
  tx = _flora(inner, 2, projection_mask={'emb': {'table': False}, 'b': True})
  params = {'emb': {'table': jnp.zeros((M, N), jnp.int32)},
            'b': jnp.zeros((N,))}
  with pytest.raises(TypeError, match=r"\['emb'\]\['table'\].*optax.masked"):
    tx.init(params)
  masked = optax.masked(_flora(inner, 2).gradient_transformation(),
                        {'emb': {'table': False}, 'b': True})
  state = masked.init(params)
  grads = {'emb': {'table': jnp.zeros((M, N), jnp.int32)},
           'b': jnp.ones((N,))}
  for _ in range(2):
    updates, state = masked.update(grads, state, params)
  assert bool(jnp.all(jnp.isfinite(updates['b'])))
  assert not bool(jnp.all(updates['b'] == 0))


def test_bad_accumulator_dtype_raises_type_error():
  with pytest.raises(TypeError, match='accumulator_dtype'):
    _flora(optax.sgd(1.0), 2, accumulator_dtype=jnp.int32)
