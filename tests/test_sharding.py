"""Optimizer states on an 8-device mesh: shardings, equality with one device,
communication of the Flora update, nnx.Optimizer, orbax resume.

Needs 8 devices, which on a CPU means starting Python with
``--xla_force_host_platform_device_count=8`` in XLA_FLAGS, in a process of
its own (without it these tests skip); `.ci/run` runs:

  XLA_FLAGS="--xla_force_host_platform_device_count=8 \
      --xla_cpu_enable_concurrency_optimized_scheduler=false" \
      python -m pytest -p no:xdist tests/test_sharding.py

The second flag lets a GaLore refresh stay a real `lax.cond` on simulated
devices (see `flora_jax._src.compat.cond`); without it the refresh is computed
at every step and selected, which the last test checks.

The shapes are the smallest that keep every axis divisible by the mesh axes
(2 x 4 and 4 x 2) and the projected ones above the projection threshold, and
each program is compiled once: one module-scoped run per (transform, axis
type) serves the equality, layout, communication, orbax and scheduler tests
(8 simulated devices on a busy 2-core machine otherwise take minutes).
"""

import os
import re
from typing import Any, NamedTuple

from flax import nnx
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flora_jax
from flora_jax._src import compat
from flora_jax._src import subspace

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason='needs 8 (simulated) devices'
)

RANK = 5  # divides neither mesh axis: the rank axis must stay replicated
SPECS = {
    'wide': P('data', 'model'),
    'stack': P(None, 'data', 'model'),  # scan-over-layers kernels (L, m, n)
    'bias': P('model'),
    'adapter': {'lora_a': P('data'), 'lora_b': P(None, 'model')},
}
AXIS_TYPES = pytest.mark.parametrize(
    'axis_type', [AxisType.Auto, AxisType.Explicit], ids=['auto', 'explicit'])


