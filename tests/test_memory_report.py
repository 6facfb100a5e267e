"""`flora_jax.memory_report` and the warning when little is projected.

The report must name, for every leaf, the reason a transform keeps it
full-size, and its bytes must be the state's own: they are checked against
`jax.eval_shape(tx.init, ...)` and against the sizes the formulas give.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import memory


def _shapes(**leaves):
  return {name: jax.ShapeDtypeStruct(shape, dtype)
          for name, (shape, dtype) in leaves.items()}


F32 = jnp.float32

# One leaf per reason a matrix is left full-size, plus one projected leaf.
PARAMS = _shapes(
    vector=((256,), F32),
    small=((64, 96), F32),          # smaller side < min_dim 128
    elongated=((128, 1024), F32),   # aspect ratio 8 > 4
    masked=((256, 256), F32),       # projection_mask False
    narrow=((128, 512), F32),       # rank 160 >= its compressed side 128
    kernel=((256, 512), F32),       # projected, side 'left', rank 160
)
MASK = {name: name != 'masked' for name in PARAMS}


def _by_path(report):
  return {leaf.path.strip("[]'"): leaf for leaf in report.leaves}


def test_every_reason_is_named_and_the_projected_leaf_has_its_plan():
  tx = flora_jax.flora(1e-3, rank=160, projection_mask=MASK)
  leaves = _by_path(flora_jax.memory_report(tx, PARAMS))
  assert leaves['vector'].reason == 'not a matrix: ndim 1'
  assert leaves['small'].reason.startswith('too small: smaller side 64')
  assert leaves['elongated'].reason.startswith('too elongated: aspect ratio 8')
  assert leaves['masked'].reason.startswith('masked out')
  assert leaves['narrow'].reason.startswith('rank not below the dimension')
  kernel = leaves['kernel']
  assert kernel.projected and kernel.reason is None
  assert (kernel.plan.side, kernel.plan.rank) == ('left', 160)
  # Compressed momentum r x n plus Adafactor's row and column statistics
  # (and optax's one-element placeholder of the unfactored moment).
  assert kernel.state_bytes == 4 * (160 * 512 + 256 + 512 + 1)
  assert kernel.adamw_bytes == 2 * 4 * 256 * 512
  # A leaf kept full-size keeps a full momentum.
  assert leaves['masked'].state_bytes == 4 * (256 * 256 + 256 + 256 + 1)


def test_not_a_float_and_not_under_a_projecting_transform():
  params = _shapes(kernel=((256, 256), F32), steps=((4,), jnp.int32),
                   other=((256, 256), F32))
  tx = optax.chain(
      optax.masked(flora_jax.flora_compress(32),
                   {'kernel': True, 'steps': True, 'other': False}),
      optax.sgd(0.1),
  )
  leaves = _by_path(flora_jax.memory_report(tx, params))
  assert leaves['kernel'].projected
  assert leaves['steps'].reason == 'not a float: int32'
  assert leaves['other'].reason == 'not under a projecting transform'


def test_galore_names_a_leaf_whose_projection_would_not_save():
  params = _shapes(square=((256, 256), F32), kernel=((256, 1024), F32))
  leaves = _by_path(flora_jax.memory_report(
      flora_jax.galore(1e-3, rank=200), params))
  assert leaves['square'].reason.startswith('no saving')
  assert leaves['kernel'].projected
  # The projector (256 x 200) and Adam's moments of the 200 x 1024 shape.
  assert leaves['kernel'].state_bytes == 4 * (256 * 200 + 2 * 200 * 1024)


TRANSFORMS = {
    'flora': lambda: flora_jax.flora(1e-3, rank=32),
    'flora bf16': lambda: flora_jax.flora(1e-3, rank=32,
                                          momentum_dtype=jnp.bfloat16),
    'galore': lambda: flora_jax.galore(1e-3, rank=32),
    'fira': lambda: flora_jax.fira(1e-3, rank=32),
    'FloraMultiSteps(flora)': lambda: flora_jax.FloraMultiSteps(
        flora_jax.flora(1e-3, rank=32), 4, 32),
    'compress + adamw': lambda: optax.chain(
        flora_jax.flora_compress(32), optax.adamw(1e-3)),
    'adamw': lambda: optax.adamw(1e-3),
    'partition': lambda: optax.partition(
        {'low': flora_jax.galore(1e-3, rank=32), 'full': optax.adam(1e-3)},
        {'embed': 'full', 'layers': 'low', 'norm': 'full'}),
}
MODEL = {
    'embed': jax.ShapeDtypeStruct((1000, 128), F32),
    'layers': [{'w': jax.ShapeDtypeStruct((128, 384), F32),
                'v': jax.ShapeDtypeStruct((3, 384, 128), jnp.bfloat16)}
               for _ in range(2)],
    'norm': jax.ShapeDtypeStruct((128,), F32),
}


@pytest.mark.parametrize('name', TRANSFORMS)
def test_totals_are_the_state_bytes_and_adamw_is_two_moments(name):
  tx = TRANSFORMS[name]()
  report = flora_jax.memory_report(tx, MODEL)
  assert report.state_bytes == memory.state_bytes(
      jax.eval_shape(tx.init, MODEL))
  assert report.adamw_state_bytes == memory.state_bytes(
      jax.eval_shape(optax.adamw(1e-3).init, MODEL))
  for leaf, param in zip(report.leaves, jax.tree.leaves(MODEL), strict=True):
    assert leaf.shape == param.shape and leaf.dtype == param.dtype
    assert leaf.adamw_bytes == 2 * math.prod(param.shape) * param.dtype.itemsize
    assert leaf.projected == (leaf.reason is None)
  assert str(report).count('\n') == len(report.leaves) + 3  # head, rule, sum


def test_stacked_and_partitioned_leaves_are_planned_per_slice():
  report = flora_jax.memory_report(TRANSFORMS['partition'](), MODEL)
  leaves = {leaf.path: leaf for leaf in report.leaves}
  stacked = leaves["['layers'][0]['v']"]
  assert stacked.projected and stacked.plan.rank == 32
  # Three slices, each a 128 x 32 projector and Adam's 32 x 384 moments.
  assert stacked.state_bytes == 3 * 4 * (128 * 32 + 2 * 32 * 384)
  assert leaves["['embed']"].reason == 'not under a projecting transform'
  assert report.projected_fraction == pytest.approx(
      2 * (128 * 384 + 3 * 384 * 128) / sum(
          math.prod(x.shape) for x in jax.tree.leaves(MODEL)))


def test_real_arrays_and_nnx_variables_are_accepted():
  nnx = pytest.importorskip('flax.nnx')
  params = {'w': nnx.Param(jnp.zeros((256, 256))), 'b': jnp.zeros(256)}
  report = flora_jax.memory_report(flora_jax.flora(1e-3, rank=16), params)
  assert [leaf.projected for leaf in report.leaves] == [False, True]


def _init_warnings(tx, params, times=1):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for _ in range(times):
      tx.init(params)
  return [w for w in caught if w.category is memory.LowCompressionWarning]


@pytest.mark.parametrize('make', [
    lambda: flora_jax.flora(1e-3, rank=32),
    lambda: flora_jax.galore(1e-3, rank=32),
    lambda: flora_jax.fira(1e-3, rank=32),
    lambda: flora_jax.FloraMultiSteps(optax.sgd(1.0), 2, 32),
    lambda: flora_jax.flora_compress(32),
])
def test_init_warns_once_when_nothing_is_projected(make):
  params = {'table': jnp.zeros((1000, 128)), 'w': jnp.zeros((64, 64))}
  tx = make()
  caught = _init_warnings(tx, params, times=3)
  assert len(caught) == 1
  message = str(caught[0].message)
  assert 'projects none' in message
  assert 'too elongated (1 leaf, 128,000 values)' in message
  assert 'too small (1 leaf, 4,096 values)' in message


def test_init_warns_below_the_stated_fraction_only():
  projected = 256 * 256
  total = int(1.05 * projected / memory.MIN_PROJECTED_FRACTION)
  tx = flora_jax.flora(1e-3, rank=32)
  few = {'w': jnp.zeros((256, 256)), 'b': jnp.zeros(total - projected)}
  enough = {'w': jnp.zeros((256, 256)), 'b': jnp.zeros(3 * projected)}
  share = f'only {100 * projected / total:.1f}% of the parameter values'
  assert share in str(_init_warnings(tx, few)[0].message)
  assert not _init_warnings(flora_jax.flora(1e-3, rank=32), enough)


def test_the_report_itself_does_not_warn():
  params = {'w': jnp.zeros((64, 64))}
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    report = flora_jax.memory_report(flora_jax.flora(1e-3, rank=8), params)
  assert report.projected_fraction == 0.0
  assert np.isclose(report.state_bytes / report.adamw_state_bytes,
                    report.state_bytes / (2 * 4 * 64 * 64 + 4))


def test_a_second_report_on_the_same_transform_is_the_same():
  """`jax.eval_shape` caches traces: the plans must be recorded anyway."""
  params = {'w': jax.ShapeDtypeStruct((256, 512), jnp.float32)}
  tx = flora_jax.galore(1e-3, rank=8)
  first, second = (flora_jax.memory_report(tx, params) for _ in range(2))
  assert first.leaves[0].projected and second.leaves[0].projected
  assert first.table() == second.table()
