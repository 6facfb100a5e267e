"""GaLore and Fira: the subspace wrapper, projectors, residual and limiter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import flora_jax
from flora_jax import projections
from flora_jax._src import keys as keys_impl
from flora_jax._src import projectors as projectors_impl

SMALL = dict(min_dim=8)  # let the small test matrices be projected
RULE = flora_jax.ProjectionRule(4, **SMALL)


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      'wide': jax.random.normal(keys[0], (16, 32)),  # side left
      'tall': jax.random.normal(keys[1], (32, 16)),  # side right
      'stacked': jax.random.normal(keys[2], (3, 16, 24)),
      'bias': jax.random.normal(keys[3], (32,)),
  }


def _grads(step, params=None):
  params = _params() if params is None else params
  key = jax.random.fold_in(jax.random.key(42), step)
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape),
      params,
  )


def _run(tx, steps, params=None, grads_fn=_grads):
  params = _params() if params is None else params
  state = tx.init(params)
  step = jax.jit(tx.update)
  history = []
  for t in range(steps):
    updates, state = step(grads_fn(t, params), state, params)
    history.append((updates, state))
  return history, step


svd_projector = jax.jit(projections.svd_projector, static_argnames='plan')
randomized_projector = jax.jit(
    flora_jax.projections.randomized_projector,
    static_argnames=('plan', 'power_iterations', 'oversampling'))


def _plan(shape, side, rank):
  return projections.LeafPlan('w', tuple(shape), side, rank)


def _low_rank_plus_noise(key, shape, rank, noise=0.01):
  k1, k2, k3 = jax.random.split(key, 3)
  *batch, m, n = shape
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, rank)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, rank)))
  spectrum = 10.0 * 0.8 ** jnp.arange(rank)
  signal = jnp.einsum('...mr,r,...nr->...mn', u, spectrum, v)
  return signal + noise * jax.random.normal(k3, shape)


# ------------------------------------------------------------ projectors


@pytest.mark.parametrize('side', ['left', 'right'])
def test_svd_projector_is_the_top_singular_subspace(side):
  g = _low_rank_plus_noise(jax.random.key(1), (2, 48, 40), rank=6)
  q = svd_projector(g, _plan(g.shape, side, 4))
  assert q.shape == (2, 48 if side == 'left' else 40, 4)
  np.testing.assert_allclose(jnp.swapaxes(q, -1, -2) @ q,
                             jnp.broadcast_to(jnp.eye(4), (2, 4, 4)),
                             atol=1e-5)
  u, s, vh = np.linalg.svd(np.asarray(g, np.float64))
  ref = u[..., :4] if side == 'left' else np.swapaxes(vh[..., :4, :], -1, -2)
  # Same vectors up to sign, and the sign is the canonical one.
  np.testing.assert_allclose(np.abs(q), np.abs(ref), atol=1e-4)
  pivot = np.take_along_axis(np.asarray(q),
                             np.abs(np.asarray(q)).argmax(-2)[..., None, :],
                             -2)
  assert (pivot > 0).all()


def test_canonical_signs_make_the_projector_sign_invariant():
  g = _low_rank_plus_noise(jax.random.key(2), (40, 30), rank=5)
  plan = _plan(g.shape, 'left', 5)
  flips = jnp.where(jnp.arange(5) % 2 == 0, 1.0, -1.0)
  q = svd_projector(g, plan)
  np.testing.assert_array_equal(projections.canonicalize_signs(q * flips), q)


@pytest.mark.parametrize('shape,side', [((256, 192), 'left'),
                                        ((192, 256), 'right'),
                                        ((2, 128, 160), 'left')])
def test_randomized_projector_captures_the_svd_energy(shape, side):
  g = _low_rank_plus_noise(jax.random.key(3), shape, rank=16, noise=0.05)
  plan = _plan(shape, side, 8)
  exact = svd_projector(g, plan)
  approx = randomized_projector(jax.random.key(4), g, plan)

  def energy(q):
    return float(jnp.sum(projections.project_down(q, g, side) ** 2))

  assert energy(approx) >= 0.95 * energy(exact)
  np.testing.assert_allclose(jnp.swapaxes(approx, -1, -2) @ approx,
                             jnp.broadcast_to(jnp.eye(8), approx.shape[:-2]
                                              + (8, 8)), atol=1e-5)


def test_randomized_projector_on_pure_noise_is_still_orthonormal():
  g = jax.random.normal(jax.random.key(5), (64, 48))
  q = randomized_projector(jax.random.key(6), g,
                                     _plan(g.shape, 'left', 8),
                                     power_iterations=0, oversampling=0)
  np.testing.assert_allclose(q.T @ q, jnp.eye(8), atol=1e-5)


def test_randomized_projector_takes_the_slices_keys_or_their_base_key():
  g = jax.random.normal(jax.random.key(8), (3, 40, 24))
  plan = _plan(g.shape, 'right', 4)
  key = jax.random.key(9)
  per_slice = keys_impl.slice_keys(key, plan.batch_shape)
  np.testing.assert_array_equal(randomized_projector(key, g, plan),
                                randomized_projector(per_slice, g, plan))
  # A legacy raw key and an int seed are the typed key they stand for.
  np.testing.assert_array_equal(
      randomized_projector(key, g, plan),
      projections.randomized_projector(jax.random.key_data(key), g, plan))
  np.testing.assert_array_equal(randomized_projector(key, g, plan),
                                projections.randomized_projector(9, g, plan))
  with pytest.raises(ValueError, match=r'one per stacked slice, shape \(3,\)'):
    projections.randomized_projector(per_slice[:2], g, plan)


def test_the_range_finders_hashed_normals_are_standard_normal():
  draws = [keys_impl.hashed_normal(jax.random.key(k), (300, 200))
           for k in range(3)]
  for z in draws:
    # Kolmogorov-Smirnov at 60,000 draws: a distance above 0.007 has
    # p < 0.01 under N(0, 1).
    assert scipy.stats.kstest(np.asarray(z).ravel(), 'norm').statistic < 7e-3
    assert float(jnp.max(jnp.abs(z))) < 4.9
  # Other keys, other values: their correlation is that of independent ones.
  first, second = (np.asarray(z).ravel() for z in draws[:2])
  assert abs(np.corrcoef(first, second)[0, 1]) < 0.02
  # Neighbouring entries are uncorrelated too (the hash of consecutive
  # indices).
  assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 0.02


def test_change_basis_equals_down_of_up():
  keys = jax.random.split(jax.random.key(7), 3)
  q_old, _ = jnp.linalg.qr(jax.random.normal(keys[0], (20, 4)))
  q_new, _ = jnp.linalg.qr(jax.random.normal(keys[1], (20, 4)))
  for side, c_shape in (('left', (4, 9)), ('right', (9, 4))):
    c = jax.random.normal(keys[2], c_shape)
    expected = projections.project_down(
        q_new, projections.project_up(q_old, c, side), side)
    np.testing.assert_allclose(
        projections.change_basis(q_old, q_new, c, side), expected, atol=1e-5)


# -------------------------------------------------------------- galore


def test_identity_inner_gives_scaled_projection_of_the_gradient():
  """inner = trace(0), the identity: output = α Q Qᵀ G, Q the top-r SVD of G.

  (Not `optax.identity()`: without per-leaf state, storing a projector
  would only grow the state, so no leaf is projected; tested below.)
  """
  tx = flora_jax.scale_by_galore(optax.trace(0.0), RULE, scale=0.5)
  params = _params()
  grads = _grads(0)
  updates, state = jax.jit(tx.update)(grads, tx.init(params))
  q = svd_projector(grads['wide'], _plan((16, 32), 'left', 4))
  np.testing.assert_allclose(updates['wide'], 0.5 * q @ q.T @ grads['wide'],
                             atol=1e-5)
  q = svd_projector(grads['tall'], _plan((32, 16), 'right', 4))
  np.testing.assert_allclose(updates['tall'], 0.5 * grads['tall'] @ q @ q.T,
                             atol=1e-5)
  np.testing.assert_array_equal(updates['bias'], grads['bias'])  # unscaled
  assert isinstance(state.projectors['bias'], optax.MaskedNode)


def test_inner_state_lives_on_low_rank_shapes():
  tx = flora_jax.scale_by_galore(optax.scale_by_adam(), RULE)
  state = tx.init(_params())
  mu = state.inner_state.mu
  assert mu['wide'].shape == (4, 32)
  assert mu['tall'].shape == (32, 4)
  assert mu['stacked'].shape == (3, 4, 24)
  assert mu['bias'].shape == (32,)
  assert state.projectors['stacked'].shape == (3, 16, 4)


def test_stacked_leaf_equals_separate_matrices():
  """Each slice of an (L, m, n) leaf is its own GaLore/Fira problem."""
  stacked = {'s': _params()['stacked']}
  separate = {str(i): stacked['s'][i] for i in range(3)}

  def grads_stacked(t, _):
    return {'s': _grads(t)['stacked']}

  def grads_separate(t, _):
    g = _grads(t)['stacked']
    return {str(i): g[i] for i in range(3)}

  tx = flora_jax.fira(1e-2, 4, update_proj_gap=3, **SMALL)
  a, _ = _run(tx, 5, stacked, grads_stacked)
  b, _ = _run(tx, 5, separate, grads_separate)
  for (ua, _), (ub, _) in zip(a, b, strict=True):
    for i in range(3):
      np.testing.assert_allclose(ua['s'][i], ub[str(i)], rtol=1e-5,
                                 atol=1e-7)


_COUNTED = {'fits': 0}


def _counting_svd(original):
  def fit(g, plan, **kwargs):
    jax.debug.callback(lambda: _COUNTED.__setitem__('fits',
                                                    _COUNTED['fits'] + 1))
    return original(g, plan, **kwargs)
  return fit


def test_refresh_runs_only_every_T_steps_and_compiles_once(monkeypatch):
  monkeypatch.setattr(projectors_impl, 'svd_projector',
                      _counting_svd(projections.svd_projector))
  _COUNTED['fits'] = 0
  tx = flora_jax.galore(1e-2, 4, update_proj_gap=3, **SMALL)
  history, step = _run(tx, 10)
  jax.effects_barrier()
  # Refreshes at counts 0, 3, 6, 9; three projected leaves (one stacked).
  assert _COUNTED['fits'] == 4 * 3
  assert step._cache_size() == 1
  projectors = [h[1][0].projectors['stacked'] for h in history]
  for t in range(1, 10):
    changed = not np.array_equal(projectors[t], projectors[t - 1])
    assert changed == (t % 3 == 0), t


def test_refresh_is_a_branch_not_a_select_in_the_compiled_update():
  tx = flora_jax.galore(1e-2, 4, update_proj_gap=3, **SMALL)
  params = _params()
  hlo = jax.jit(tx.update).lower(_grads(0), tx.init(params),
                                 params).as_text()
  assert 'stablehlo.case' in hlo or 'stablehlo.if' in hlo


def test_transfer_moments_moves_mu_into_the_new_subspace():
  tx = flora_jax.scale_by_galore(optax.scale_by_adam(), RULE,
                                 update_proj_gap=2, transfer_moments=True)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(_grads(0), state)
  _, state = step(_grads(1), state)
  mu_before = state.inner_state.mu['wide']
  q_old = state.projectors['wide']
  g = _grads(2)
  _, after = step(g, state)
  q_new = after.projectors['wide']
  assert not np.allclose(q_new, q_old)
  moved = q_new.T @ q_old @ mu_before
  expected = 0.9 * moved + 0.1 * (q_new.T @ g['wide'])
  np.testing.assert_allclose(after.inner_state.mu['wide'], expected,
                             rtol=1e-5, atol=1e-6)
  # Off by default: mu stays in the old coordinates.
  plain = flora_jax.scale_by_galore(optax.scale_by_adam(), RULE,
                                    update_proj_gap=2)
  s = plain.init(params)
  plain_step = jax.jit(plain.update)
  for t in range(2):
    _, s = plain_step(_grads(t), s)
  _, s_after = plain_step(g, s)
  np.testing.assert_allclose(
      s_after.inner_state.mu['wide'],
      0.9 * s.inner_state.mu['wide'] + 0.1 * (q_new.T @ g['wide']),
      rtol=1e-5, atol=1e-6)


def test_transfer_moments_with_trace_and_random_projector():
  tx = flora_jax.scale_by_galore(optax.trace(0.9), RULE, update_proj_gap=2,
                                 projector='random', transfer_moments=True,
                                 key=3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(2):
    _, state = step(_grads(t), state)
  plan = RULE.plan(params)['tall']
  q_old = projections.random_projector(state.key, plan, 0)
  q_new = projections.random_projector(state.key, plan, 1)
  g = _grads(2)
  _, after = step(g, state)
  # the least-squares fit of the old trace in the new subspace
  moved = jnp.linalg.lstsq(
      q_new, (state.inner_state.trace['tall'] @ q_old.T).T)[0].T
  expected = 0.9 * moved + g['tall'] @ q_new
  np.testing.assert_allclose(after.inner_state.trace['tall'], expected,
                             rtol=1e-4, atol=1e-5)
  assert isinstance(after.projectors['tall'], optax.MaskedNode)


@pytest.mark.parametrize('inner', [
    optax.scale_by_adam(),
    flora_jax.scale_by_adam_hf(),
    optax.scale_by_lion(),
    optax.scale_by_factored_rms(min_dim_size_to_factor=2),
    optax.trace(0.9),
    optax.chain(optax.scale_by_rms(), optax.scale_by_schedule(
        optax.cosine_decay_schedule(1.0, 10))),
], ids=['adam', 'adam_hf', 'lion', 'adafactor', 'momentum', 'chain'])
def test_any_inner_optimizer_runs_and_decay_applies_in_full_space(inner):
  wd, lr = 0.1, 1e-2
  tx = optax.chain(
      flora_jax.scale_by_galore(inner, RULE, update_proj_gap=2),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(lr),
  )
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)  # decay nothing
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    with_decay, next_state = step(_grads(t), state, params)
    without, _ = step(_grads(t), state, zeros)
    for name in params:
      assert with_decay[name].shape == params[name].shape
      assert np.isfinite(np.asarray(with_decay[name])).all()
      # The decay is -lr wd W on the full parameter, added after the
      # low-rank part.
      np.testing.assert_allclose(with_decay[name] - without[name],
                                 -lr * wd * params[name], rtol=1e-4,
                                 atol=1e-7)
    state = next_state


def test_inject_hyperparams_with_a_schedule():
  tx = optax.inject_hyperparams(
      flora_jax.galore,
      static_args=('rank', 'min_dim', 'max_aspect_ratio'),
  )(learning_rate=optax.linear_schedule(1e-2, 0.0, 10), rank=4,
    update_proj_gap=3, min_dim=8)
  history, _ = _run(tx, 4)
  assert np.isfinite(np.asarray(history[-1][0]['wide'])).all()
  assert float(history[-1][1].hyperparams['learning_rate']) < 1e-2


def test_hf_adam_matches_the_formula():
  tx = flora_jax.scale_by_adam_hf(0.9, 0.999, 1e-6)
  g1, g2 = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])
  state = tx.init(g1)
  _, state = tx.update(g1, state)
  out, _ = tx.update(g2, state)
  m = 0.9 * 0.1 * g1 + 0.1 * g2
  v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
  c = np.sqrt(1 - 0.999**2) / (1 - 0.9**2)
  np.testing.assert_allclose(out, c * m / (np.sqrt(v) + 1e-6), rtol=1e-6)


def test_galore_hf_decays_the_updated_weights():
  """W <- (W + Δ)(1 - lr wd), the reference's order."""
  lr, wd = 0.1, 0.5
  params = {'b': jnp.array([1.0, -1.0])}
  g = {'b': jnp.array([0.3, 0.2])}
  plain = flora_jax.galore(lr, 4)
  decayed = flora_jax.galore(lr, 4, weight_decay=wd)
  d0, _ = plain.update(g, plain.init(params), params)
  d1, _ = decayed.update(g, decayed.init(params), params)
  np.testing.assert_allclose(
      params['b'] + d1['b'], (params['b'] + d0['b']) * (1 - lr * wd),
      rtol=1e-6)


