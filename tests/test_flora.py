"""Flora: the compressor, compressed momentum and the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import projections
from flora_jax._src import keys

SMALL = dict(min_dim=8)  # let the small test matrices be projected


def _small(rank, **rule):
  """A ProjectionRule that projects the small test matrices."""
  return flora_jax.ProjectionRule(rank, **SMALL, **rule)


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      'wide': jax.random.normal(keys[0], (16, 32), dtype),  # side left
      'tall': jax.random.normal(keys[1], (32, 16), dtype),  # side right
      'stacked': jax.random.normal(keys[2], (3, 16, 24), dtype),
      'bias': jax.random.normal(keys[3], (32,), dtype),
  }


def _grads(step, dtype=jnp.float32):
  key = jax.random.fold_in(jax.random.key(42), step)
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape,
                                  dtype), _params(dtype))


def _plan(tree, path, **rule):
  plans = flora_jax.ProjectionRule(**rule).plan(tree)
  return {p.path: p for p in jax.tree.leaves(plans)}[path]


def _cosine(a, b):
  a, b = jnp.ravel(a), jnp.ravel(b)
  return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# --------------------------------------------------------- flora_compress


@pytest.mark.parametrize('name', ['wide', 'tall'])
def test_compress_with_sgd_is_a_lora_step_with_frozen_random_factor(name):
  """One SGD step on up(down(G)) == one LoRA step training B, A = Q frozen."""
  w0 = _params()[name]
  m, n = w0.shape
  x = jax.random.normal(jax.random.key(1), (8, m))
  y = jax.random.normal(jax.random.key(2), (8, n))
  loss = lambda w: jnp.mean((x @ w - y) ** 2)
  lr, rank = 0.3, 4

  tx = optax.chain(flora_jax.flora_compress(_small(rank), key=5),
                   optax.sgd(lr))
  state = tx.init(w0)
  updates, _ = tx.update(jax.grad(loss)(w0), state)
  flora_w = w0 + updates

  plan = _plan(w0, '', rank=rank, **SMALL)
  q = projections.random_projector(state[0].key, plan, 0)
  if plan.side == 'left':  # W + Q B with B: (r, n) trainable, starting at 0
    lora_w = lambda b: w0 + q @ b
    b0 = jnp.zeros((rank, n))
  else:  # W + B Qᵀ with B: (m, r)
    lora_w = lambda b: w0 + b @ q.T
    b0 = jnp.zeros((m, rank))
  b1 = b0 - lr * jax.grad(lambda b: loss(lora_w(b)))(b0)
  np.testing.assert_allclose(flora_w, lora_w(b1), rtol=1e-5, atol=1e-6)
  assert not np.allclose(flora_w, w0 - lr * jax.grad(loss)(w0), atol=1e-3)


KAPPA = 3
_compress = flora_jax.flora_compress(_small(4), kappa=KAPPA, key=0)
_compress_update = jax.jit(_compress.update)


def test_compress_projection_changes_exactly_every_kappa_steps():
  params = _params()
  g = _grads(0)
  state = _compress.init(params)
  outputs = []
  for _ in range(2 * KAPPA + 1):
    out, state = _compress_update(g, state)
    outputs.append(out)
  for step in range(1, 2 * KAPPA + 1):
    same = np.allclose(outputs[step]['wide'], outputs[step - 1]['wide'])
    assert same == (step % KAPPA != 0), step
    np.testing.assert_array_equal(outputs[step]['bias'], g['bias'])
  assert _compress_update._cache_size() == 1  # no recompilation at resamples


def test_compress_jit_equals_eager_and_keeps_dtypes():
  for dtype in (jnp.float32, jnp.bfloat16):
    params, g = _params(dtype), _grads(0, dtype)
    state = _compress.init(params)
    eager, _ = _compress.update(g, state)
    jitted, _ = jax.jit(_compress.update)(g, state)
    for leaf in jax.tree.leaves(eager):
      assert leaf.dtype == dtype
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2
            if dtype == jnp.bfloat16 else 1e-6, atol=1e-5), eager, jitted)


def test_stacked_slices_are_projected_independently():
  g = {'stacked': jnp.ones((3, 16, 24))}
  out, _ = _compress.update(g, _compress.init(g))
  assert not np.allclose(out['stacked'][0], out['stacked'][1])


def test_compress_composes_with_masked_and_partition():
  params, g = _params(), _grads(0)
  direct = flora_jax.flora_compress(
      _small(4, projection_mask={'wide': True, 'tall': False,
                                 'stacked': False, 'bias': False}), key=0)
  expected, _ = direct.update(g, direct.init(params))
  np.testing.assert_array_equal(expected['tall'], g['tall'])

  mask = {'wide': True, 'tall': False, 'stacked': False, 'bias': False}
  masked = optax.masked(flora_jax.flora_compress(_small(4), key=0), mask)
  out, _ = masked.update(g, masked.init(params))
  jax.tree.map(np.testing.assert_array_equal, out, expected)

  labels = {'wide': 'flora', 'tall': 'plain', 'stacked': 'plain',
            'bias': 'plain'}
  partitioned = optax.partition(
      {'flora': flora_jax.flora_compress(_small(4), key=0),
       'plain': optax.identity()}, labels)
  out, _ = partitioned.update(g, partitioned.init(params))
  jax.tree.map(np.testing.assert_array_equal, out, expected)


def test_compress_inside_multisteps_and_apply_if_finite():
  params = _params()
  tx = optax.MultiSteps(optax.chain(_compress, optax.sgd(1.0)), 2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  out0, state = step(_grads(0), state, params)
  out1, state = step(_grads(1), state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(out0))
  mean_bias = (_grads(0)['bias'] + _grads(1)['bias']) / 2
  np.testing.assert_allclose(out1['bias'], -mean_bias, rtol=1e-6)

  guarded = optax.apply_if_finite(optax.chain(_compress, optax.sgd(1.0)), 3)
  state = guarded.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(0))
  out, state = jax.jit(guarded.update)(bad, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(out))
  assert int(state.notfinite_count) == 1
  # the skipped step did not advance the inner counter
  assert int(state.inner_state[0].count) == 0


@pytest.mark.parametrize(
    'make, error, match',
    [
        (lambda: flora_jax.flora_compress(0), ValueError, 'rank'),
        (lambda: flora_jax.flora_compress(4, kappa=0), ValueError, 'kappa'),
        (lambda: flora_jax.flora_compress(4, kappa=-2), ValueError, 'kappa'),
        (lambda: flora_jax.flora_compress(4, kappa=1.5), TypeError, 'kappa'),
        (lambda: flora_jax.flora_compress(4, key=0.5), TypeError, 'key'),
        (lambda: flora_jax.flora_compress(4, key='a'), TypeError, 'key'),
        (lambda: flora_jax.scale_by_flora_momentum(1.0, rule=4), ValueError,
         'b1'),
        (lambda: flora_jax.scale_by_flora_momentum(rule=4,
                                                   momentum_dtype=jnp.int8),
         TypeError, 'momentum_dtype'),
        (lambda: flora_jax.flora(1e-3, rank=-1), ValueError, 'rank'),
        (lambda: flora_jax.flora_compress(4, sketch='sparse'), ValueError,
         'sketch'),
        (lambda: flora_jax.flora(1e-3, sketch='normal'), ValueError, 'sketch'),
        (lambda: flora_jax.FloraMultiSteps(optax.sgd(1.0), 2, 4,
                                           sketch='x'), ValueError, 'sketch'),
    ],
)
def test_bad_arguments_are_refused_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_bad_leaves_are_refused_at_init_with_their_path():
  bad = {'layer': {'kernel': jnp.zeros((16, 16), jnp.int32)}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['kernel'\]"):
    flora_jax.flora_compress(_small(4)).init(bad)
  counter = {'w': jnp.zeros((16, 16)), 'n': jnp.zeros((4,), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['n'\]"):
    flora_jax.scale_by_flora_momentum(rule=_small(4)).init(counter)


def test_momentum_refuses_updates_that_do_not_match_its_state():
  tx = flora_jax.scale_by_flora_momentum(rule=_small(4))
  state = tx.init(_params())
  renamed = dict(_grads(0))
  renamed['other'] = renamed.pop('bias')
  with pytest.raises(ValueError, match=r"\['bias'\]"):
    tx.update(renamed, state)
  reshaped = dict(_grads(0), wide=jnp.zeros((16, 40)))
  with pytest.raises(ValueError, match=r"\['wide'\].*\(4, 40\)"):
    tx.update(reshaped, state)
  # (20, 32) compresses to the same (4, 32) as (16, 32): only the parameters
  # can tell, so they are checked when given.
  compressed_dim_changed = dict(_grads(0), wide=jnp.zeros((20, 32)))
  with pytest.raises(ValueError, match=r"\['wide'\].*\(20, 32\)"):
    tx.update(compressed_dim_changed, state, _params())


# ------------------------------------------------------------- momentum


def test_momentum_state_shapes_dtypes_and_bytes():
  params = dict(_params(), embed=jnp.zeros((100, 16)))
  mask = {'wide': True, 'tall': True, 'stacked': True, 'bias': True,
          'embed': True}
  for dtype, itemsize in ((jnp.float32, 4), (jnp.bfloat16, 2)):
    tx = flora_jax.scale_by_flora_momentum(
        rule=_small(4, projection_mask=dict(mask, tall=False)),
        momentum_dtype=dtype)
    state = jax.eval_shape(tx.init, params)
    shapes = jax.tree.map(lambda x: x.shape, state.momentum)
    assert shapes == {'wide': (4, 32), 'tall': (32, 16),  # masked out
                      'stacked': (3, 4, 24), 'bias': (32,),
                      'embed': (100, 16)}  # aspect ratio 6.25 > 4
    assert {x.dtype for x in jax.tree.leaves(state.momentum)} == {
        jnp.dtype(dtype)}
    numbers = 4 * 32 + 32 * 16 + 3 * 4 * 24 + 32 + 100 * 16
    key_count_and_settings = 8 + 4 + 1
    total = numbers * itemsize + key_count_and_settings
    assert flora_jax.memory.state_bytes(state) == total


def _reference_transfer(transfer, q_old, q_new, c, side):
  """Moves C into the new subspace through the full-size matrix."""
  full = projections.project_up(q_old, c, side)
  if transfer == 'paper':
    return projections.project_down(q_new, full, side)
  if transfer == 'reset':
    return jnp.zeros_like(c)
  if transfer == 'published':  # the old key on both sides
    return projections.project_down(q_old, full, side)
  assert transfer == 'least_squares'
  if side == 'left':  # min |Q_new X - full|
    return jnp.linalg.lstsq(q_new, full)[0]
  return jnp.linalg.lstsq(q_new, full.T)[0].T  # min |X Q_newᵀ - full|


def _reference_momentum(b1, kappa, key, plan, grads, transfer='paper',
                        nesterov=False, sketch='gaussian'):
  """A direct transcription of the formulas, one leaf, step by step."""
  c = jnp.zeros(plan.low_rank_shape)
  outputs, norms = [], []
  for t, u in enumerate(grads):
    q = projections.random_projector(key, plan, t // kappa, sketch)
    if t > 0 and t % kappa == 0:
      q_old = projections.random_projector(key, plan, t // kappa - 1, sketch)
      c = _reference_transfer(transfer, q_old, q, c, plan.side)
    c_new = b1 * c + (1 - b1) * projections.project_down(q, u, plan.side)
    history = c_new if nesterov else c
    outputs.append(b1 * projections.project_up(q, history, plan.side)
                   + (1 - b1) * u)
    norms.append(float(jnp.linalg.norm(c_new)))
    c = c_new
  return outputs, norms


@pytest.mark.parametrize(('nesterov', 'transfer', 'sketch'), [
    (False, 'least_squares', 'gaussian'), (True, 'least_squares', 'gaussian'),
    (False, 'paper', 'gaussian'), (True, 'paper', 'gaussian'),
    (False, 'reset', 'gaussian'), (False, 'least_squares', 'rademacher')])
def test_momentum_matches_the_formulas_across_resamples(nesterov, transfer,
                                                        sketch):
  b1, kappa = 0.5, 2
  tx = flora_jax.scale_by_flora_momentum(
      b1, rule=_small(4), kappa=kappa, key=3, nesterov=nesterov,
      momentum_transfer=transfer, sketch=sketch)
  params = _params()
  state = tx.init(params)
  grads = [_grads(t) for t in range(5)]
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    out, state = update(g, state)
    outs.append(out)
  for name in ('wide', 'tall', 'stacked'):
    plan = _plan(params, f"['{name}']", rank=4, **SMALL)
    leaf_grads = [g[name] for g in grads]
    if plan.batch_shape:  # the reference handles one matrix at a time
      continue
    expected, _ = _reference_momentum(b1, kappa, state.key, plan, leaf_grads,
                                      transfer, nesterov, sketch)
    for t in range(5):
      np.testing.assert_allclose(outs[t][name], expected[t], rtol=1e-4,
                                 atol=1e-4, err_msg=f'{name} step {t}')
  # unprojected leaves: a plain EMA (optax.ema without debiasing)
  ema = optax.ema(b1, debias=False)
  ema_state = ema.init(params['bias'])
  for t, g in enumerate(grads):
    m, ema_state = ema.update(g['bias'], ema_state)
    want = b1 * m + (1 - b1) * g['bias'] if nesterov else m
    np.testing.assert_allclose(outs[t]['bias'], want, rtol=1e-5, atol=1e-7)


def _momentum_norms(transfer, kappa, steps, rank=4, dim=64):
  """|up(C)| after each step: one nonzero gradient, then zeros."""
  tx = flora_jax.scale_by_flora_momentum(
      0.9, rule=_small(rank), kappa=kappa, momentum_transfer=transfer)
  g = jax.random.normal(jax.random.key(0), (dim, 2 * dim))
  plan = _plan(g, '', rank=rank, **SMALL)

  def step(state, grad):
    _, state = tx.update(grad, state)
    q = projections.random_projector(state.key, plan,
                                     (state.count - 1) // kappa)
    return state, jnp.linalg.norm(
        projections.project_up(q, state.momentum, plan.side))

  grads = jnp.concatenate([g[None], jnp.zeros((steps - 1,) + g.shape)])
  return np.asarray(jax.lax.scan(step, tx.init(g), grads)[1])


def test_least_squares_transfer_never_grows_the_momentum():
  """Zero gradients at rank 4, kappa 10, dim 64: sqrt(dim / r) b1^kappa = 1.4.

  The paper's transfer grows the momentum by that factor per resample
  (measured below); the least-squares one only ever shrinks it.
  """
  norms = _momentum_norms('least_squares', kappa=10, steps=200)
  assert np.all(np.diff(norms) <= 1e-6 * norms[:-1])
  assert norms[10] > 0.01 * norms[9]  # moved, not reset
  paper = _momentum_norms('paper', kappa=30, steps=200)  # allowed: 0.17
  assert np.all(np.isfinite(paper))
  resamples = paper[30::30] / paper[29:-1:30]
  assert np.exp(np.mean(np.log(resamples))) > 2  # about sqrt(64 / 4) = 4


def test_flora_with_a_short_kappa_stays_finite_on_a_long_run():
  """flora(rank=4, kappa=10) on least squares reached NaN near step 1,480."""
  a = jax.random.normal(jax.random.key(1), (256, 64))
  target = a @ jax.random.normal(jax.random.key(2), (64, 64))
  tx = flora_jax.flora(1e-2, rank=4, kappa=10, min_dim=8,
                       min_dim_size_to_factor=8)
  w = jnp.zeros((64, 64))

  def step(carry, _):
    w, state = carry
    loss, grad = jax.value_and_grad(
        lambda w: jnp.mean((a @ w - target) ** 2))(w)
    updates, state = tx.update(grad, state, w)
    return (optax.apply_updates(w, updates), state), loss

  (w, _), losses = jax.lax.scan(step, (w, tx.init(w)), None, length=2000)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.1 * losses[0]


def test_paper_transfer_that_provably_diverges_is_refused_at_init():
  tx = flora_jax.scale_by_flora_momentum(
      0.9, rule=_small(4), kappa=6, momentum_transfer='paper')
  with pytest.raises(ValueError, match=r"\['stacked'\].*kappa >= 7"):
    tx.init(_params())  # sqrt(16 / 4) 0.9^6 = 1.06
  flora_jax.scale_by_flora_momentum(  # sqrt(16 / 4) 0.9^7 = 0.96: fine
      0.9, rule=_small(4), kappa=7, momentum_transfer='paper').init(_params())
  with pytest.raises(ValueError, match='momentum_transfer'):
    flora_jax.scale_by_flora_momentum(rule=4, momentum_transfer='old')


def test_paper_transfer_keeps_direction_and_published_transfer_collapses():
  """Constant gradient 256 x 512, r = 16 (dim / r = 16).

  Our transfer down_new(up_old(C)) is unbiased: the transferred momentum grows
  by about sqrt(dim / r) (one more projection's noise) and still points along
  G. The published optax code's down_old(up_old(C)) multiplies C by
  Q_oldᵀ Q_old ≈ (dim / r) I and keeps it in the old subspace, so after the
  new projection it is noise: the norm jumps ~16x and the cosine drops to ~0.
  """
  b1, kappa, rank = 0.9, 20, 16
  g = jax.random.normal(jax.random.key(0), (256, 512))
  plan = _plan(g, '', rank=rank, **SMALL)
  key = keys.as_prng_key(1)
  steps = [g] * (2 * kappa)
  ours, our_norms = _reference_momentum(b1, kappa, key, plan, steps,
                                        nesterov=True)
  theirs, their_norms = _reference_momentum(b1, kappa, key, plan, steps,
                                            transfer='published', nesterov=True)
  # the library (nesterov output, paper transfer) equals the reference
  tx = flora_jax.scale_by_flora_momentum(b1, rule=_small(rank), kappa=kappa,
                                         key=1, nesterov=True,
                                         momentum_transfer='paper')
  state, update = tx.init(g), jax.jit(tx.update)
  for _t in range(2 * kappa):
    out, state = update(g, state)
  np.testing.assert_allclose(out, ours[-1], rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(out).max()))

  before, after = kappa - 1, kappa
  assert their_norms[after] / their_norms[before] > 12
  assert our_norms[after] / our_norms[before] < 5
  assert _cosine(theirs[after], g) < 0.01
  assert _cosine(ours[after], g) > 10 * _cosine(theirs[after], g)
  assert _cosine(ours[after], g) > 0.2 * _cosine(ours[before], g)
  window = slice(kappa, 2 * kappa)
  our_mean = np.mean([_cosine(o, g) for o in ours[window]])
  their_mean = np.mean([_cosine(o, g) for o in theirs[window]])
  assert our_mean > 3 * their_mean, (our_mean, their_mean)


# ------------------------------------------------------------- optimizer


def test_flora_under_inject_hyperparams_matches_the_plain_optimizer():
  params = _params()
  kwargs = dict(rank=4, kappa=2, min_dim=8, min_dim_size_to_factor=8)
  plain = flora_jax.flora(0.05, **kwargs)
  injected = optax.inject_hyperparams(
      flora_jax.flora,
      static_args=('rank', 'kappa', 'min_dim', 'max_aspect_ratio',
                   'min_dim_size_to_factor'),
  )(learning_rate=0.05, **kwargs)
  s_plain, s_inj = plain.init(params), injected.init(params)
  plain_update = jax.jit(plain.update)
  injected_update = jax.jit(injected.update)
  for t in range(4):
    u_plain, s_plain = plain_update(_grads(t), s_plain, params)
    u_inj, s_inj = injected_update(_grads(t), s_inj, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-7),
                 u_plain, u_inj)
  s_inj.hyperparams['learning_rate'] = jnp.asarray(0.0)
  u_zero, _ = injected_update(_grads(5), s_inj, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u_zero))


def _train(tx, loss, params, steps):
  """Final loss after ``steps`` full-batch steps, one compiled scan."""

  def step(carry, _):
    params, state = carry
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))
  (params, _), _ = run(params)
  return float(loss(params))


def _adafactor(lr, momentum):
  return optax.adafactor(lr, momentum=momentum, min_dim_size_to_factor=16,
                         multiply_by_parameter_scale=False)


@pytest.mark.slow
def test_flora_converges_on_least_squares():
  """Full-batch least squares, W: 64 x 96, noise floor 1e-4.

  Measured (this test's settings): Adafactor + momentum 7.6e-5, Flora r=32
  4.5e-4, r=16 6.4e-3 from an initial 1.05. The random projection's noise
  (a draw has norm sqrt(dim / r) |G|) costs precision that a decaying
  learning rate buys back as the rank grows.
  """
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (256, 64))
  w_true = jax.random.normal(k[1], (64, 96)) / 8
  y = x @ w_true + 0.01 * jax.random.normal(k[2], (256, 96))
  loss = lambda p: jnp.mean((x @ p['w'] - y) ** 2)
  params = {'w': jnp.zeros((64, 96))}
  initial = float(loss(params))
  lr = optax.cosine_decay_schedule(1e-2, 300)
  flora = {r: _train(flora_jax.flora(lr, rank=r, kappa=50, min_dim=16,
                                     min_dim_size_to_factor=16),
                     loss, params, 300)
           for r in (16, 32)}
  reference = _train(_adafactor(lr, 0.9), loss, params, 300)
  assert reference < 1e-4  # the noise floor: the problem is well posed
  assert flora[32] < 1e-3 * initial, flora
  assert flora[32] < 0.5 * flora[16], flora  # more rank, less noise
  assert flora[32] < 10 * reference, (flora, reference)


@pytest.mark.slow
def test_compressed_momentum_helps_a_small_mlp():
  """A 32-128-128-8 GELU MLP regressing a random teacher, 400 steps.

  Measured: Adafactor without momentum 1.01, Flora (kappa 100) r=16 1.06,
  r=32 0.13, r=64 0.041, Adafactor with full momentum 0.005 (initial 26.6).
  Compressed momentum recovers much of momentum's benefit, more with more
  rank; at r << dim it does not match a full momentum on this deterministic
  task.
  """
  k = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(k[0], (512, 32))
  teacher = jax.random.normal(k[1], (32, 64)) / 5
  y = jnp.sin(x @ teacher) @ jax.random.normal(k[2], (64, 8))

  def loss(p):
    h = jax.nn.gelu(x @ p['w1'] + p['b1'])
    h = jax.nn.gelu(h @ p['w2'] + p['b2'])
    return jnp.mean((h @ p['w3'] - y) ** 2)

  params = {'w1': jax.random.normal(k[3], (32, 128)) / 6, 'b1': jnp.zeros(128),
            'w2': jax.random.normal(k[4], (128, 128)) / 11,
            'b2': jnp.zeros(128), 'w3': jnp.zeros((128, 8))}
  plan = flora_jax.ProjectionRule(rank=16, min_dim=32).plan(params)
  assert plan['w2'].projected and plan['w1'].projected
  lr = 3e-3
  flora = {r: _train(flora_jax.flora(lr, rank=r, kappa=100, min_dim=32,
                                     min_dim_size_to_factor=16),
                     loss, params, 400)
           for r in (32, 64)}
  no_momentum = _train(_adafactor(lr, None), loss, params, 400)
  full_momentum = _train(_adafactor(lr, 0.9), loss, params, 400)
  assert full_momentum < flora[64] < flora[32] < 0.3 * no_momentum, (
      flora, no_momentum, full_momentum)
  assert flora[64] < 0.1 * no_momentum


def test_nnx_optimizer_with_a_path_mask():
  """nnx.Optimizer hands Variables to init and arrays to update: both must see
  the same leaf paths, or a path mask selects different leaves."""
  from flax import nnx

  model = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
  mask = flora_jax.path_mask(lambda path, _: path.endswith('kernel'))
  tx = flora_jax.flora(1e-2, rank=4, min_dim=8, projection_mask=mask)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  momentum = optimizer.opt_state[1].momentum
  assert momentum['kernel'].shape == (4, 16)
  assert momentum['bias'].shape == (16,)
  before = model.kernel.get_value()
  grads = nnx.grad(lambda m: (m(jnp.ones((2, 16))) ** 2).mean())(model)
  optimizer.update(model, grads)
  assert not np.allclose(model.kernel.get_value(), before)


# ----------------------------------------------- how projections are drawn


def test_a_tree_is_drawn_in_batches_equal_to_one_leaf_at_a_time():
  """`random_projectors` gives each leaf its own `random_projector`."""
  params = dict(_params(), square=jnp.zeros((2, 2, 16, 16)))
  plans = _small(4).plan(params)
  key = jax.random.key(5)
  for sketch in ('gaussian', 'rademacher'):
    drawn = jax.jit(lambda i, sketch=sketch: projections.random_projectors(
        key, plans, i, sketch))(3)
    for name, plan in plans.items():
      if not plan.projected:
        assert drawn[name] is None
        continue
      alone = projections.random_projector(key, plan, 3, sketch)
      np.testing.assert_allclose(drawn[name], alone, rtol=1e-6, atol=1e-7,
                                 err_msg=f'{name} {sketch}')


def test_the_update_draws_once_per_projector_shape_not_per_leaf():
  """The traced update holds one generator per shape, whatever the leaves.

  A generator per leaf is what made Flora's update compile 40x slower than
  AdamW's: the compiler's time grows with the generators it is given.
  """
  def generators(n_leaves, tx):
    params = {f'w{i}': jnp.zeros((16, 32)) for i in range(n_leaves)}
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params)
    return str(jaxpr).count('random_bits')

  for make in (lambda: flora_jax.flora(1e-3, rank=4, kappa=2, min_dim=8),
               lambda: flora_jax.flora(1e-3, rank=4, kappa=2, min_dim=8,
                                       store_projectors=True,
                                       refresh_schedule="staggered"),
               lambda: flora_jax.flora_compress(_small(4)),
               lambda: flora_jax.FloraMultiSteps(
                   optax.adam(1e-3), 2, _small(4)).gradient_transformation()):
    few, many = generators(2, make()), generators(7, make())
    assert few == many > 0, (few, many)


def test_rademacher_projections_are_unbiased_signs():
  plan = _small(8).leaf_plan('w', (40, 64))
  key = jax.random.key(0)
  q = projections.random_projector(key, plan, 0, 'rademacher')
  assert q.shape == (40, 8)
  np.testing.assert_array_equal(jnp.abs(q), jnp.float32(8 ** -0.5))
  mean_outer = jnp.mean(jnp.stack([
      (lambda q: q @ q.T)(projections.random_projector(
          key, plan, i, 'rademacher')) for i in range(400)]), axis=0)
  np.testing.assert_allclose(mean_outer, jnp.eye(40), atol=0.2)
  np.testing.assert_allclose(jnp.diag(mean_outer), 1.0, rtol=1e-6)  # exact


def test_a_state_keeps_the_sketch_it_was_compressed_with():
  params = _params()
  gaussian = flora_jax.flora(1e-3, rank=4, min_dim=8)
  rademacher = flora_jax.flora(1e-3, rank=4, min_dim=8, sketch='rademacher')
  # The default records nothing: states saved before the choice still load.
  assert 'sketch' not in ' '.join(map(str, jax.tree.leaves(
      gaussian.init(params), is_leaf=lambda x: isinstance(x, dict))))
  with pytest.raises(ValueError, match='sketch=rademacher in the state'):
    gaussian.update(_grads(0), rademacher.init(params), params)
  with pytest.raises(ValueError, match='sketch'):
    rademacher.update(_grads(0), gaussian.init(params), params)
  updates, _ = rademacher.update(_grads(0), rademacher.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# ----------------------------------------------------- stored projectors


def _run_momentum(tx, steps, params=None):
  """Outputs of ``steps`` updates, and the states from init on."""
  def grads(t):
    if params is None:
      return _grads(t)
    return jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(t), p.shape), params)

  state = tx.init(_params() if params is None else params)
  update = jax.jit(tx.update)
  outs, states = [], [state]
  for t in range(steps):
    out, state = update(grads(t), state)
    outs.append(out)
    states.append(state)
  return outs, states


@pytest.mark.parametrize(('transfer', 'nesterov', 'momentum_dtype'), [
    ('least_squares', False, None), ('paper', True, None),
    ('reset', False, None), ('least_squares', False, jnp.bfloat16)])
def test_stored_projectors_give_the_regenerated_updates_bit_for_bit(
    transfer, nesterov, momentum_dtype):
  kw = dict(rule=_small(4), kappa=3, key=7, momentum_transfer=transfer,
            nesterov=nesterov, momentum_dtype=momentum_dtype)
  regenerated, plain_states = _run_momentum(
      flora_jax.scale_by_flora_momentum(0.5, **kw), 8)
  stored, states = _run_momentum(
      flora_jax.scale_by_flora_momentum(0.5, store_projectors=True, **kw), 8)
  for t, (a, b) in enumerate(zip(regenerated, stored, strict=True)):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f'{name} {t}')
      np.testing.assert_array_equal(plain_states[t + 1].momentum[name],
                                    states[t + 1].momentum[name],
                                    err_msg=f'momentum {name} {t}')
  # The state holds the window's projector, and only projected leaves have
  # one.
  plans = _small(4).plan(_params())
  for t, state in enumerate(states):
    assert isinstance(state, flora_jax.FloraStoredMomentumState)
    assert isinstance(state.projectors['bias'], optax.MaskedNode)
    window = max(t - 1, 0) // 3
    for name in ('wide', 'tall', 'stacked'):
      np.testing.assert_array_equal(
          state.projectors[name],
          projections.random_projector(state.key, plans[name], window))


def _reference_staggered(b1, kappa, key, plan, grads, phase, slice_index,
                         transfer):
  """One slice of a staggered leaf, step by step: re-drawn at its phase."""
  def draw(index):
    q = projections.random_projector(key, plan, index)
    return q if slice_index is None else q[slice_index]

  q, c, outputs = draw(0), None, []
  for t, u in enumerate(grads):
    if c is None:
      c = jnp.zeros(projections.project_down(q, u, plan.side).shape)
    if t > 0 and (t - phase) % kappa == 0:
      q_new = draw(t)  # staggered slices draw with the step count
      c = _reference_transfer(transfer, q, q_new, c, plan.side)
      q = q_new
    c_new = b1 * c + (1 - b1) * projections.project_down(q, u, plan.side)
    outputs.append(b1 * projections.project_up(q, c, plan.side)
                   + (1 - b1) * u)
    c = c_new
  return outputs


@pytest.mark.parametrize('transfer', ['least_squares', 'paper', 'reset'])
def test_staggered_resamples_match_a_per_slice_reference(transfer):
  b1, kappa, steps = 0.5, 3, 8
  tx = flora_jax.scale_by_flora_momentum(
      b1, rule=_small(4), kappa=kappa, key=3, momentum_transfer=transfer,
      store_projectors=True, refresh_schedule='staggered')
  outs, states = _run_momentum(tx, steps)
  params = _params()
  plans = _small(4).plan(params)
  phases_seen = set()
  for name in ('wide', 'tall', 'stacked'):
    plan = plans[name]
    phases = np.asarray(keys.resample_phases(plan.path, plan.batch_shape,
                                             kappa)).reshape(-1)
    phases_seen.update(phases.tolist())
    for s, phase in enumerate(phases):
      index = s if plan.batch_shape else None
      pick = (lambda x, index=index: x if index is None else x[index])
      expected = _reference_staggered(
          b1, kappa, states[0].key, plan,
          [pick(_grads(t)[name]) for t in range(steps)], int(phase), index,
          transfer)
      for t in range(steps):
        np.testing.assert_allclose(pick(outs[t][name]), expected[t],
                                   rtol=1e-4, atol=1e-5,
                                   err_msg=f'{name}[{s}] step {t}')
  assert len(phases_seen) > 1  # the slices do resample at different steps


def test_staggered_resamples_every_slice_once_per_kappa_and_spread():
  kappa, layers = 16, 64
  params = {'stack': jnp.zeros((layers, 16, 16)), 'w': jnp.zeros((16, 16))}
  tx = flora_jax.scale_by_flora_momentum(
      0.9, rule=_small(4), kappa=kappa, store_projectors=True,
      refresh_schedule='staggered')
  _, states = _run_momentum(tx, 2 * kappa + 1, params)
  # (steps, slices): whether the update of that step re-drew that slice.
  changed = np.stack([
      np.concatenate([
          np.any(np.asarray(after.projectors[n] != before.projectors[n]),
                 axis=(-2, -1)).reshape(-1) for n in ('stack', 'w')])
      for before, after in zip(states[:-1], states[1:], strict=True)])
  # Each slice is re-drawn once in every window of kappa steps after the
  # first, at the same offset, ...
  np.testing.assert_array_equal(changed[1:kappa + 1].sum(0), 1)
  np.testing.assert_array_equal(changed[1:kappa + 1],
                                changed[kappa + 1:2 * kappa + 1])
  assert not changed[0].any()  # (step 0 uses the projectors of init)
  # ... and no step re-draws more than a small share of them (65 slices
  # over 16 steps: about 4 a step).
  assert changed.sum(1).max() <= (layers + 1) // 4, changed.sum(1)


def test_stored_projector_states_are_refused_by_other_settings():
  params = _params()
  stored = flora_jax.flora(1e-3, rank=4, min_dim=8, store_projectors=True)
  plain = flora_jax.flora(1e-3, rank=4, min_dim=8)
  staggered = flora_jax.flora(1e-3, rank=4, min_dim=8, store_projectors=True,
                              refresh_schedule='staggered')
  with pytest.raises(ValueError, match='made with store_projectors=True'):
    plain.update(_grads(0), stored.init(params), params)
  with pytest.raises(ValueError, match='refresh_schedule=staggered in the'):
    stored.update(_grads(0), staggered.init(params), params)
  with pytest.raises(ValueError, match='made with store_projectors=False'):
    stored.update(_grads(0), plain.init(params), params)


@pytest.mark.parametrize('make, error, match', [
    (lambda: flora_jax.flora(1e-3, refresh_schedule='staggered'), ValueError,
     'store_projectors=True'),
    (lambda: flora_jax.flora(1e-3, store_projectors=True,
                             refresh_schedule='random'), ValueError,
     'refresh_schedule'),
    (lambda: flora_jax.scale_by_flora_momentum(rule=4, store_projectors=1),
     TypeError, 'store_projectors'),
    (lambda: flora_jax.flora(1e-3, b1=None, store_projectors=True),
     ValueError, 'b1=None'),
])
def test_bad_storage_arguments_are_refused_at_construction(make, error,
                                                           match):
  with pytest.raises(error, match=match):
    make()
