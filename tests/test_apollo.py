"""APOLLO and APOLLO-Mini: the paper's equations and the published code.

The oracle is the official PyTorch package `apollo-torch` (test-only, like
galore-torch; `.ci/run` installs it). Its projections are seeded its own
way, so it is fed ours: the patched projector returns, for each matrix and
each window, the Gaussian projector flora_jax regenerates from its key.
Layouts as in ``test_galore_oracles``: the oracle sees (out, in) weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import projections
import test_galore_oracles as galore_oracles

RANK = galore_oracles.RANK
GAP = galore_oracles.GAP
LR = galore_oracles.LR
EPS = galore_oracles.EPS
WEIGHT_DECAY = galore_oracles.WEIGHT_DECAY
OURS = dict(rank=RANK, update_proj_gap=GAP, eps=EPS,
            weight_decay=WEIGHT_DECAY, min_dim=0, max_aspect_ratio=None)


def _our_projector(name, index, rank):
  """Q (dim, r) that flora_jax draws for ``name`` in window ``index``."""
  plans = flora_jax.ProjectionRule(
      rank, min_dim=0, max_aspect_ratio=None).plan(
          galore_oracles._flax_params())
  key = jax.random.key(0)
  return np.asarray(projections.random_projector(key, plans[name], index))


@pytest.fixture
def torch_apollo(monkeypatch):
  torch = pytest.importorskip('torch')
  apollo_torch = pytest.importorskip('apollo_torch')
  from apollo_torch import random_projector

  # The oracle's weights are (out, in): its shape names our matrix.
  names = {(40, 24): 'up', (24, 40): 'down', (32, 32): 'square'}
  windows = {}

  def ours(self, weights, rank, type, seed):
    del self, seed
    name = names[tuple(weights.shape)]
    index = windows.get(name, 0)
    windows[name] = index + 1
    q = torch.tensor(_our_projector(name, index, rank))
    # Its 'left' projector P (out, r) is applied as Pᵀ G, its 'right' one
    # P (r, in) as G Pᵀ: in our (in, out) layout both are Q.
    return q if type == 'left' else q.t().contiguous()

  monkeypatch.setattr(random_projector.GradientProjector,
                      'get_orthogonal_matrix', ours)
  return torch, apollo_torch.APOLLOAdamW


@pytest.mark.oracle
@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_apollo_matches_official_apollo_torch(torch_apollo, granularity):
  torch, cls = torch_apollo
  scale = 1.0 if granularity == 'channel' else math.sqrt(128.0)
  theirs = galore_oracles._run_torch(torch, cls, {
      'proj': 'random', 'scale': scale ** 2, 'scale_type': granularity})
  ours = galore_oracles._run_flax(
      flora_jax.apollo(LR, scale=scale, granularity=granularity, **OURS))
  galore_oracles._assert_close_deltas(ours, theirs, rtol=1e-5)


@pytest.mark.oracle
def test_apollo_mini_matches_official_apollo_torch(torch_apollo):
  """The paper's APOLLO-Mini: rank 1, one scale per matrix, scale 128."""
  torch, cls = torch_apollo
  theirs = galore_oracles._run_torch(torch, cls, {
      'proj': 'random', 'rank': 1, 'scale': 128, 'scale_type': 'tensor'})
  ours = galore_oracles._run_flax(flora_jax.apollo_mini(
      LR, **{k: v for k, v in OURS.items() if k != 'rank'}))
  galore_oracles._assert_close_deltas(ours, theirs, rtol=1e-5)


@pytest.mark.oracle
def test_apollo_mini_oracle_comparison_is_sensitive(torch_apollo):
  """The same oracle tells APOLLO-Mini's tensor scale from the channel one."""
  torch, cls = torch_apollo
  theirs = galore_oracles._run_torch(torch, cls, {
      'proj': 'random', 'scale': 1.0, 'scale_type': 'tensor'})
  ours = galore_oracles._run_flax(flora_jax.apollo(LR, **OURS))
  with pytest.raises(AssertionError):
    galore_oracles._assert_close_deltas(ours, theirs, rtol=1e-2)


# ------------------------------------------- the paper's equations, by hand


