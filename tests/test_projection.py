"""The shared projection core: leaf selection, sides, keys and projectors."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flora_jax import projections
from flora_jax._src import keys
import flora_jax
from flora_jax import ProjectionRule
from flora_jax.projections import LeafPlan


def _plans(rule, tree):
  return {p.path: p for p in jax.tree.leaves(rule.plan(tree))}


def test_selection_rules_follow_the_paper_defaults():
  tree = {
      'embed': jnp.zeros((32000, 512)),  # aspect 62.5: excluded
      'attn': jnp.zeros((512, 512)),
      'mlp': jnp.zeros((512, 1376)),  # aspect 2.7: projected
      'small': jnp.zeros((64, 512)),  # min dim 64 < 128
      'bias': jnp.zeros((512,)),
      'scalar': jnp.zeros(()),
  }
  plans = _plans(ProjectionRule(rank=128), tree)
  assert not plans["['embed']"].projected
  assert plans["['attn']"].projected
  assert plans["['mlp']"] == LeafPlan("['mlp']", (512, 1376), 'left', 128)
  assert not plans["['small']"].projected
  assert not plans["['bias']"].projected
  assert not plans["['scalar']"].projected
  no_aspect_limit = _plans(
      ProjectionRule(rank=128, max_aspect_ratio=None), tree)
  assert no_aspect_limit["['embed']"].projected


@pytest.mark.parametrize(
    'shape, side, expected_side, low_rank',
    [
        ((16, 32), 'auto', 'left', (4, 32)),
        ((32, 16), 'auto', 'right', (32, 4)),
        ((16, 16), 'auto', 'left', (4, 16)),  # tie: the input axis of (in, out)
        ((16, 32), 'right', 'right', (16, 4)),
        ((32, 16), 'left', 'left', (4, 16)),
        ((3, 5, 16, 32), 'auto', 'left', (3, 5, 4, 32)),  # stacked
    ],
)
def test_side_and_low_rank_shape(shape, side, expected_side, low_rank):
  plan = ProjectionRule(rank=4, side=side, min_dim=8).leaf_plan('w', shape)
  assert plan.side == expected_side
  assert plan.low_rank_shape == low_rank
  assert plan.projector_shape == shape[:-2] + (plan.dim, 4)


def test_rank_at_least_the_compressed_dim_leaves_the_leaf_exact():
  rule = ProjectionRule(rank=16, min_dim=1)
  assert not rule.leaf_plan('w', (16, 64)).projected  # would be 16 x 64 anyway
  assert rule.leaf_plan('w', (17, 64)).projected
  forced_right = ProjectionRule(rank=16, side='right', min_dim=1)
  assert not forced_right.leaf_plan('w', (64, 16)).projected


def test_masks_pytree_prefix_callable_and_path_mask():
  tree = {'enc': {'w': jnp.zeros((16, 16)), 'b': jnp.zeros(16)},
          'dec': {'w': jnp.zeros((16, 16))}}
  def projected(rule):
    return sorted(p for p, plan in _plans(rule, tree).items() if plan.projected)

  assert projected(ProjectionRule(4, min_dim=8)) == [
      "['dec']['w']", "['enc']['w']"]
  prefix = {'enc': False, 'dec': True}
  assert projected(ProjectionRule(4, min_dim=8, projection_mask=prefix)) == [
      "['dec']['w']"]
  as_callable = lambda t: {'enc': True, 'dec': False}
  assert projected(
      ProjectionRule(4, min_dim=8, projection_mask=as_callable)) == [
      "['enc']['w']"]
  by_path = flora_jax.path_mask(lambda path, x: path.startswith('dec/'))
  assert by_path(tree) == {'enc': {'w': False, 'b': False}, 'dec': {'w': True}}
  assert projected(ProjectionRule(4, min_dim=8, projection_mask=by_path)) == [
      "['dec']['w']"]


def test_a_mask_that_does_not_fit_is_refused():
  rule = ProjectionRule(4, min_dim=8,
                        projection_mask={'a': True, 'zzz': False})
  with pytest.raises(ValueError, match='mask'):
    rule.plan({'a': jnp.zeros((16, 16)), 'b': jnp.zeros((16, 16))})


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.complex64])
def test_non_real_float_projected_leaf_is_refused_with_its_path(dtype):
  rule = ProjectionRule(4, min_dim=8)
  message = r"\['layer'\]\['kernel'\].*real floating"
  with pytest.raises(TypeError, match=message):
    rule.plan({'layer': {'kernel': jnp.zeros((16, 16), dtype)}})
  # Not selected for projection: fine.
  rule.plan({'layer': {'step': jnp.zeros((), jnp.int32)}})


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(rank=0), ValueError),
        (dict(rank=-3), ValueError),
        (dict(rank=2.0), TypeError),
        (dict(rank=True), TypeError),
        (dict(rank=4, side='top'), ValueError),
        (dict(rank=4, min_dim=-1), ValueError),
        (dict(rank=4, max_aspect_ratio=0.5), ValueError),
    ],
)
def test_bad_rule_arguments(kwargs, error):
  with pytest.raises(error):
    ProjectionRule(**kwargs)


# ------------------------------------------------------------------ keys


def test_all_key_forms_give_the_same_typed_key():
  typed = keys.as_prng_key(7)
  assert jnp.issubdtype(typed.dtype, jax.dtypes.prng_key)
  for form in (jax.random.key(7), jax.random.PRNGKey(7), jnp.asarray(7)):
    np.testing.assert_array_equal(
        jax.random.key_data(keys.as_prng_key(form)),
        jax.random.key_data(typed),
    )


@pytest.mark.parametrize(
    'bad', [1.5, 'seed', None, True, jnp.zeros(3, jnp.uint32),
            jax.random.split(jax.random.key(0), 2),
            jnp.zeros((2,), jnp.float32)]
)
def test_invalid_keys_are_refused(bad):
  with pytest.raises((TypeError, ValueError), match='key'):
    keys.as_prng_key(bad)


def test_projection_keys_depend_on_path_and_index_only():
  key = jax.random.key(0)
  data = lambda k: tuple(np.asarray(jax.random.key_data(k)))
  a0 = data(projections.projection_key(key, "['a']", 0))
  assert a0 == data(projections.projection_key(key, "['a']", 0))
  assert a0 != data(projections.projection_key(key, "['a']", 1))
  assert a0 != data(projections.projection_key(key, "['b']", 0))
  # crc32, unlike hash(), is the same in every process and on every host.
  assert keys.path_id("['a']") == zlib.crc32(b"['a']")


# ------------------------------------------------------------ projectors


def _compress_decompress(key, g, plan):
  q = projections.gaussian_projector(key, plan)
  return projections.project_up(q, projections.project_down(q, g, plan.side),
                               plan.side)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _draws(g, seed, plan, n_draws):
  keys = jax.random.split(jax.random.key(seed), n_draws)
  return jax.vmap(lambda k: _compress_decompress(k, g, plan))(keys)


@pytest.mark.parametrize('shape', [(12, 40), (40, 12)])
def test_up_down_is_unbiased(shape):
  g = jax.random.normal(jax.random.key(1), shape)
  plan = ProjectionRule(rank=4, min_dim=1, max_aspect_ratio=None).leaf_plan(
      'g', shape)
  n_draws = 4000
  draws = np.asarray(_draws(g, 2, plan, n_draws), np.float64)
  standard_error = draws.std(axis=0) / np.sqrt(n_draws)
  z = np.abs(draws.mean(axis=0) - np.asarray(g)) / standard_error
  # 480 elements: a |z| above 5 has probability ~3e-4 in all.
  assert z.max() < 5.0, z.max()


def test_one_draw_inflates_the_norm_by_about_sqrt_dim_over_rank():
  dim, rank = 256, 8
  g = jax.random.normal(jax.random.key(3), (dim, 2 * dim))
  plan = ProjectionRule(rank=rank, min_dim=1).leaf_plan('g', g.shape)
  draws = _draws(g, 4, plan, 64)
  ratios = jnp.linalg.norm(draws, axis=(1, 2)) / jnp.linalg.norm(g)
  # E|QQᵀG|² = (1 + (dim + 1) / r) |G|² for N(0, 1/r) entries.
  expected = np.sqrt(1 + (dim + 1) / rank)
  np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(ratios**2))), expected,
                             rtol=0.05)
  assert 0.95 < float(jnp.mean(ratios)) / np.sqrt(dim / rank) < 1.1


def test_stacked_slices_get_independent_projectors_and_batched_maps():
  plan = ProjectionRule(rank=3, min_dim=1).leaf_plan('w', (4, 8, 10))
  q = projections.gaussian_projector(jax.random.key(0), plan)
  assert q.shape == (4, 8, 3)
  assert not np.allclose(q[0], q[1])
  x = jax.random.normal(jax.random.key(1), (4, 8, 10))
  down = projections.project_down(q, x, 'left')
  up = projections.project_up(q, down, 'left')
  for i in range(4):
    np.testing.assert_allclose(down[i], q[i].T @ x[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(up[i], q[i] @ (q[i].T @ x[i]), rtol=1e-5,
                               atol=1e-5)
  q_right = jax.random.normal(jax.random.key(2), (4, 10, 3))
  np.testing.assert_allclose(
      projections.project_up(q_right,
                            projections.project_down(q_right, x, 'right'),
                            'right')[2],
      x[2] @ q_right[2] @ q_right[2].T, rtol=1e-5, atol=1e-5)


def test_state_bytes_counts_arrays_and_keys():
  tree = {'a': jnp.zeros((3, 4), jnp.float32), 'b': jnp.zeros(5, jnp.bfloat16),
          'k': jax.random.key(0), 'n': jnp.zeros([], jnp.int32)}
  assert flora_jax.memory.state_bytes(tree) == 48 + 10 + 8 + 4
  assert flora_jax.memory.state_bytes(jax.eval_shape(lambda: tree)) == 70
