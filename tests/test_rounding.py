"""stochastic_rounding: unbiased, keyed, exact through any apply_updates."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax._src import rounding

DTYPES = [jnp.bfloat16, jnp.float16]


def _neighbours(x, dtype):
  """The two values of ``dtype`` around each float32 ``x`` (float64)."""
  nearest = np.asarray(x.astype(dtype).astype(jnp.float32), np.float64)
  x64 = np.asarray(x, np.float64)
  towards = np.where(x64 > nearest, np.inf, -np.inf)
  other = np.asarray(jnp.nextafter(x.astype(dtype), jnp.asarray(
      towards, dtype)).astype(jnp.float32), np.float64)
  return np.minimum(nearest, other), np.maximum(nearest, other)


@pytest.mark.parametrize('dtype', DTYPES, ids=['bfloat16', 'float16'])
def test_rounding_is_unbiased_within_three_standard_errors(dtype):
  """Over 2 x 10^5 draws of values spread between neighbours."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((400, 500)), jnp.float32)
  rounded = rounding.round_stochastic(x, dtype, jax.random.key(1))
  assert rounded.dtype == dtype
  error = np.asarray(rounded.astype(jnp.float32), np.float64) - np.asarray(
      x, np.float64)
  low, high = _neighbours(x, dtype)
  # Only the two neighbours, each with its probability.
  r64 = np.asarray(rounded.astype(jnp.float32), np.float64)
  assert np.all((r64 == low) | (r64 == high))
  standard_error = error.std() / np.sqrt(error.size)
  assert abs(error.mean()) <= 3 * standard_error
  # One value, 10^5 times: P(up) is its distance to the lower neighbour.
  one = jnp.full((100_000,), 1.0 + 2.0**-10, jnp.float32)
  ups = np.asarray(rounding.round_stochastic(one, dtype, jax.random.key(2))
                   .astype(jnp.float32)) > 1.0
  low, high = _neighbours(one[:1], dtype)
  p = (1.0 + 2.0**-10 - low[0]) / (high[0] - low[0])
  assert abs(ups.mean() - p) <= 3 * np.sqrt(p * (1 - p) / ups.size)


def test_exact_values_and_specials_are_kept():
  x = jnp.array([0.0, -0.0, 1.0, -2.5, jnp.inf, -jnp.inf, jnp.nan])
  rounded = rounding.round_stochastic(x, jnp.bfloat16, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(rounded.astype(jnp.float32)),
                                np.asarray(x))


def _chain(key=0):
  return optax.chain(optax.sgd(1e-3), flora_jax.stochastic_rounding(key))


def test_apply_updates_stores_the_stochastically_rounded_sum():
  params = {'w': jnp.ones((64, 64), jnp.bfloat16),
            'f32': jnp.ones((8,), jnp.float32),
            'step': jnp.zeros((), jnp.int32)}
  grads = {'w': jnp.full((64, 64), 0.3, jnp.bfloat16),
           'f32': jnp.full((8,), 0.3, jnp.float32),
           'step': jnp.zeros((), jnp.int32)}
  tx = optax.chain(
      optax.masked(optax.sgd(1e-3),
                   {'w': True, 'f32': True, 'step': False}),
      flora_jax.stochastic_rounding(5))
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert new['w'].dtype == jnp.bfloat16
  sgd = optax.sgd(1e-3)
  step, _ = sgd.update(grads['w'], sgd.init(grads['w']))
  expected = rounding.round_stochastic(
      1.0 + step.astype(jnp.float32), jnp.bfloat16,
      flora_jax.projections.projection_key(jax.random.key(5), "['w']", 0))
  np.testing.assert_array_equal(np.asarray(new['w'], np.float32),
                                np.asarray(expected, np.float32))
  assert len(np.unique(np.asarray(new['w'], np.float32))) == 2
  # float32 leaves and integers pass through.
  np.testing.assert_allclose(new['f32'], params['f32'] - 3e-4, rtol=1e-6)
  assert int(state[1].count) == 1


def test_small_updates_survive_where_nearest_rounding_loses_them():
  """1 - 1000 x 1e-4 in bfloat16: nearest stays at 1, rounding at random
  reaches 0.9 on average."""
  params = {'w': jnp.ones((256, 256), jnp.bfloat16)}
  grads = {'w': jnp.full((256, 256), 0.1, jnp.bfloat16)}

  def run(tx):
    def step(_, carry):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    p, _ = jax.jit(lambda p, s: jax.lax.fori_loop(0, 1000, step, (p, s)))(
        params, tx.init(params))
    return float(jnp.mean(p['w'].astype(jnp.float32)))

  assert run(optax.sgd(1e-3)) == 1.0
  assert run(_chain()) == pytest.approx(0.9, abs=2e-3)


