"""Property-based: every projecting transform on arbitrary trees.

Over leaf shapes (matrices, stacked matrices, vectors, scalars), dtypes,
ranks, sides and projection masks: no crash, finite updates with the
parameters' shapes and dtypes, and never more state than the same optimizer
without projection.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import flora_jax

# Derandomized: the same examples in every run, so CI is reproducible.
PROPERTY = settings(max_examples=6, deadline=None, derandomize=True,
                    database=None)

SHAPES = st.one_of(
    st.tuples(st.integers(2, 24), st.integers(2, 24)),
    st.tuples(st.integers(1, 3), st.integers(2, 16), st.integers(2, 16)),
    st.tuples(st.integers(1, 24)),
    st.just(()),
)


@st.composite
def trees(draw):
  """A dict of 1-4 leaves, float32 or bfloat16, and a mask over it."""
  shapes = draw(st.lists(SHAPES, min_size=1, max_size=4))
  dtypes = draw(st.lists(st.sampled_from([jnp.float32, jnp.bfloat16]),
                         min_size=len(shapes), max_size=len(shapes)))
  params = {
      f'p{i}': jnp.asarray(
          np.random.default_rng(i).standard_normal(shape), dtype)
      for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
  }
  mask = {name: draw(st.booleans()) for name in params}
  return params, mask


RULES = st.builds(
    flora_jax.ProjectionRule,
    rank=st.integers(1, 20),
    side=st.sampled_from(['auto', 'larger', 'left', 'right']),
    min_dim=st.integers(0, 4),
    max_aspect_ratio=st.sampled_from([None, 4.0]),
)


def _with_mask(rule, mask):
  return flora_jax.ProjectionRule(rule.rank, rule.side, rule.min_dim,
                                  rule.max_aspect_ratio, mask)


def _nothing_projected(rule):
  return flora_jax.ProjectionRule(rule.rank, min_dim=10**9)


TRANSFORMS = {
    'flora_compress': lambda rule: flora_jax.flora_compress(rule, kappa=2),
    'scale_by_flora_momentum': lambda rule: flora_jax.scale_by_flora_momentum(
        0.9, rule=rule, kappa=2),
    'FloraMultiSteps': lambda rule: flora_jax.FloraMultiSteps(
        optax.adam(1e-2), 2, rule).gradient_transformation(),
    'galore svd': lambda rule: flora_jax.scale_by_galore(
        optax.scale_by_adam(), rule, update_proj_gap=2),
    'galore randomized': lambda rule: flora_jax.scale_by_galore(
        optax.scale_by_lion(), rule, update_proj_gap=2,
        projector='randomized'),
    'galore random': lambda rule: flora_jax.scale_by_galore(
        optax.trace(0.9), rule, update_proj_gap=2, projector='random',
        transfer_moments=True),
    'galore factored': lambda rule: flora_jax.scale_by_galore(
        optax.scale_by_factored_rms(min_dim_size_to_factor=2), rule),
    'fira': lambda rule: flora_jax.scale_by_fira(
        flora_jax.scale_by_adam_hf(), rule, update_proj_gap=2),
    'fira random sgd': lambda rule: flora_jax.scale_by_fira(
        optax.identity(), rule, projector='random'),
}


def _state_bytes(tx, params):
  return flora_jax.memory.state_bytes(jax.eval_shape(tx.init, params))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TRANSFORMS))
@PROPERTY
@given(tree=trees(), rule=RULES)
def test_any_tree_gives_finite_updates_and_no_more_state(name, tree, rule):
  params, mask = tree
  make = TRANSFORMS[name]
  tx = make(_with_mask(rule, mask))
  state = tx.init(params)
  for step in range(3):  # crosses a refresh / resample (gap, kappa 2)
    grads = jax.tree.map(
        lambda p, step=step: (p * (step + 1) + 0.5).astype(p.dtype), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    for path, u in jax.tree.leaves_with_path(updates):
      p = params[path[0].key]
      assert u.shape == p.shape and u.dtype == p.dtype, path
      assert bool(jnp.all(jnp.isfinite(u))), (path, step)
  assert _state_bytes(tx, params) <= _state_bytes(
      make(_nothing_projected(rule)), params)
