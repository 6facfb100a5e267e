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
from flora_jax._src.projection import MatrixAxes

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
    'apollo': lambda rule: flora_jax.scale_by_apollo(rule=rule,
                                                     update_proj_gap=2),
    'apollo tensor lion': lambda rule: flora_jax.scale_by_apollo(
        optax.scale_by_lion(), rule, update_proj_gap=2,
        granularity='tensor'),
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


@st.composite
def matrix_layouts(draw):
  """A shape of 2-4 axes and dimension numbers: some axes as rows, some as
  columns (each in any order), the rest stacked."""
  shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))
  axes = draw(st.permutations(range(len(shape))))
  n_rows = draw(st.integers(1, len(shape) - 1))
  n_columns = draw(st.integers(1, len(shape) - n_rows))
  rows, columns = axes[:n_rows], axes[n_rows:n_rows + n_columns]
  return shape, flora_jax.DimensionNumbers(tuple(rows), tuple(columns))


@PROPERTY
@given(layout=matrix_layouts())
def test_matrix_view_keeps_every_entry_of_each_stacked_matrix(layout):
  """The view is a bijection, and each stacked slice holds exactly the
  entries of the leaf at that index of the stacked axes."""
  shape, numbers = layout
  # Projected or not (sizes here are tiny), the view is the same.
  plan = flora_jax.projections.LeafPlan(
      'w', shape, axes=MatrixAxes.resolve(numbers, 'w', shape))
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  view = plan.matrix_shape
  rows, columns = (np.atleast_1d(a) for a in numbers)
  stacked = [a for a in range(len(shape)) if a not in {*rows, *columns}]
  assert view == (*(shape[a] for a in stacked),
                  np.prod([shape[a] for a in rows]),
                  np.prod([shape[a] for a in columns]))
  matrices = plan.to_matrix(x)
  assert matrices.shape == view
  np.testing.assert_array_equal(plan.from_matrix(matrices), x)
  # Each entry's coordinates in the leaf: a row fixes the row axes, in the
  # order given (the first varies slowest), a column the column axes, a
  # slice the stacked axes.
  coords = np.unravel_index(np.asarray(matrices).astype(int), shape)
  for a in stacked:
    assert np.all(coords[a] == coords[a][..., :1, :1])
  for side, along in ((rows, -1), (columns, -2)):
    picked = np.stack([np.take(coords[a], [0], axis=along) for a in side])
    assert np.all(np.stack([coords[a] for a in side]) == picked)
    first = np.stack([coords[a] for a in side]).reshape(len(side), -1)
    order = [tuple(c) for c in first.T]
    expected = list(np.ndindex(*(shape[a] for a in side)))
    seen = list(dict.fromkeys(order))
    assert seen == expected