def _tree(seed, scale=1.0):
  """numpy, so that building the trees compiles nothing."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {
      'wide': normal(16, 32) * scale,
      'stack': normal(2, 16, 24) * scale,
      'bias': normal(32),
      # Too thin to project: every transform keeps it as it is.
      'adapter': {'lora_a': normal(16, 8) * scale,
                  'lora_b': normal(8, 32) * scale},
  }


STEPS = 3  # a resample / refresh / accumulation cycle ends at step 2
PARAMS = _tree(0, scale=1 / 4)
GRADS = [_tree(1 + t) for t in range(STEPS)]


def _mesh(axis_type=AxisType.Auto, shape=(2, 4)):
  return jax.make_mesh(shape, ('data', 'model'), axis_types=(axis_type,) * 2)


def _put(tree, mesh):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, SPECS)


PROJECTION = dict(min_dim=16)
RULE = flora_jax.ProjectionRule(RANK, **PROJECTION)
TRANSFORMS = {
    'flora_compress': lambda: optax.chain(
        flora_jax.flora_compress(RULE, kappa=2),
        optax.adam(1e-2)),
    'flora_momentum': lambda: optax.chain(
        flora_jax.scale_by_flora_momentum(0.9, rule=RULE, kappa=2),
        optax.scale_by_learning_rate(1e-2)),
    'flora_multisteps': lambda: flora_jax.FloraMultiSteps(
        optax.adam(1e-2), 2, RULE).gradient_transformation(),
    'flora': lambda: flora_jax.flora(1e-2, rank=RANK, kappa=2,
                                     min_dim_size_to_factor=16, **PROJECTION),
    # Stored projectors, each slice re-drawn at its own step.
    'flora_staggered': lambda: flora_jax.flora(
        1e-2, rank=RANK, kappa=2, min_dim_size_to_factor=16,
        store_projectors=True, refresh_schedule='staggered', **PROJECTION),
    'galore': lambda: flora_jax.galore(1e-2, RANK, update_proj_gap=2,
                                       **PROJECTION),
    'fira': lambda: flora_jax.fira(1e-2, RANK, update_proj_gap=2, **PROJECTION),
    # The refits spread over the mesh: with sketches (keys), and staggered
    # (the first fit spread, later ones where they are) moving moments.
    'fira_randomized': lambda: flora_jax.fira(
        1e-2, RANK, update_proj_gap=2, projector='randomized', **PROJECTION),
    'galore_staggered': lambda: flora_jax.galore(
        1e-2, RANK, update_proj_gap=2, refresh_schedule='staggered',
        transfer_moments=True, **PROJECTION),
    'limit_norm_growth': lambda: optax.chain(
        optax.scale_by_adam(), flora_jax.limit_norm_growth(1.01),
        optax.scale_by_learning_rate(1e-2)),
    'lora_plus': lambda: flora_jax.lora_plus(1e-2, weight_decay=0.01,
                                             max_grad_norm=1.0),
    # Blocks of 2: whole blocks in every shard, so the layout is kept.
    'adam_8bit': lambda: flora_jax.quantize_state(
        optax.adam(1e-2), block_size=2, min_size=256),
}


def _step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  return jax.jit(step)


class _Run(NamedTuple):
  """A jitted step and everything it saw: params[t], grads[t] and states[t]
  went into step t, which returned updates[t] and states[t + 1]."""
  step: Any
  params: list
  grads: list
  states: list
  updates: list
  shardings: Any = None
  mesh: Any = None
  sequential: bool = False  # traced with the sequential-scheduler flag


def _train(step, params, state, grads):
  run = _Run(step, [], list(grads), [state], [])
  for g in grads:
    run.params.append(params)
    params, u, state = step(params, state, g)
    run.updates.append(u)
    run.states.append(state)
  return run


def _single_device_run(name):
  tx = TRANSFORMS[name]()
  device = jax.devices()[0]
  params = jax.device_put(PARAMS, device)
  # Committed like the steps' outputs: one compilation of the step.
  state = jax.device_put(jax.jit(tx.init)(params), device)
  return _train(_step_fn(tx), params, state, jax.device_put(GRADS, device))


def _sharded_run(name, axis_type):
  """Init laid out by the helper, then plain `jax.jit` steps."""
  mesh = _mesh(axis_type)
  tx = TRANSFORMS[name]()
  sequential = compat.SEQUENTIAL_CPU_SCHEDULER in os.environ.get(
      'XLA_FLAGS', '')
  with jax.set_mesh(mesh):
    params = _put(PARAMS, mesh)
    shardings = flora_jax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    run = _train(_step_fn(tx), params, state, [_put(g, mesh) for g in GRADS])
  return run._replace(shardings=shardings, mesh=mesh, sequential=sequential)


def _compiled_text(run):
  """The step's program: the one the run executed (from jax's cache)."""
  with jax.set_mesh(run.mesh):
    return run.step.lower(run.params[0], run.states[0],
                          run.grads[0]).compile().as_text()


def _memoized(fn):
  cache = {}

  def get(*key):
    if key not in cache:
      cache[key] = fn(*key)
    return cache[key]

  return get


@pytest.fixture(scope='module')
def single_device():
  return _memoized(_single_device_run)


@pytest.fixture(scope='module')
def sharded():
  return _memoized(_sharded_run)


def _assert_laid_out(tree, shardings, where=''):
  for (path, leaf), want in zip(jax.tree.leaves_with_path(tree),
                                jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        where, jax.tree_util.keystr(path), leaf.sharding.spec, want.spec)


# -------------------------------------------------------- the helper


def test_state_shardings_follow_the_parameters():
  mesh = _mesh()
  tx = TRANSFORMS['flora']()
  specs = flora_jax.state_partition_specs(tx, PARAMS, SPECS, mesh=mesh)
  factored, momentum = specs[0], specs[1]
  assert factored.v_row['wide'] == P('data')
  assert factored.v_col['wide'] == P('model')
  assert factored.v_row['stack'] == P(None, 'data')
  # (r, n): rows compressed
  assert momentum.momentum['wide'] == P(None, 'model')
  assert momentum.momentum['stack'] == P(None, None, 'model')
  assert momentum.momentum['bias'] == P('model')
  assert momentum.count == P() and momentum.key == P()

  galore = flora_jax.state_partition_specs(TRANSFORMS['galore'](), PARAMS,
                                           SPECS, mesh=mesh)[0]
  assert galore.projectors['wide'] == P('data')  # (m, r) along m
  assert galore.projectors['stack'] == P(None, 'data')
  assert galore.inner_state.mu['wide'] == P(None, 'model')

  # 8-bit codes like the leaf they code; their scales like the codes, the
  # block axis too (16 and 12 blocks of 2 on 4 devices).
  coded = flora_jax.state_partition_specs(TRANSFORMS['adam_8bit'](), PARAMS,
                                          SPECS, mesh=mesh)
  assert coded.inner_state[0].mu['wide'] == P('data', 'model')
  assert coded.scales["[0].mu['wide']"] == P('data', 'model')
  assert coded.scales["[0].nu['stack']"] == P(None, 'data', 'model')

  # A mesh axis that does not divide its axis is dropped, not kept unevenly.
  odd = {'w': jax.ShapeDtypeStruct((64, 36), jnp.float32)}
  specs = flora_jax.state_partition_specs(
      optax.scale_by_factored_rms(min_dim_size_to_factor=8), odd,
      {'w': P('data', 'model')}, mesh=_mesh(shape=(1, 8)))
  stats = {specs.v_row['w'], specs.v_col['w']}
  assert stats == {P('data'), P()}  # (64,) keeps 'data'; (36,) drops 'model'


@AXIS_TYPES
def test_apply_shardings_lays_out_a_fresh_state(axis_type):
  mesh = _mesh(axis_type)
  tx = TRANSFORMS['fira']()
  with jax.set_mesh(mesh):
    params = _put(PARAMS, mesh)
    shardings = flora_jax.state_shardings(tx, params)
    state = jax.jit(
        lambda p: flora_jax.apply_shardings(tx.init(p), shardings))(params)
  _assert_laid_out(state, shardings)


# ------------------------------------- sharded == one device, state layout


@AXIS_TYPES
@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_sharded_run_equals_single_device(name, axis_type, sharded,
                                          single_device):
  """Init laid out by the helper, then plain `jax.jit` steps: the state
  stays where the helper puts it (Auto: the compiler keeps the layout it was
  given; Explicit: the layouts the transforms compute in their types) and
  the updates equal the single-device ones."""
  run, want = sharded(name, axis_type), single_device(name)
  for t, state in enumerate(run.states):
    _assert_laid_out(state, run.shardings, f'state {t}')
  for t in range(STEPS):
    for (path, got), ref in zip(jax.tree.leaves_with_path(run.updates[t]),
                                jax.tree.leaves(want.updates[t]),
                                strict=True):
      got, ref = np.asarray(got), np.asarray(ref)
      err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
      assert err < 1e-5, (t, jax.tree_util.keystr(path), err)


@AXIS_TYPES
def test_flora_update_never_gathers_a_full_gradient(axis_type, sharded):
  """Projections are regenerated shard by shard from the key and Qᵀ G is
  reduced as an r x n partial sum: no all-gather produces a matrix of a
  parameter's size."""
  hlo = _compiled_text(sharded('flora', axis_type))
  # The check below looks at a partitioned step.
  assert re.search(r'all-reduce|reduce-scatter', hlo)
  gathered = re.findall(r'= f32\[([\d,]+)\]\{[^}]*\} all-gather', hlo)
  full_sizes = {p.size for p in jax.tree.leaves(PARAMS) if p.ndim >= 2}
  sizes = [int(np.prod([int(d) for d in s.split(',')])) for s in gathered]
  assert not [s for s in sizes if s >= min(full_sizes)], gathered
  # The same check finds GaLore's gather of the gradient for its SVD.
  assert re.search(r'all-gather', _compiled_text(sharded('galore', axis_type)))


