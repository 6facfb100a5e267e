"""Dimension numbers: projecting matrices that are not the last two axes.

A MaxText-style tree puts the layer axis at position 1 (``[embed, L, mlp]``)
and keeps attention kernels 3-D/4-D (``[embed, L, heads, head_dim]``). Each
transform must project, per layer, the matrix its `DimensionNumbers` name,
exactly as it projects the same matrices laid out ``(L, m, n)`` by the
default rule; the updates keep the leaf's layout.
"""

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import flora_jax
from flora_jax import DimensionNumbers

E, L, H, D, M = 32, 3, 4, 8, 48
RANK = 4

# MaxText's layouts and where their matrices are.
NUMBERS = {
    'query': DimensionNumbers(reduction_axis=0, output_axis=(2, 3)),
    'out': DimensionNumbers(reduction_axis=(0, 2), output_axis=3),
    'wi': optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=2),
    'scale': None,
}


def _maxtext_tree(seed):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {
      'query': normal(E, L, H, D),  # [embed, layers, heads, head_dim]
      'out': normal(H, L, D, E),  # [heads, layers, head_dim, embed]
      'wi': normal(E, L, M),  # [embed, layers, mlp]
      'scale': normal(E, L),  # norm scales: never projected
  }


# The same matrices, laid out (L, m, n): what the default rule projects.
TO_STACKED = {
    'query': lambda x: jnp.transpose(x, (1, 0, 2, 3)).reshape(L, E, H * D),
    'out': lambda x: jnp.transpose(x, (1, 0, 2, 3)).reshape(L, H * D, E),
    'wi': lambda x: jnp.transpose(x, (1, 0, 2)),
    'scale': lambda x: x,
}
FROM_STACKED = {
    'query': lambda y: jnp.transpose(y.reshape(L, E, H, D), (1, 0, 2, 3)),
    'out': lambda y: jnp.transpose(y.reshape(L, H, D, E), (1, 0, 2, 3)),
    'wi': lambda y: jnp.transpose(y, (1, 0, 2)),
    'scale': lambda y: y,
}


def _stacked(tree):
  return {name: TO_STACKED[name](x) for name, x in tree.items()}


def _rule(numbers):
  return flora_jax.ProjectionRule(RANK, min_dim=16, max_aspect_ratio=None,
                                  dimension_numbers=numbers)


TRANSFORMS = {
    'flora_compress': lambda rule: flora_jax.flora_compress(rule, kappa=2),
    'flora_momentum': lambda rule: flora_jax.scale_by_flora_momentum(
        rule=rule, kappa=2),
    'flora_accumulation': lambda rule: flora_jax.FloraMultiSteps(
        optax.adam(1e-2), 2, rule=rule).gradient_transformation(),
    'galore': lambda rule: flora_jax.scale_by_galore(
        optax.scale_by_adam(), rule, update_proj_gap=2),
    'galore_randomized_staggered': lambda rule: flora_jax.scale_by_galore(
        optax.scale_by_adam(), rule, update_proj_gap=2,
        projector='randomized', refresh_schedule='staggered'),
    'fira': lambda rule: flora_jax.scale_by_fira(
        optax.scale_by_adam(), rule, update_proj_gap=2),
    'apollo': lambda rule: flora_jax.scale_by_apollo(rule=rule,
                                                     update_proj_gap=2),
    'apollo_mini': lambda rule: flora_jax.scale_by_apollo(
        rule=rule, update_proj_gap=2, granularity='tensor', scale=11.3),
}


def _run(tx, params, steps=5):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outputs = []
  for t in range(steps):
    grads = jax.tree.map(lambda g, t=t: g * (1 + t) + t, _maxtext_tree(7 + t))
    if jax.tree.structure(params) == jax.tree.structure(grads) and (
        params['query'].ndim == 3):
      grads = _stacked(grads)
    updates, state = step(grads, state, params)
    outputs.append(updates)
  return outputs, state