# ------------------------------------------------------------------ fira


# The sign of the update, through a state (trace with decay 0 is the
# identity): without per-leaf state no leaf would be projected.
STATEFUL_SIGN = optax.chain(optax.trace(0.0), optax.scale_by_sign())


def _fira_hand(g, q, side, scale, formulation):
  """One Fira step with inner = sign, computed in numpy."""
  g, q = np.asarray(g, np.float64), np.asarray(q, np.float64)
  r = q.T @ g if side == 'left' else g @ q
  n = np.sign(r)
  axis = 0 if side == 'left' else 1
  phi = (np.linalg.norm(n, axis=axis, keepdims=True)
         / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
  back = lambda x: q @ x if side == 'left' else x @ q.T
  if formulation == 'code':
    s = phi * (g - scale * back(r))
    return scale * back(n) + s, s
  s = phi * (g - back(r))
  return scale * (back(n) + s), s


@pytest.mark.parametrize('formulation', ['code', 'paper'])
@pytest.mark.parametrize('name,side', [('wide', 'left'), ('tall', 'right')])
@pytest.mark.parametrize('projector', ['svd', 'randomized', 'random'])
def test_fira_phi_and_residual_match_hand_computation(formulation, name, side,
                                                      projector):
  """With fitted (orthonormal) projectors and with Gaussian ones, whose
  ``QᵀQ`` the limiter's residual norm must not take for ``I``."""
  tx = flora_jax.scale_by_fira(STATEFUL_SIGN, RULE, scale=0.25,
                               formulation=formulation, projector=projector)
  g = _grads(0)
  updates, state = jax.jit(tx.update)(g, tx.init(_params()))
  if projector == 'random':  # regenerated from the key, the first window's
    q = projections.random_projectors(state.key, RULE.plan(_params()), 0)[name]
    assert not np.allclose(q.T @ q, np.eye(q.shape[1]), atol=0.1)
  else:
    q = state.projectors[name]
  expected, s = _fira_hand(g[name], q, side, 0.25, formulation)
  np.testing.assert_allclose(updates[name], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.residual_norms[name], np.linalg.norm(s),
                             rtol=1e-5)


def test_paper_residual_is_orthogonal_to_the_subspace():
  tx = flora_jax.scale_by_fira(STATEFUL_SIGN, RULE,
                               formulation='paper')
  g = _grads(0)
  _, state = jax.jit(tx.update)(g, tx.init(_params()))
  q = state.projectors['wide']
  _, s = _fira_hand(g['wide'], q, 'left', 0.25, 'paper')
  np.testing.assert_allclose(np.asarray(q).T @ s, 0, atol=1e-5)
  _, s_code = _fira_hand(g['wide'], q, 'left', 0.25, 'code')
  assert np.linalg.norm(np.asarray(q).T @ s_code) > 0.1


def test_fira_limiter_caps_residual_growth_and_survives_refresh():
  """With T=2: limited growth at steps 2 and 3 (across the refresh)."""
  gamma = 1.01
  # inner = identity makes φ = 1, so the residual grows with the gradient.
  tx = flora_jax.scale_by_fira(optax.trace(0.0), RULE, update_proj_gap=2,
                               growth_limit=gamma)
  unlimited = flora_jax.scale_by_fira(optax.trace(0.0), RULE,
                                      update_proj_gap=2, growth_limit=None)
  params = _params()
  s_lim, s_free = tx.init(params), unlimited.init(params)
  step_lim, step_free = jax.jit(tx.update), jax.jit(unlimited.update)
  norms = []
  for t in range(4):
    g = jax.tree.map(lambda x: x * 3.0**t, _grads(t))  # residuals grow 3x
    u_lim, s_lim = step_lim(g, s_lim)
    u_free, s_free = step_free(g, s_free)
    norms.append(np.asarray(s_lim.residual_norms['stacked']))
    if t == 0:  # first step unlimited
      np.testing.assert_allclose(u_lim['stacked'], u_free['stacked'],
                                 rtol=1e-6)
  for t in range(1, 4):
    np.testing.assert_allclose(norms[t], gamma * (norms[t - 1] + 1e-8),
                               rtol=1e-5)
  assert norms[0].shape == (3,)


def test_standalone_limiter_bounds_growth_by_gamma_exactly():
  gamma = 1.05
  tx = flora_jax.limit_norm_growth(gamma)
  scales = [1.0, 3.0, 0.5, 0.6, 10.0, 1.0]
  updates = {'a': jnp.ones((3, 4)), 'b': jnp.arange(5.0)}
  state = tx.init(updates)
  step = jax.jit(tx.update)
  previous = None
  for k in scales:
    u = jax.tree.map(lambda x: x * k, updates)
    out, state = step(u, state)
    norm = float(jnp.linalg.norm(out['a']))
    raw = float(jnp.linalg.norm(u['a']))
    if previous is None:
      assert norm == pytest.approx(raw, rel=1e-6)
    else:
      assert norm <= gamma * previous * (1 + 1e-6)
      expected = min(raw, gamma * (previous + 1e-8))
      assert norm == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(float(state.previous_norms['a']), norm,
                               rtol=1e-6)
    previous = norm


# ------------------------------------------------------ degenerate input


def _refresh_step(tx):
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(_grads(0), state, params)
  return params, state, step


@pytest.mark.parametrize('projector', ['svd', 'randomized'])
def test_bad_gradient_at_refresh_keeps_the_previous_projector(projector):
  tx = flora_jax.fira(1e-2, 4, update_proj_gap=1, projector=projector,
                      **SMALL)
  params, state, step = _refresh_step(tx)
  grads = _grads(1)
  grads['wide'] = jnp.zeros_like(grads['wide'])
  grads['stacked'] = grads['stacked'].at[1].set(jnp.nan)  # one slice of 3
  updates, new_state = step(grads, state, params)
  before, after = state[0].projectors, new_state[0].projectors
  np.testing.assert_array_equal(after['wide'], before['wide'])
  np.testing.assert_array_equal(after['stacked'][1], before['stacked'][1])
  assert not np.array_equal(after['stacked'][0], before['stacked'][0])
  assert np.isfinite(np.asarray(after['stacked'])).all()
  # The zero gradient leaves the update (momentum only) and state finite.
  _assert_all_finite((updates['wide'], new_state[0].inner_state.mu['wide'],
                      new_state[0].inner_state.nu['wide'],
                      new_state[0].residual_norms['wide']))


def _assert_all_finite(tree):
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.isfinite(np.asarray(leaf)).all()


def test_nan_gradient_with_apply_if_finite_leaves_everything_finite():
  tx = optax.apply_if_finite(
      flora_jax.fira(1e-2, 4, update_proj_gap=1, **SMALL), 3)
  params, state, step = _refresh_step(tx)
  grads = _grads(1)
  grads['wide'] = grads['wide'].at[0, 0].set(jnp.nan)
  updates, state = step(grads, state, params)
  assert not np.asarray(updates['wide']).any()
  updates, state = step(_grads(2), state, params)
  _assert_all_finite((updates, state))
  assert np.asarray(updates['wide']).any()


def test_zero_first_gradient_is_refitted_at_the_next_step():
  tx = flora_jax.galore(1e-2, 4, update_proj_gap=100, **SMALL)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = step(zeros, state, params)
  assert not np.asarray(state[0].projectors['wide']).any()
  for leaf in jax.tree.leaves(updates):
    assert np.isfinite(np.asarray(leaf)).all()
  _, state = step(_grads(1), state, params)
  q = state[0].projectors['wide']
  np.testing.assert_allclose(q.T @ q, jnp.eye(4), atol=1e-5)


@pytest.mark.parametrize('projector', ['svd', 'randomized'])
def test_rank_deficient_and_ill_conditioned_gradients(projector):
  tx = flora_jax.fira(1e-2, 8, update_proj_gap=1, projector=projector,
                      **SMALL)
  params = {'w': jnp.zeros((32, 48))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  key = jax.random.key(9)
  rank_two = jax.random.normal(key, (32, 2)) @ jax.random.normal(key, (2, 48))
  u, _ = jnp.linalg.qr(jax.random.normal(key, (32, 32)))
  v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(10), (48, 32)))
  ill = (u * jnp.logspace(0, -30, 32)) @ v.T
  for g in (rank_two, ill, rank_two * 1e-30):
    updates, state = step({'w': g}, state, params)
    assert np.isfinite(np.asarray(updates['w'])).all()
    q = state[0].projectors['w']
    assert np.isfinite(np.asarray(q)).all()
    np.testing.assert_allclose(q.T @ q, jnp.eye(8), atol=1e-4)