def test_a_resumed_run_rounds_exactly_as_the_uninterrupted_one():
  params = {'w': jnp.ones((4, 16, 16), jnp.bfloat16)}
  tx = _chain(7)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  grads = [{'w': jnp.full((4, 16, 16), 0.01 * (t + 1), jnp.bfloat16)}
           for t in range(6)]
  p, s = params, tx.init(params)
  for g in grads:
    p, s = step(p, s, g)
  q, r = params, tx.init(params)
  for g in grads[:3]:
    q, r = step(q, r, g)
  saved = jax.tree.map(np.asarray, (q, jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x, r)))
  q = jax.tree.map(jnp.asarray, saved[0])
  r = jax.tree.map(jnp.asarray, r)  # the state's arrays, as restored
  for g in grads[3:]:
    q, r = step(q, r, g)
  np.testing.assert_array_equal(np.asarray(p['w'], np.float32),
                                np.asarray(q['w'], np.float32))


@pytest.mark.slow
def test_fused_step_with_stochastic_rounding_equals_the_ordinary_step():
  """bfloat16 stacked weights: each layer's matrix draws on its own."""
  rng = np.random.default_rng(0)
  params = {'w_in': jnp.asarray(rng.standard_normal((4, 16)), jnp.bfloat16),
            'layers': {'w': jnp.asarray(rng.standard_normal((3, 16, 16)) / 4,
                                        jnp.bfloat16),
                       'b': jnp.zeros((3, 16), jnp.bfloat16)},
            'w_out': jnp.asarray(rng.standard_normal((16, 1)), jnp.bfloat16)}
  x = jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16)

  # Computed in float32: bfloat16 arithmetic in another order would change
  # the gradients, and so the sums being rounded, by more than roundings.
  def f32(x):
    return x.astype(jnp.float32)

  def embed(p, x):
    return f32(x) @ f32(p['w_in'])

  def layer(lp, h, x):
    return jnp.tanh(h @ f32(lp['w']) + f32(lp['b']))

  def head(p, h, x):
    return jnp.mean((h @ f32(p['w_out'])) ** 2)

  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, lp: (layer(lp, h, x), None),
                        embed(p, x), p['layers'])
    return head(p, h, x)

  # The same float32 update everywhere, so that only the draws can differ:
  # bfloat16 arithmetic before the rounding is computed with more or less
  # excess precision in different programs (XLA's allow_excess_precision),
  # which moves the sums being rounded.
  tx = optax.chain(
      optax.stateless(lambda updates, params: jax.tree.map(
          lambda u: jnp.full(u.shape, 1e-3, jnp.float32), updates)),
      flora_jax.stochastic_rounding(3))
  fused = flora_jax.fused_train_step(
      tx, params, stack='layers', embed=embed, layer=layer, head=head,
      jit=False)
  state = tx.init(params)
  new, _, _ = jax.jit(fused)(params, state, x)
  grads = jax.grad(loss)(params, x)
  updates, _ = tx.update(grads, state, params)
  expected = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new),
                  strict=True):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  # The stacked matrices were rounded both ways, not to nearest.
  nearest = (params['layers']['w'].astype(jnp.float32) + 1e-3).astype(
      jnp.bfloat16)
  assert 0.0 < np.mean(np.asarray(new['layers']['w'] != nearest)) < 1.0


def test_needs_params():
  tx = flora_jax.stochastic_rounding()
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))


def test_nnx_optimizer_keeps_bfloat16_weights_rounded_at_random():
  model = nnx.Linear(32, 32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _chain(), wrt=nnx.Param)
  before = np.asarray(model.kernel[...], np.float32)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, x.dtype),
                       nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  after = model.kernel[...]
  assert after.dtype == jnp.bfloat16
  target = before - 1e-3 * 0.30078125  # bfloat16(0.3)
  low, high = _neighbours(jnp.asarray(target, jnp.float32), jnp.bfloat16)
  a64 = np.asarray(after, np.float64)
  assert np.all((a64 == low) | (a64 == high))


@pytest.mark.parametrize('key', [0, jax.random.key(1, impl='rbg')],
                         ids=['threefry', 'rbg'])
def test_scalars_and_any_key_type_round_without_bias(key):
  """The draws hash every word of the key (rbg keys have four) and the
  element's index (none for a scalar)."""
  tx = optax.chain(optax.sgd(1.0), flora_jax.stochastic_rounding(key))
  params = {'scalar': jnp.ones((), jnp.bfloat16),
            'matrix': jnp.ones((256, 256), jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, -2.0**-10, jnp.float32),
                       params)  # an eighth of bfloat16's step above 1
  step = jax.jit(tx.update)
  state, ups = tx.init(params), []
  for _ in range(64):
    updates, state = step(grads, state, params)
    ups.append(np.asarray(optax.apply_updates(params, updates)['scalar'],
                          np.float32))
  rounded_up = np.asarray(optax.apply_updates(params, updates)['matrix'],
                          np.float32) > 1
  # P(up) = 1/8: 65,536 draws, and 64 draws of the scalar.
  assert abs(rounded_up.mean() - 0.125) < 3 * np.sqrt(0.125 * 0.875 / 65536)
  assert 0 < np.mean(np.array(ups) > 1) < 0.4