# ----------------------------------------- a refresh spread over the mesh

REFITTING = ['galore', 'fira', 'fira_randomized', 'galore_staggered']


@AXIS_TYPES
@pytest.mark.parametrize('name', REFITTING)
def test_refresh_spread_over_the_mesh_gives_one_device_projectors(
    name, axis_type, sharded, single_device):
  """Traced under the mesh, the refits are spread over its 8 devices (a
  shard_map in the update); the projectors of the unstacked and the stacked
  leaf, every step, are those of one device."""
  run, want = sharded(name, axis_type), single_device(name)
  with jax.set_mesh(run.mesh):
    jaxpr = str(jax.make_jaxpr(run.step)(run.params[0], run.states[0],
                                         run.grads[0]))
  assert 'shard_map' in jaxpr
  for t in range(1, STEPS + 1):
    got = subspace.stored_projectors(run.states[t][0].projectors)
    ref = subspace.stored_projectors(want.states[t][0].projectors)
    for leaf in ('wide', 'stack'):
      np.testing.assert_allclose(got[leaf], ref[leaf], atol=1e-5,
                                 err_msg=f'{leaf} after step {t}')


def test_distribute_refresh_false_fits_on_every_device():
  tx = flora_jax.galore(1e-2, RANK, update_proj_gap=2,
                        distribute_refresh=False, **PROJECTION)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    params = _put(PARAMS, mesh)
    state = jax.eval_shape(tx.init, params)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, state, params))
  assert 'shard_map' not in jaxpr and 'svd' in jaxpr