@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_each_layer_is_projected_like_its_stacked_matrix(name):
  """Over refreshes/resamples, equal to the (L, m, n) layout's updates."""
  make = TRANSFORMS[name]
  params = _maxtext_tree(0)
  ours, state = _run(make(_rule(NUMBERS)), params)
  reference, reference_state = _run(make(_rule(None)), _stacked(params))
  for t, (a, b) in enumerate(zip(ours, reference, strict=True)):
    for leaf in params:
      assert a[leaf].shape == params[leaf].shape
      expected = FROM_STACKED[leaf](b[leaf])
      scale = float(jnp.max(jnp.abs(expected))) or 1.0
      np.testing.assert_allclose(a[leaf] / scale, expected / scale,
                                 atol=2e-5, err_msg=f'{leaf} step {t}')
  # The states are as small (full-size inner states keep the leaf's layout).
  assert [np.size(x) for x in jax.tree.leaves(state)] == [
      np.size(x) for x in jax.tree.leaves(reference_state)]


def test_galore_projects_each_layer_like_the_lone_matrix():
  """A fitted projector depends on the gradient only: one layer's update is
  GaLore's on that layer's 2-D matrix alone."""
  params = _maxtext_tree(0)
  grads = _maxtext_tree(1)
  tx = flora_jax.scale_by_galore(optax.scale_by_adam(), _rule(NUMBERS))
  updates, _ = tx.update(grads, tx.init(params), params)
  lone = flora_jax.scale_by_galore(optax.scale_by_adam(), _rule(None))
  for layer in range(L):
    matrices = {name: TO_STACKED[name](g)[layer]
                for name, g in grads.items() if name != 'scale'}
    expected, _ = lone.update(matrices, lone.init(matrices))
    for name, matrix_update in expected.items():
      ours = TO_STACKED[name](updates[name])[layer]
      np.testing.assert_allclose(ours, matrix_update, rtol=1e-5, atol=1e-7)


def test_memory_report_lists_each_kernel_as_projected_per_layer():
  params = _maxtext_tree(0)
  report = flora_jax.memory_report(
      flora_jax.galore(1e-2, rank=RANK, min_dim=16, max_aspect_ratio=None,
                       dimension_numbers=NUMBERS), params)
  by_path = {leaf.path: leaf for leaf in report.leaves}
  expected = {'query': (L, E, H * D), 'out': (L, H * D, E), 'wi': (L, E, M)}
  for name, matrix_shape in expected.items():
    leaf = next(v for k, v in by_path.items() if name in k)
    assert leaf.projected, leaf
    assert leaf.plan.matrix_shape == matrix_shape
    assert str(matrix_shape) in report.table()
  scale = next(v for k, v in by_path.items() if 'scale' in k)
  assert not scale.projected


def test_default_rule_projects_the_wrong_axes_of_a_maxtext_tree():
  """Why dimension numbers exist: the last two axes are not the matrix."""
  plans = _rule(None).plan(_maxtext_tree(0))
  assert plans['query'].matrix_shape[-2:] == (H, D)  # heads x head_dim
  assert plans['wi'].batch_shape == (E,)  # 32 'layers' of (L, mlp)
  assert not plans['wi'].projected or plans['wi'].dim != E


def test_default_dimension_numbers_change_nothing():
  """``DimensionNumbers(-2, -1)`` is the default rule: same plans, same
  settings record, so that states and checkpoints are interchangeable."""
  params = {'w': jnp.zeros((2, 32, 48)), 'b': jnp.zeros(48)}
  explicit = {'w': DimensionNumbers(-2, -1), 'b': None}
  plain = _rule(None).plan(params)
  given = _rule(explicit).plan(params)
  assert plain == given
  tx = flora_jax.scale_by_flora_momentum(rule=_rule(None))
  tx_given = flora_jax.scale_by_flora_momentum(rule=_rule(explicit))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
      tx_given.init(params))


def test_a_state_made_with_other_dimension_numbers_is_refused():
  """Same state shapes (square matrices), other axes: the settings say so."""
  params = {'w': jnp.ones((32, L, 32))}
  grads = {'w': jnp.ones((32, L, 32))}
  first = flora_jax.scale_by_flora_momentum(
      rule=_rule({'w': DimensionNumbers(0, 2)}))
  other = flora_jax.scale_by_flora_momentum(
      rule=_rule({'w': DimensionNumbers(2, 0)}))
  with pytest.raises(ValueError, match='settings'):
    other.update(grads, first.init(params), params)