# ---------------------------------------------------------------- memory


def test_state_bytes_follow_the_formula():
  rank = 4
  params = _params()
  tx = flora_jax.galore(1e-2, rank, **SMALL)
  state = jax.eval_shape(tx.init, params)
  f32, counts = 4, 4
  projectors = (16 * rank) + (16 * rank) + 3 * (16 * rank)
  moments = 2 * ((rank * 32) + (32 * rank) + 3 * (rank * 24) + 32)
  # galore count + key (2 x uint32) + settings (int8), inner Adam count,
  # bias-correction count.
  scalars = counts + 8 + 1 + counts + counts
  assert flora_jax.memory.state_bytes(state) == (
      f32 * (projectors + moments) + scalars)
  # Against the full Adam state: smaller.
  adam = jax.eval_shape(optax.adamw(1e-2).init, params)
  state_bytes = flora_jax.memory.state_bytes
  assert state_bytes(state) < state_bytes(adam)


def test_state_bytes_against_optax_contrib_galore():
  """Same bytes on the same side; stacked leaves differ.

  optax.contrib.galore compresses the LARGER side (``side='larger'`` here),
  so per 2-D matrix its state ``r (max + 2 min)`` is smaller than the
  reference GaLore's ``r (min + 2 max)`` (``side='auto'``); it keeps full
  Adam moments for stacked (L, m, n) leaves, which are projected here.
  """
  rank = 4
  flat = {'tall': jnp.zeros((32, 16)), 'wide': jnp.zeros((16, 48)),
          'square': jnp.zeros((16, 16))}
  theirs = optax.contrib.galore(1e-2, rank=rank)
  size = lambda tx, p: flora_jax.memory.state_bytes(jax.eval_shape(tx.init, p))
  same_side = flora_jax.galore(1e-2, rank, side='larger', adam='optax',
                               **SMALL)
  assert size(same_side, flat) == size(theirs, flat) + 9  # + key, settings
  reference_side = flora_jax.galore(1e-2, rank, adam='optax', **SMALL)
  f32, r = 4, rank
  delta = sum(r * (min(m, n) + 2 * max(m, n)) - r * (max(m, n) + 2 * min(m, n))
              for m, n in [(32, 16), (16, 48)])
  assert size(reference_side, flat) == size(same_side, flat) + f32 * delta
  stacked = {'w': jnp.zeros((8, 128, 128))}
  assert size(flora_jax.galore(1e-2, 16), stacked) < 0.5 * size(theirs,
                                                                 stacked)