# ----------------------------- nnx.Optimizer on a partitioned, stacked model

LAYERS = 2
_KERNEL, _BIAS = nnx.initializers.lecun_normal(), nnx.initializers.zeros


def _linear(m, n, names, rngs, partitioned):
  """A Linear whose kernel (and bias, along the output axis) are
  partitioned as ``names`` says: with every parameter partitioned the
  compiler keeps the layouts across steps (one compilation of the step)."""
  def init(init, names):
    return nnx.with_partitioning(init, names) if partitioned else init

  return nnx.Linear(m, n, rngs=rngs, kernel_init=init(_KERNEL, names),
                    bias_init=init(_BIAS, names[-1:]))


class _Block(nnx.Module):

  def __init__(self, rngs, partitioned):
    self.linear = _linear(32, 32, (None, 'model'), rngs, partitioned)

  def __call__(self, x):
    return x + jnp.tanh(self.linear(x))


class _Net(nnx.Module):
  """A partitioned MLP around a scan over stacked blocks: the blocks'
  kernels are (L, 32, 32) with the layer axis sharded along 'data'."""

  def __init__(self, rngs, partitioned=True):
    self.up = _linear(16, 32, ('data', 'model'), rngs, partitioned)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: 'data'})
    def blocks(rngs):
      return _Block(rngs, partitioned)

    self.blocks = blocks(rngs)
    self.down = _linear(32, 16, ('model', 'data'), rngs, partitioned)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: 'data'})
    def through(block, x):
      return block(x)

    return self.down(through(self.blocks, jax.nn.relu(self.up(x))))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads)
  return loss


_nnx_train_step = nnx.jit(_train_step)


@nnx.jit
def _create_partitioned_net():
  """Module level: compiled once for all the optimizers."""
  model = _Net(nnx.Rngs(0))
  state = nnx.state(model)
  nnx.update(model, jax.lax.with_sharding_constraint(
      state, nnx.get_partition_spec(state)))
  return model