@pytest.mark.parametrize('numbers, error, match', [
    ({'b': None, 'w': DimensionNumbers(0, 3)}, ValueError,
     r"\['w'\].*output_axis=3"),
    ({'b': None, 'w': DimensionNumbers(0, (1, 0))}, ValueError,
     r"\['w'\].*twice"),
    ({'b': None, 'w': DimensionNumbers(0, ())}, ValueError,
     r"\['w'\].*non-empty"),
    ({'b': None, 'w': DimensionNumbers(0, 'x')}, TypeError,
     r"\['w'\].*int"),
    ({'b': None, 'w': DimensionNumbers(True, 2)}, TypeError,
     r"\['w'\].*int"),
    ({'b': None, 'w': (0, 1)}, ValueError, 'dimension_numbers'),
    (DimensionNumbers(0, 3), ValueError, r"\['w'\].*output_axis=3"),
    ({'v': None}, ValueError, 'structure'),
])
def test_bad_dimension_numbers_are_refused_at_init(numbers, error, match):
  params = {'w': jnp.zeros((16, 4, 32)), 'b': jnp.zeros(32)}
  tx = flora_jax.flora(1e-3, rank=2, min_dim=0, dimension_numbers=numbers)
  with pytest.raises(error, match=match):
    tx.init(params)


def test_path_dimension_numbers_and_a_callable_agree():
  params = _maxtext_tree(0)
  by_path = flora_jax.path_dimension_numbers(
      lambda path, leaf: NUMBERS[path])
  assert _rule(by_path).plan(params) == _rule(NUMBERS).plan(params)
  assert _rule(lambda tree: NUMBERS).plan(params) == _rule(NUMBERS).plan(
      params)
  # A function of (path, leaf) directly, as in `path_dimension_numbers`.
  assert _rule(lambda path, leaf: NUMBERS[path]).plan(params) == _rule(
      NUMBERS).plan(params)


def test_one_dimension_numbers_apply_to_every_matrix():
  """As optax's GaLore takes them: vectors are never matrices, whether the
  numbers are one for all, a prefix over a layer, or a function's."""
  params = {'a': jnp.zeros((32, 2, 48)), 'b': jnp.zeros((48, 2, 32)),
            'v': jnp.zeros(48)}
  numbers = DimensionNumbers(0, 2)
  for given in (numbers, lambda tree: numbers,
                lambda tree, unused=None: numbers):
    plans = _rule(given).plan(params)
    assert plans['a'].matrix_shape == (2, 32, 48)
    assert plans['b'].matrix_shape == (2, 48, 32)
    assert plans['v'].reason.startswith('not a matrix')
  # The rule's one DimensionNumbers holds for a single leaf too.
  assert _rule(numbers).leaf_plan('w', (32, 2, 48)).matrix_shape == (2, 32,
                                                                     48)
  with pytest.raises(TypeError):  # keyword-only: not mask's position
    flora_jax.ProjectionRule(4, 'auto', 16, None, None, None, numbers)


def test_state_shardings_keep_the_matrix_view_after_a_memory_report():
  """Both trace `init`; the second trace must still see the plans."""
  mesh = jax.make_mesh((1,), ('model',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  params = {'w': jax.ShapeDtypeStruct((64, 2, 128), jnp.float32)}
  specs = {'w': P(None, None, 'model')}
  tx = flora_jax.galore(1e-3, rank=8, min_dim=16,
                        dimension_numbers={'w': DimensionNumbers(0, 2)})
  flora_jax.memory_report(tx, params)
  for _ in range(2):
    state_specs = flora_jax.state_partition_specs(tx, params, specs,
                                                  mesh=mesh)
    # mu is (2, 8, 128): (layers, r, out), out sharded like the kernel's.
    assert state_specs[0].inner_state.mu['w'] == P(None, None, 'model')