# ----------------------------------------------------------- bad input


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(rule=0), ValueError, 'rank'),
    (dict(rule=-3), ValueError, 'rank'),
    (dict(rule=4.0), TypeError, 'rule'),
    (dict(rule=4, update_proj_gap=0), ValueError, 'update_proj_gap'),
    (dict(rule=4, projector='qr'), ValueError, 'projector'),
    (dict(rule=4, power_iterations=-1), ValueError, 'power_iterations'),
    (dict(rule=4, projector='randomized', oversampling=1.5), ValueError,
     'oversampling'),
    (dict(rule=4, key='seed'), TypeError, 'key'),
    (dict(rule=4, residual=('code', 1.01)), TypeError, 'residual'),
])
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    flora_jax.scale_by_galore(optax.scale_by_adam(), **kwargs)


def test_bad_fira_arguments():
  with pytest.raises(ValueError, match='formulation'):
    flora_jax.fira(1e-2, formulation='both')
  with pytest.raises(ValueError, match='growth_limit'):
    flora_jax.fira(1e-2, growth_limit=0.5)
  with pytest.raises(ValueError, match='adam'):
    flora_jax.galore(1e-2, adam='torch')
  with pytest.raises(TypeError, match='inner'):
    flora_jax.scale_by_galore(optax.adam, 4)
  with pytest.raises(ValueError, match='growth_limit'):
    flora_jax.limit_norm_growth(0.9)


def test_inner_optimizer_that_needs_params_is_refused_at_init():
  tx = flora_jax.scale_by_galore(optax.adamw(1e-3), RULE)
  with pytest.raises(ValueError, match='add_decayed_weights'):
    tx.init(_params())


def test_mismatched_updates_name_the_leaf():
  tx = flora_jax.galore(1e-2, 4, **SMALL)
  params = _params()
  state = tx.init(params)
  grads = _grads(0)
  del grads['bias']
  with pytest.raises(ValueError, match='bias'):
    tx.update(grads, state)
  grads = _grads(0)
  grads['wide'] = jnp.zeros((16, 40))
  with pytest.raises(ValueError, match='wide'):
    tx.update(grads, state, params)