def _unpartitioned_copy(model):
  """The same weights in an unpartitioned model, as host arrays: jax puts
  them on one device (and compiles nothing to build it)."""
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: _Net(nnx.Rngs(0), partitioned=False)))
  nnx.replace_by_pure_dict(
      state, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize('name', ['flora', 'fira'])
def test_nnx_optimizer_on_a_partitioned_stacked_model(name):
  """`nnx.Optimizer` over a model sharded with `nnx.with_partitioning`,
  rank 5 on mesh axes of 2 and 4: the state is laid out as the helper says
  (the stacked kernels' state along their layer axis too) and training
  matches one device."""
  tx = TRANSFORMS[name]()
  x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
  y = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = _create_partitioned_net()
  reference = _unpartitioned_copy(model)
  optimizer = nnx.Optimizer(reference, tx, wrt=nnx.Param)
  want = [_nnx_train_step(reference, optimizer, x, y) for _ in range(STEPS)]

  with jax.set_mesh(mesh):
    params = nnx.state(model, nnx.Param)
    assert params['blocks']['linear']['kernel'].sharding.spec == P(
        'data', None, 'model')
    shardings = flora_jax.state_shardings(tx, params)

    @nnx.jit
    def make_optimizer(model):
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      flora_jax.apply_shardings(optimizer.opt_state, shardings)
      return optimizer

    optimizer = make_optimizer(model)
    is_variable = lambda v: isinstance(v, nnx.Variable)
    leaves = jax.tree.leaves(optimizer.opt_state, is_leaf=is_variable)
    for variable, sharding in zip(leaves, jax.tree.leaves(shardings),
                                  strict=True):
      value = variable.get_value()
      assert value.sharding.is_equivalent_to(sharding, value.ndim)
    stacked = [s.spec for (path, s) in jax.tree.leaves_with_path(shardings)
               if 'blocks' in jax.tree_util.keystr(path)
               and len(s.spec) >= 2]
    assert stacked and all(spec[0] == 'data' for spec in stacked), stacked

    @nnx.jit
    def train_step(model, optimizer, x, y):
      # Auto axes leave the updated state's layout to the compiler (which
      # moves some factored statistics): keep it, or the second step would
      # compile again for the new layout.
      loss = _train_step(model, optimizer, x, y)
      flora_jax.apply_shardings(optimizer.opt_state, shardings)
      return loss

    got = [train_step(model, optimizer, x, y) for _ in range(STEPS)]
    leaves = jax.tree.leaves(optimizer.opt_state, is_leaf=is_variable)
    for variable, sharding in zip(leaves, jax.tree.leaves(shardings),
                                  strict=True):
      value = variable.get_value()
      assert value.sharding.is_equivalent_to(sharding, value.ndim)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------- orbax


def _abstract(tx, params, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(tx.init, params), shardings)


@pytest.mark.parametrize('name', ['flora', 'flora_staggered', 'galore',
                                  'adam_8bit'])
def test_orbax_resume_is_bitwise_across_a_refresh(name, sharded, tmp_path):
  """Save after 1 step, restore (sharded, from an abstract state), continue
  across the resample/refresh at step 2: bitwise equal to no interruption.
  Restoring onto another mesh shape gives the same state, bit for bit."""
  run = sharded(name, AxisType.Auto)
  tx = TRANSFORMS[name]()
  manager = ocp.CheckpointManager(tmp_path / name)
  manager.save(1, args=ocp.args.StandardSave(run.states[1]))
  manager.wait_until_finished()
  with jax.set_mesh(run.mesh):
    restored = manager.restore(1, args=ocp.args.StandardRestore(
        _abstract(tx, run.params[0], run.shardings)))
    keys = [x for x in jax.tree.leaves(restored)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert keys or name == 'adam_8bit'  # typed keys come back typed
    _assert_bitwise(restored, run.states[1])
    _assert_laid_out(restored, run.shardings)
    for t in range(1, STEPS):
      _, _, restored = run.step(run.params[t], restored, run.grads[t])
    _assert_bitwise(restored, run.states[-1])

  other = _mesh(shape=(4, 2))
  with jax.set_mesh(other):
    other_params = _put(PARAMS, other)
    other_shardings = flora_jax.state_shardings(tx, other_params)
    moved = manager.restore(1, args=ocp.args.StandardRestore(
        _abstract(tx, other_params, other_shardings)))
  _assert_bitwise(moved, run.states[1])
  _assert_laid_out(moved, other_shardings)
  manager.close()


def _assert_bitwise(a, b):
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  jax.tree.map(same, a, b)


# ------------------------------------------- simulated devices without the flag


def test_refresh_is_selected_without_the_sequential_scheduler(sharded,
                                                              monkeypatch):
  """The scheduler flag is read when the update is traced: without it the
  GaLore refresh is computed at every step and selected (no conditional in
  the program, nothing for the CPU scheduler to misorder); with it the
  refresh is a real conditional. The results are the same.

  The shared GaLore run was traced under this process's XLA_FLAGS; the
  other variant is traced here, with the flag toggled."""
  run = sharded('galore', AxisType.Auto)
  programs = {run.sequential: _compiled_text(run)}
  flag = compat.SEQUENTIAL_CPU_SCHEDULER
  monkeypatch.setenv(
      'XLA_FLAGS', '--xla_force_host_platform_device_count=8'
      + ('' if run.sequential else f' {flag}'))
  with jax.set_mesh(run.mesh):
    # Fresh closures: traced anew, under the toggled flags.
    other = _train(_step_fn(TRANSFORMS['galore']()), run.params[0],
                   run.states[0], run.grads)
  programs[not run.sequential] = _compiled_text(other._replace(mesh=run.mesh))
  assert 'conditional' not in programs[False]
  assert 'conditional' in programs[True]
  for a, b in zip(jax.tree.leaves(run.updates), jax.tree.leaves(other.updates),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------- a MaxText layout on the mesh


@pytest.mark.parametrize('query_spec', [
    P('data', None, 'model'),
    # head_dim sharded: the minor axis of the merged side is gathered first.
    P('data', None, None, 'model'),
], ids=['heads', 'head_dim'])
def test_maxtext_layout_state_follows_the_matrix_view_and_matches_one_device(
    query_spec):
  """Kernels with the layer axis at 1, on an Explicit mesh: the state is
  laid out like each leaf's matrix view, the updates like the parameters,
  and a sharded APOLLO/Flora run equals the one-device run."""
  mesh = _mesh(AxisType.Explicit)
  rng = np.random.default_rng(5)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  layers = 2
  params = {'query': normal(16, layers, 4, 8) / 4,  # [embed, L, heads, hd]
            'wi': normal(16, layers, 32) / 4}  # [embed, L, mlp]
  specs = {'query': query_spec, 'wi': P('data', None, 'model')}
  numbers = {'query': flora_jax.DimensionNumbers(0, (2, 3)),
             'wi': flora_jax.DimensionNumbers(0, 2)}
  tx = optax.chain(
      flora_jax.scale_by_apollo(rule=flora_jax.ProjectionRule(
          RANK, min_dim=16, dimension_numbers=numbers), update_proj_gap=2),
      flora_jax.scale_by_flora_momentum(rule=flora_jax.ProjectionRule(
          RANK, min_dim=16, dimension_numbers=numbers), kappa=2),
  )
  state_specs = flora_jax.state_partition_specs(tx, params, specs, mesh=mesh)
  apollo, flora = state_specs
  # (L, r, heads * head_dim): the heads' sharding carries to the merged
  # side, head_dim's cannot.
  merged = P(None, None, 'model') if query_spec[2] else P()
  assert apollo.inner_state.mu['query'] == merged
  assert flora.momentum['wi'] == P(None, None, 'model')

  grads = [jax.tree.map(lambda x, t=t: x * (t + 1) + 0.1 * t, params)
           for t in range(STEPS)]

  def run(put, shardings=None):
    def step(g, s, p):
      updates, s = tx.update(g, s, p)
      return updates, s, optax.apply_updates(p, updates)

    step = jax.jit(step)
    state = jax.jit(tx.init, out_shardings=shardings)(put(params))
    outputs = []
    for g in grads:
      updates, state, _ = step(put(g), state, put(params))
      outputs.append(updates)
    return outputs

  def sharded(tree):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

  with jax.set_mesh(mesh):
    ours = run(sharded, flora_jax.state_shardings(tx, params, specs,
                                                  mesh=mesh))
  reference = run(lambda tree: tree)
  for a, b in zip(ours, reference, strict=True):
    for name in params:
      padded = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
      assert padded(a[name].sharding.spec, a[name].ndim) == padded(
          specs[name], a[name].ndim)
      # Sharded sums add in another order: float32 rounding of the largest.
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5,
                                 atol=1e-5 * float(np.max(np.abs(b[name]))))
