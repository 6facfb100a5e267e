"""The public surface: what `import flora_jax` offers, without flax, and the
0.1 spellings that still work for one release."""

import importlib.metadata
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax

SUPPORTED = {
    # optimizers and transforms
    'flora', 'galore', 'fira', 'apollo', 'apollo_mini', 'lora_plus',
    'flora_compress', 'scale_by_flora_momentum', 'FloraMultiSteps',
    'scale_by_galore', 'scale_by_fira', 'scale_by_apollo',
    'limit_norm_growth', 'scale_by_adam_hf',
    'stochastic_rounding', 'quantize_state',
    # their states
    'FloraCompressState', 'FloraMomentumState', 'FloraStoredMomentumState',
    'FloraMultiStepsState',
    'GaLoreState', 'LimitNormGrowthState', 'StochasticRoundingState',
    'QuantizedState',
    # options
    'ProjectionRule', 'DimensionNumbers', 'FiraResidual', 'path_mask',
    'path_dimension_numbers', 'adopt_settings',
    # memory, and the train step that updates inside the backward pass
    'memory_report', 'fused_train_step',
    # sharding
    'state_shardings', 'state_partition_specs', 'apply_shardings',
    # namespaces
    'projections', 'memory', 'nnx',
}


def test_dir_shows_exactly_the_supported_names():
  assert set(dir(flora_jax)) == SUPPORTED
  assert set(flora_jax.__all__) == SUPPORTED - {'nnx'}  # star import: no flax


def test_every_public_name_is_documented():
  namespaces = [flora_jax, flora_jax.projections, flora_jax.memory,
                flora_jax.nnx]
  for namespace in namespaces:
    assert namespace.__doc__
    for name in namespace.__all__:
      obj = getattr(namespace, name)
      assert obj.__doc__ and obj.__doc__.strip(), f'{namespace.__name__}.{name}'


def test_one_version_string():
  assert flora_jax.__version__ == importlib.metadata.version('flora_jax')


def _run_without_flax(code: str) -> str:
  """Runs ``code`` in a fresh interpreter where `import flax` fails."""
  script = 'import sys\nsys.modules["flax"] = None\n' + textwrap.dedent(code)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_the_optax_transforms_work_without_flax():
  out = _run_without_flax('''
      import jax, jax.numpy as jnp, optax
      import flora_jax
      params = {'w': jnp.ones((16, 32)), 'b': jnp.ones(32)}
      rule = flora_jax.ProjectionRule(4, min_dim=8)
      for tx in [flora_jax.flora(1e-2, rank=4, min_dim=8),
                 flora_jax.galore(1e-2, rank=4, min_dim=8),
                 flora_jax.fira(1e-2, rank=4, min_dim=8),
                 flora_jax.FloraMultiSteps(optax.adam(1e-2), 2, rule),
                 flora_jax.lora_plus(1e-2, trainable=lambda p, x: True)]:
        if tx is not None and not isinstance(tx, optax.GradientTransformation):
          tx = tx.gradient_transformation()
        try:
          state = tx.init(params)
        except ValueError as error:  # lora_plus: no LoRA factor here
          assert 'LoRA factor' in str(error)
          continue
        updates, _ = jax.jit(tx.update)(params, state, params)
        leaves = jax.tree.leaves(updates)
        assert all(bool(jnp.isfinite(u).all()) for u in leaves)
      mesh = jax.make_mesh((1,), ('data',))
      specs = flora_jax.state_partition_specs(
          flora_jax.flora(1e-2, rank=4, min_dim=8), params, mesh=mesh)
      print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))
      try:
        import flora_jax.nnx
      except ImportError as error:
        print(error)
  ''')
  lines = out.strip().splitlines()
  assert lines[0] == "['flax']"  # only the blocked entry: nothing imported it
  assert 'pip install "flora_jax[nnx]"' in lines[1]


# ------------------------------------------------- deprecated spellings


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {'wide': jax.random.normal(keys[0], (16, 32)),
          'tall': jax.random.normal(keys[1], (32, 16)),
          'bias': jax.random.normal(keys[2], (32,))}


MASK = {'wide': True, 'tall': False, 'bias': False}


def _updates(tx, steps=2):
  params = _params()
  state = tx.init(params)
  outs = []
  for t in range(steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), params)
    updates, state = tx.update(grads, state, params)
    outs.append(updates)
  return outs