def _reference_apollo(params, grads_seq, *, rank, gap, scale, granularity,
                      lr, eps, b1=0.9, b2=0.999, growth_limit=1.01):
  """Algorithm 1 of the paper with the code's Adam, in float64 numpy.

  Every leaf here is projected, stacked leaves slice by slice.
  """
  rule = flora_jax.ProjectionRule(rank, min_dim=0, max_aspect_ratio=None)
  plans = rule.plan(params)
  key = jax.random.key(0)
  state = {name: dict(m=0.0, v=0.0, norm=np.inf) for name in params}
  outputs = []
  for t, grads in enumerate(grads_seq):
    out = {}
    for name, g in grads.items():
      plan, s = plans[name], state[name]
      q = np.asarray(projections.random_projector(key, plan, t // gap),
                     np.float64)
      g = np.asarray(g, np.float64)
      left = plan.side == 'left'
      r = np.swapaxes(q, -1, -2) @ g if left else g @ q
      s['m'] = b1 * s['m'] + (1 - b1) * r
      s['v'] = b2 * s['v'] + (1 - b2) * r * r
      n = s['m'] / (np.sqrt(s['v']) + eps)
      axes = ((-2 if left else -1,) if granularity == 'channel'
              else (-2, -1))
      ratio = (np.linalg.norm(n, axis=axes, keepdims=True)
               / (np.sqrt(np.sum(r * r, axis=axes, keepdims=True)) + 1e-8))
      scaled = ratio * g
      norm = np.sqrt(np.sum(scaled ** 2, axis=(-2, -1)))
      shrink = np.maximum(norm / (growth_limit * (s['norm'] + 1e-8)), 1.0)
      s['norm'] = norm / shrink
      scaled = scaled / shrink[..., None, None]
      correction = math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
      out[name] = -lr * correction * scale * scaled
    outputs.append(out)
  return outputs


def _stacked_problem(steps=6):
  keys = jax.random.split(jax.random.key(3), 3)
  params = {'stack': jax.random.normal(keys[0], (3, 12, 20)),
            'tall': jax.random.normal(keys[1], (20, 8))}

  def grads(t):
    return {name: jax.random.normal(jax.random.fold_in(keys[2], 10 * t + i),
                                    p.shape) * (1 + 3 * (t == 3))
            for i, (name, p) in enumerate(sorted(params.items()))}

  return params, [grads(t) for t in range(steps)]


@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_apollo_follows_the_papers_equations(granularity):
  """Stacked slices each with their own scale and limiter; windows of 2.

  The gradient jumps 4x at step 3, so the limiter acts.
  """
  params, grads_seq = _stacked_problem()
  settings = dict(rank=4, gap=2, scale=1.5, granularity=granularity,
                  lr=1e-2, eps=1e-6)
  expected = _reference_apollo(params, grads_seq, **settings)
  tx = flora_jax.apollo(
      settings['lr'], rank=4, update_proj_gap=2, scale=1.5, eps=1e-6,
      granularity=granularity, min_dim=0, max_aspect_ratio=None)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t, grads in enumerate(grads_seq):
    updates, state = step(grads, state, params)
    for name in params:
      np.testing.assert_allclose(updates[name], expected[t][name],
                                 rtol=2e-5, atol=1e-9, err_msg=f'{name} {t}')
  assert np.all(np.isfinite(state[0].residual_norms['stack']))
  assert state[0].residual_norms['stack'].shape == (3,)


def test_apollo_limiter_bounds_each_slices_growth():
  """Per stacked slice, ``||lim(S ⊙ G)||`` grows at most 1.01x a step.

  Unlimited, the same gradients make some slice grow faster; until the
  first such step both runs agree.
  """
  params, grads_seq = _stacked_problem()
  norms = {}
  for limit in (1.01, None):
    tx = flora_jax.scale_by_apollo(
        rule=flora_jax.ProjectionRule(4, min_dim=0, max_aspect_ratio=None),
        update_proj_gap=2, growth_limit=limit)
    state = tx.init(params)
    step = jax.jit(tx.update)
    per_step = []
    for grads in grads_seq:
      updates, state = step(grads, state, params)
      per_step.append(np.linalg.norm(
          np.asarray(updates['stack']).reshape(3, -1), axis=1))
    norms[limit] = np.stack(per_step)
  growth = {k: v[1:] / v[:-1] for k, v in norms.items()}
  assert np.all(growth[1.01] <= 1.01 * (1 + 1e-5))
  first = np.argmax(np.any(growth[None] > 1.01, axis=1))
  assert np.any(growth[None][first] > 1.01)
  np.testing.assert_allclose(norms[1.01][:first + 1], norms[None][:first + 1],
                             rtol=1e-6)
  assert not np.allclose(norms[1.01][first + 1], norms[None][first + 1])


def test_apollo_state_holds_no_projector_and_low_rank_moments():
  params = {'w': jnp.zeros((256, 512)), 'b': jnp.zeros(512)}
  for tx, rank in ((flora_jax.apollo(1e-2, rank=64), 64),
                   (flora_jax.apollo_mini(1e-2), 1)):
    state = jax.eval_shape(tx.init, params)
    subspace_state = state[0]
    assert isinstance(subspace_state.projectors['w'], optax.MaskedNode)
    adam = subspace_state.inner_state
    assert adam.mu['w'].shape == (rank, 512)
    assert adam.nu['w'].shape == (rank, 512)
    assert adam.mu['b'].shape == (512,)
  apollo_bytes = flora_jax.memory.state_bytes(
      jax.eval_shape(flora_jax.apollo(1e-2, rank=64).init, params))
  galore_bytes = flora_jax.memory.state_bytes(
      jax.eval_shape(flora_jax.galore(1e-2, rank=64).init, params))
  # GaLore also stores its 256 x 64 projector; APOLLO regenerates its own
  # and keeps one limiter norm.
  assert galore_bytes - apollo_bytes == 256 * 64 * 4 - 4


def test_apollo_state_is_refused_by_a_fira_with_random_projector():
  """Same state structure, another algorithm: the settings tell them apart."""
  params = {'w': jnp.ones((32, 48))}
  grads = {'w': jnp.ones((32, 48))}
  apollo = flora_jax.scale_by_apollo(rule=flora_jax.ProjectionRule(
      4, min_dim=0))
  fira = flora_jax.scale_by_fira(
      flora_jax.scale_by_adam_hf(correct_bias=False),
      flora_jax.ProjectionRule(4, min_dim=0), projector='random')
  state = apollo.init(params)
  def arrays(state):
    return jax.tree.structure(state._replace(settings=None))

  assert arrays(state) == arrays(fira.init(params))
  with pytest.raises(ValueError, match='apollo'):
    fira.update(grads, state, params)
  mini = flora_jax.scale_by_apollo(
      rule=flora_jax.ProjectionRule(4, min_dim=0), granularity='tensor')
  with pytest.raises(ValueError, match='apollo'):
    mini.update(grads, state, params)


@pytest.mark.parametrize('kwargs, match', [
    (dict(granularity='row'), 'granularity'),
    (dict(growth_limit=0.5), 'growth_limit'),
    (dict(scale=-1.0), 'scale'),
    (dict(update_proj_gap=0), 'update_proj_gap'),
])
def test_apollo_refuses_bad_settings_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    flora_jax.apollo(1e-2, **kwargs)
