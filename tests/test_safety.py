"""Nothing silently wrong: settings recorded in states, checked inputs.

Regression tests for misuse that used to load, run or train without
complaint and give a different algorithm, NaNs or an obscure error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flora_jax
from flora_jax._src import adam_hf

RULE = flora_jax.ProjectionRule(4, min_dim=8)
PARAMS = {'w': jnp.ones((16, 32)), 'b': jnp.ones((32,))}


def _grads(step):
  key = jax.random.fold_in(jax.random.key(0), step)
  return jax.tree.map(lambda p: jax.random.normal(key, p.shape), PARAMS)


def _run(tx, state, steps, start=0):
  update = jax.jit(tx.update)
  for t in range(start, start + steps):
    updates, state = update(_grads(t), state, PARAMS)
  return updates, state


# ------------------------------------------- settings recorded in the state

RECONFIGURED = {
    'flora kappa': (
        lambda: flora_jax.flora(1e-2, 4, kappa=3, min_dim=8),
        lambda: flora_jax.flora(1e-2, 4, kappa=5, min_dim=8), 'kappa=3'),
    'flora transfer': (
        lambda: flora_jax.flora(1e-2, 4, kappa=3, min_dim=8),
        lambda: flora_jax.flora(1e-2, 4, kappa=3, min_dim=8,
                                momentum_transfer='reset'),
        'momentum_transfer=least_squares'),
    'galore gap': (
        lambda: flora_jax.galore(1e-2, 4, update_proj_gap=3, min_dim=8),
        lambda: flora_jax.galore(1e-2, 4, update_proj_gap=4, min_dim=8),
        'update_proj_gap=3'),
    'fira projector': (
        lambda: flora_jax.fira(1e-2, 4, projector='svd', min_dim=8),
        lambda: flora_jax.fira(1e-2, 4, projector='randomized', min_dim=8),
        'projector=svd'),
    'compress kappa': (
        lambda: flora_jax.flora_compress(RULE, kappa=2),
        lambda: flora_jax.flora_compress(RULE, kappa=7), 'kappa=2'),
    'multisteps k': (
        lambda: flora_jax.FloraMultiSteps(
            optax.sgd(0.1), 2, RULE).gradient_transformation(),
        lambda: flora_jax.FloraMultiSteps(
            optax.sgd(0.1), 3, RULE).gradient_transformation(),
        'every_k_schedule=2'),
}


@pytest.mark.parametrize('case', sorted(RECONFIGURED))
def test_a_state_refuses_a_differently_configured_transform(case, tmp_path):
  """Restoring into other settings loaded silently (cosine 0.32 / 0.05)."""
  make_old, make_new, old_setting = RECONFIGURED[case]
  old, new = make_old(), make_new()
  _, state = _run(old, old.init(PARAMS), 2)
  # The transform itself refuses, naming the setting...
  with pytest.raises(ValueError, match=old_setting):
    new.update(_grads(2), state, PARAMS)
  # ...and so does orbax, restoring into the new transform's state.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', state)
  target = jax.eval_shape(new.init, PARAMS)
  with ocp.StandardCheckpointer() as checkpointer, pytest.raises(
      ValueError, match=f'(?s)(mismatch|do not match).*{old_setting}'):
    checkpointer.restore(tmp_path / 'state', target)
  # The old settings restore and continue exactly.
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'state',
                                    jax.eval_shape(old.init, PARAMS))
  expected, _ = _run(old, state, 1, start=2)
  got, _ = _run(old, restored, 1, start=2)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_adopt_settings_changes_them_deliberately():
  old = flora_jax.flora(1e-2, 4, kappa=3, min_dim=8)
  new = flora_jax.flora(1e-2, 4, kappa=5, min_dim=8)
  _, state = _run(old, old.init(PARAMS), 4)
  adopted = flora_jax.adopt_settings(state, new.init(PARAMS))
  updates, _ = _run(new, adopted, 1, start=4)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # The arrays carried over; only the settings changed.
  for a, b in zip(jax.tree.leaves(adopted[1].momentum),
                  jax.tree.leaves(state[1].momentum), strict=True):
    np.testing.assert_array_equal(a, b)
  other_rank = flora_jax.flora(1e-2, 8, kappa=5, min_dim=8)
  with pytest.raises(ValueError, match=r"momentum\['w'\].*shape"):
    flora_jax.adopt_settings(state, other_rank.init(PARAMS))


def test_momentum_refuses_a_leaf_resized_along_its_compressed_axis():
  """40 x 48 after 32 x 48 kept a (4, 48) momentum and mixed it in."""
  tx = flora_jax.scale_by_flora_momentum(rule=RULE)
  state = tx.init({'w': jnp.ones((32, 48))})
  with pytest.raises(ValueError, match='parameters differ'):
    tx.update({'w': jnp.ones((40, 48))}, state)


@pytest.mark.parametrize('make', [
    lambda: flora_jax.galore(1e-2, 4, min_dim=8),
    lambda: flora_jax.fira(1e-2, 4, min_dim=8, projector='random'),
])
def test_galore_and_fira_name_a_transposed_leaf(make):
  """A transposed leaf failed with a raw broadcasting error."""
  tx = make()
  state = tx.init({'w': jnp.ones((16, 32))})
  transposed = {'w': jnp.ones((32, 16))}
  with pytest.raises(ValueError, match=r"\['w'\]"):
    tx.update(transposed, state, transposed)


# ------------------------------------------------------ schedules, counts


def test_multisteps_schedule_below_one():
  """A schedule returning 0 gave NaN updates, -1 gradient ascent."""
  with pytest.raises(ValueError, match=r'every_k_schedule\(0\) = 0'):
    flora_jax.FloraMultiSteps(optax.sgd(1.0), lambda c: 0, RULE).init(PARAMS)
  # Below 1 at a later cycle (where only jit sees it) counts as 1.
  for bad in (0, -1):
    tx = flora_jax.FloraMultiSteps(
        optax.sgd(1.0), lambda c, bad=bad: jnp.where(c == 0, 1, bad), RULE)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    _, state = update(_grads(0), state, PARAMS)
    out, state = update(_grads(1), state, PARAMS)
    np.testing.assert_allclose(out['b'], -_grads(1)['b'], rtol=1e-6)
    assert bool(tx.has_updated(state))


def test_hf_bias_correction_survives_the_saturated_step_count():
  """count + 1 overflowed int32 at 2**31 - 1 and made the factor NaN."""
  factor = adam_hf.hf_bias_correction(0.9, 0.999)(
      jnp.array(2**31 - 1, jnp.int32))
  np.testing.assert_allclose(factor, 1.0)
  tx = flora_jax.galore(1e-2, 4, min_dim=8)
  state = jax.tree.map(
      lambda x: jnp.full_like(x, 2**31 - 1)
      if getattr(x, 'dtype', None) == jnp.int32 else x,
      tx.init(PARAMS))
  updates, state = jax.jit(tx.update)(_grads(0), state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# ----------------------------------------------------------- bad inputs


def test_an_array_rank_is_a_static_int():
  """rank=jnp.array(4) failed at the first jitted update."""
  rule = flora_jax.ProjectionRule(jnp.array(4), min_dim=jnp.array(8))
  assert type(rule.rank) is int and type(rule.min_dim) is int
  tx = flora_jax.flora(1e-2, rank=jnp.array(4), min_dim=8)
  _run(tx, tx.init(PARAMS), 1)
  with pytest.raises(TypeError, match='rank'):
    flora_jax.ProjectionRule(jnp.array([4]))


def test_the_flora_chain_names_a_missing_leaf():
  """It failed inside optax: 'different numbers of pytree children'."""
  tx = flora_jax.flora(1e-2, 4, min_dim=8)
  with pytest.raises(ValueError, match=r"missing leaves \[\"\['b'\]\"\]"):
    tx.update({'w': PARAMS['w']}, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize('make', [
    lambda: flora_jax.flora(1e-2, 4, min_dim=8),
    lambda: flora_jax.galore(1e-2, 4, min_dim=8),
    lambda: flora_jax.fira(1e-2, 4, min_dim=8),
    lambda: flora_jax.scale_by_flora_momentum(rule=RULE),
    lambda: flora_jax.FloraMultiSteps(optax.adam(1e-2), 1, RULE),
])
def test_a_python_float_leaf_is_an_array(make):
  """It failed with "'float' object has no attribute 'shape'"."""
  tx = make()
  params = {'w': jnp.ones((16, 32)), 'scale': 1.0}
  grads = {'w': jnp.ones((16, 32)), 'scale': jnp.float32(0.5)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params),
                                  jax.tree.map(jnp.asarray, params))
  assert bool(jnp.isfinite(updates['scale'])) and updates['scale'] != 0


@pytest.mark.parametrize(('make', 'error', 'match'), [
    (lambda: flora_jax.flora(1e-2, key=2**70), ValueError, 'key'),
    (lambda: flora_jax.flora('x'), TypeError, 'learning_rate'),
    (lambda: flora_jax.flora(float('nan')), ValueError, 'learning_rate'),
    (lambda: flora_jax.galore(-1e-3), ValueError, 'learning_rate'),
    (lambda: flora_jax.fira(jnp.array(float('nan'))), ValueError,
     'learning_rate'),
    (lambda: flora_jax.galore(1e-3, scale=float('nan')), ValueError, 'scale'),
    (lambda: flora_jax.flora(1e-3, eps=-1.0), ValueError, 'eps'),
    (lambda: flora_jax.galore(1e-3, eps=-1e-6), ValueError, 'eps'),
    (lambda: flora_jax.flora(1e-3, decay_rate=-0.8), ValueError, 'decay_rate'),
    (lambda: flora_jax.scale_by_adam_hf(eps=float('inf')), ValueError, 'eps'),
    (lambda: flora_jax.flora(1e-3, weight_decay=-0.1), ValueError,
     'weight_decay'),
    (lambda: flora_jax.lora_plus('x', ratio=16.0), TypeError,
     'learning_rate'),
    (lambda: flora_jax.lora_plus(1e-3, ratio=16.0, weight_decay=float('nan')),
     ValueError, 'weight_decay'),
])
def test_bad_arguments_name_themselves(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_learning_rates_that_are_fine():
  for lr in (0.0, 1e-3, jnp.array(1e-3), np.float32(1e-3),
             optax.cosine_decay_schedule(1e-3, 10)):
    flora_jax.galore(lr)
    flora_jax.flora(lr)
  injected = optax.inject_hyperparams(flora_jax.flora, static_args=(
      'rank', 'kappa', 'min_dim', 'max_aspect_ratio',
      'min_dim_size_to_factor'))(learning_rate=1e-2, rank=4, min_dim=8)
  _run(injected, injected.init(PARAMS), 1)


# ------------------------------------------ projection only where it pays


@pytest.mark.parametrize(('shape', 'rank', 'side'), [
    ((256, 256), 200, 'auto'),  # was 117% of AdamW's state
    ((296, 3), 2, 'left'),  # was 646%
])
def test_galore_never_holds_more_state_than_adamw(shape, rank, side):
  params = {'w': jnp.zeros(shape)}
  size = lambda tx: flora_jax.memory.state_bytes(  # noqa: E731
      jax.eval_shape(tx.init, params))
  for make in (flora_jax.galore, flora_jax.fira):
    tx = make(1e-3, rank, side=side, min_dim=0, max_aspect_ratio=None)
    assert size(tx) <= size(optax.adamw(1e-3)) + 64  # counters, key