def _assert_same(old, new):
  for a, b in zip(_updates(old), _updates(new), strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


RULE = flora_jax.ProjectionRule(4, min_dim=8, projection_mask=MASK)


@pytest.mark.parametrize('old, new', [
    (lambda: flora_jax.flora_compress(4, kappa=1, min_dim=8, mask=MASK),
     lambda: flora_jax.flora_compress(RULE, kappa=1)),
    (lambda: flora_jax.scale_by_flora_momentum(
        0.9, rank=4, kappa=1, min_dim=8, mask=MASK),
     lambda: flora_jax.scale_by_flora_momentum(0.9, rule=RULE, kappa=1)),
    (lambda: flora_jax.FloraMultiSteps(
        optax.sgd(1.0), 1, rank=4, min_dim=8, mask=MASK
    ).gradient_transformation(),
     lambda: flora_jax.FloraMultiSteps(
         optax.sgd(1.0), 1, RULE).gradient_transformation()),
    (lambda: flora_jax.scale_by_galore(
        optax.scale_by_adam(), 4, min_dim=8, mask=MASK),
     lambda: flora_jax.scale_by_galore(optax.scale_by_adam(), RULE)),
    (lambda: flora_jax.scale_by_galore(
        optax.scale_by_adam(), rank=4, min_dim=8, mask=MASK),
     lambda: flora_jax.scale_by_galore(optax.scale_by_adam(), RULE)),
    (lambda: flora_jax.scale_by_fira(
        optax.scale_by_adam(), flora_jax.ProjectionRule(4), min_dim=8,
        mask=MASK),
     lambda: flora_jax.scale_by_fira(optax.scale_by_adam(), RULE)),
    (lambda: flora_jax.flora(1e-2, rank=4, min_dim=8, mask=MASK),
     lambda: flora_jax.flora(1e-2, rank=4, min_dim=8, projection_mask=MASK)),
    (lambda: flora_jax.galore(1e-2, rank=4, min_dim=8, mask=MASK),
     lambda: flora_jax.galore(1e-2, rank=4, min_dim=8, projection_mask=MASK)),
    (lambda: flora_jax.fira(1e-2, rank=4, min_dim=8, mask=MASK),
     lambda: flora_jax.fira(1e-2, rank=4, min_dim=8, projection_mask=MASK)),
    (lambda: flora_jax.scale_by_galore(
        optax.identity(), flora_jax.ProjectionRule(4, min_dim=8, mask=MASK)),
     lambda: flora_jax.scale_by_galore(optax.identity(), RULE)),
    (lambda: flora_jax.limit_norm_growth(max_growth=1.05),
     lambda: flora_jax.limit_norm_growth(growth_limit=1.05)),
], ids=['flora_compress', 'flora_momentum', 'multisteps', 'galore_rank',
        'galore_rank_keyword', 'fira_rule_plus_flat', 'flora_mask',
        'galore_mask', 'fira_mask', 'rule_mask', 'limiter'])
def test_old_spellings_warn_and_build_the_same_transform(old, new):
  with pytest.warns(DeprecationWarning) as caught:
    old_tx = old()
  assert any(__file__ == w.filename for w in caught)  # points at the caller
  _assert_same(old_tx, new())


def test_old_and_new_spelling_together_are_refused():
  with pytest.raises(TypeError, match='projection_mask'):
    flora_jax.galore(1e-2, projection_mask=MASK, mask=MASK)
  with (pytest.raises(ValueError, match='projection_mask or mask'),
        pytest.warns(DeprecationWarning)):
    flora_jax.ProjectionRule(4, projection_mask=MASK, mask=MASK)


@pytest.mark.parametrize('name, namespace', [
    ('project_down', 'projections'), ('LeafPlan', 'projections'),
    ('state_bytes', 'memory'), ('add_lora', 'nnx'), ('lora_ga_init', 'nnx'),
    ('is_bias_or_norm', 'nnx'),
])
def test_moved_names_still_resolve_with_a_warning(name, namespace):
  with pytest.warns(DeprecationWarning, match=f'flora_jax.{namespace}.{name}'):
    old = getattr(flora_jax, name)
  assert old is getattr(getattr(flora_jax, namespace), name)


def test_unknown_names_are_attribute_errors():
  with pytest.raises(AttributeError, match='no_such_thing'):
    flora_jax.no_such_thing  # noqa: B018


def test_lora_ga_scale_is_now_factor_scale():
  from flax import nnx

  def model():
    m = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    flora_jax.nnx.add_lora(m, 'layers/0', rank=2, rngs=nnx.Rngs(1))
    return m

  loss = lambda m, x: jnp.mean((m(x) - 1.0) ** 2)
  old, new = model(), model()
  with pytest.warns(DeprecationWarning, match='factor_scale'):
    flora_jax.nnx.lora_ga_init(old, loss, [jnp.ones((4, 8))], scale='unit')
  flora_jax.nnx.lora_ga_init(new, loss, [jnp.ones((4, 8))],
                             factor_scale='unit')
  jax.tree.map(np.testing.assert_array_equal, nnx.state(old), nnx.state(new))
