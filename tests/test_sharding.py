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
"""

import re

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


def _params():
  keys = jax.random.split(jax.random.key(0), 5)
  return {
      'wide': jax.random.normal(keys[0], (64, 128)) / 8,
      'stack': jax.random.normal(keys[1], (2, 64, 96)) / 8,
      'bias': jax.random.normal(keys[2], (128,)),
      # Too thin to project: every transform keeps it as it is.
      'adapter': {'lora_a': jax.random.normal(keys[3], (64, 8)) / 8,
                  'lora_b': jax.random.normal(keys[4], (8, 128)) / 8},
  }


def _grads(step):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(1), step),
                                  p.shape),
      _params(),
  )


def _mesh(axis_type=AxisType.Auto, shape=(2, 4)):
  return jax.make_mesh(shape, ('data', 'model'), axis_types=(axis_type,) * 2)


def _put(tree, mesh):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, SPECS)


PROJECTION = dict(min_dim=32)
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
                                     min_dim_size_to_factor=32, **PROJECTION),
    'galore': lambda: flora_jax.galore(1e-2, RANK, update_proj_gap=2,
                                       **PROJECTION),
    'fira': lambda: flora_jax.fira(1e-2, RANK, update_proj_gap=2, **PROJECTION),
    'limit_norm_growth': lambda: optax.chain(
        optax.scale_by_adam(), flora_jax.limit_norm_growth(1.01),
        optax.scale_by_learning_rate(1e-2)),
    'lora_plus': lambda: flora_jax.lora_plus(1e-2, weight_decay=0.01,
                                             max_grad_norm=1.0),
}
STEPS = 4  # crosses a resample / refresh / accumulation cycle


def _run(tx, params, grads_seq, step=None):
  step = step or jax.jit(tx.update)
  state = tx.init(params)
  updates = []
  for grads in grads_seq:
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, state


# -------------------------------------------------------- the helper


def test_state_shardings_follow_the_parameters():
  mesh = _mesh()
  params = _params()
  tx = TRANSFORMS['flora']()
  specs = flora_jax.state_partition_specs(tx, params, SPECS, mesh=mesh)
  factored, momentum = specs[0], specs[1]
  assert factored.v_row['wide'] == P('data')
  assert factored.v_col['wide'] == P('model')
  assert factored.v_row['stack'] == P(None, 'data')
  # (r, n): rows compressed
  assert momentum.momentum['wide'] == P(None, 'model')
  assert momentum.momentum['stack'] == P(None, None, 'model')
  assert momentum.momentum['bias'] == P('model')
  assert momentum.count == P() and momentum.key == P()

  galore = flora_jax.state_partition_specs(TRANSFORMS['galore'](), params,
                                           SPECS, mesh=mesh)[0]
  assert galore.projectors['wide'] == P('data')  # (m, r) along m
  assert galore.projectors['stack'] == P(None, 'data')
  assert galore.inner_state.mu['wide'] == P(None, 'model')

  # A mesh axis that does not divide its axis is dropped, not kept unevenly.
  odd = {'w': jax.ShapeDtypeStruct((64, 36), jnp.float32)}
  specs = flora_jax.state_partition_specs(
      optax.scale_by_factored_rms(min_dim_size_to_factor=8), odd,
      {'w': P('data', 'model')}, mesh=_mesh(shape=(1, 8)))
  stats = {specs.v_row['w'], specs.v_col['w']}
  assert stats == {P('data'), P()}  # (64,) keeps 'data'; (36,) drops 'model'


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit],
                         ids=['auto', 'explicit'])
def test_apply_shardings_lays_out_a_fresh_state(axis_type):
  mesh = _mesh(axis_type)
  tx = TRANSFORMS['fira']()
  with jax.set_mesh(mesh):
    params = _put(_params(), mesh)
    shardings = flora_jax.state_shardings(tx, params)
    state = jax.jit(
        lambda p: flora_jax.apply_shardings(tx.init(p), shardings))(params)
  for (path, leaf), want in zip(jax.tree.leaves_with_path(state),
                                jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        jax.tree_util.keystr(path), leaf.sharding.spec, want.spec)


# ------------------------------------- sharded == one device, state layout


@pytest.fixture(scope='module')
def single_device_runs():
  grads = [_grads(t) for t in range(STEPS)]
  return {
      name: _run(make(), _params(), grads)[0]
      for name, make in TRANSFORMS.items()
  }


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit],
                         ids=['auto', 'explicit'])
@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_sharded_run_equals_single_device(name, axis_type,
                                          single_device_runs):
  """Init laid out by the helper, then plain `jax.jit` updates: the state
  stays where the helper puts it (Auto: the compiler keeps the layout it was
  given; Explicit: the layouts the transforms compute in their types) and
  the updates equal the single-device ones."""
  mesh = _mesh(axis_type)
  tx = TRANSFORMS[name]()
  with jax.set_mesh(mesh):
    params = _put(_params(), mesh)
    shardings = flora_jax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(tx.update)
    for t in range(STEPS):
      u, state = step(_put(_grads(t), mesh), state, params)
      params = optax.apply_updates(params, u)
      for (path, got), want in zip(
          jax.tree.leaves_with_path(u),
          jax.tree.leaves(single_device_runs[name][t]), strict=True):
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert err < 1e-5, (t, jax.tree_util.keystr(path), err)
      for (path, leaf), want in zip(jax.tree.leaves_with_path(state),
                                    jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
            t, jax.tree_util.keystr(path), leaf.sharding.spec, want.spec)


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit],
                         ids=['auto', 'explicit'])
def test_flora_update_never_gathers_a_full_gradient(axis_type):
  """Projections are regenerated shard by shard from the key and Qᵀ G is
  reduced as an r x n partial sum: no all-gather produces a matrix of a
  parameter's size."""
  mesh = _mesh(axis_type)
  tx = TRANSFORMS['flora']()
  with jax.set_mesh(mesh):
    params = _put(_params(), mesh)
    state = jax.jit(tx.init, out_shardings=flora_jax.state_shardings(
        tx, params))(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  # The check below looks at a partitioned step.
  assert re.search(r'all-reduce|reduce-scatter', hlo)
  gathered = re.findall(r'= f32\[([\d,]+)\]\{[^}]*\} all-gather', hlo)
  full_sizes = {int(np.prod(p.shape)) for p in jax.tree.leaves(_params())
                if p.ndim >= 2}
  sizes = [int(np.prod([int(d) for d in s.split(',')])) for s in gathered]
  assert not [s for s in sizes if s >= min(full_sizes)], gathered
  # The same check finds GaLore's gather of the gradient for its SVD.
  galore = TRANSFORMS['galore']()
  with jax.set_mesh(mesh):
    state = jax.jit(galore.init, out_shardings=flora_jax.state_shardings(
        galore, params))(params)
    hlo = jax.jit(galore.update).lower(params, state, params).compile()
  assert re.search(r'all-gather', hlo.as_text())


# ----------------------------- nnx.Optimizer on a partitioned, stacked model

LAYERS = 2
_INIT = nnx.initializers.lecun_normal()


def _kernel_init(names, partitioned):
  return nnx.with_partitioning(_INIT, names) if partitioned else _INIT


class _Block(nnx.Module):

  def __init__(self, rngs, partitioned):
    self.linear = nnx.Linear(128, 128, rngs=rngs,
                             kernel_init=_kernel_init((None, 'model'),
                                                      partitioned))

  def __call__(self, x):
    return x + jnp.tanh(self.linear(x))


class _Net(nnx.Module):
  """A partitioned MLP around a scan over stacked blocks: the blocks'
  kernels are (L, 128, 128) with the layer axis sharded along 'data'."""

  def __init__(self, rngs, partitioned=True):
    self.up = nnx.Linear(64, 128, rngs=rngs,
                         kernel_init=_kernel_init(('data', 'model'),
                                                  partitioned))

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: 'data'})
    def blocks(rngs):
      return _Block(rngs, partitioned)

    self.blocks = blocks(rngs)
    self.down = nnx.Linear(128, 64, rngs=rngs,
                           kernel_init=_kernel_init(('model', 'data'),
                                                    partitioned))

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: 'data'})
    def through(block, x):
      return block(x)

    return self.down(through(self.blocks, jax.nn.relu(self.up(x))))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize('name', ['flora', 'fira'])
def test_nnx_optimizer_on_a_partitioned_stacked_model(name):
  """`nnx.Optimizer` over a model sharded with `nnx.with_partitioning`,
  rank 5 on mesh axes of 2 and 4: the state is laid out as the helper says
  (the stacked kernels' state along their layer axis too) and training
  matches one device."""
  tx = TRANSFORMS[name]()
  x = jax.random.normal(jax.random.key(1), (16, 64))
  y = jax.random.normal(jax.random.key(2), (16, 64))
  model = _Net(nnx.Rngs(0), partitioned=False)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  want = [_nnx_train_step(model, optimizer, x, y) for _ in range(STEPS)]

  mesh = _mesh()
  with jax.set_mesh(mesh):

    @nnx.jit
    def create():
      model = _Net(nnx.Rngs(0))
      state = nnx.state(model)
      nnx.update(model, jax.lax.with_sharding_constraint(
          state, nnx.get_partition_spec(state)))
      return model

    model = create()
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
    got = [_nnx_train_step(model, optimizer, x, y) for _ in range(STEPS)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------- orbax


@pytest.mark.parametrize('name', ['flora', 'galore'])
def test_orbax_resume_is_bitwise_across_a_refresh(name, tmp_path):
  """Save after 1 step, restore (sharded, from an abstract state), continue
  across the resample/refresh at step 2: bitwise equal to no interruption.
  Restoring onto another mesh shape gives the same state, bit for bit."""
  mesh = _mesh()
  tx = TRANSFORMS[name]()
  grads = [_grads(t) for t in range(STEPS)]
  with jax.set_mesh(mesh):
    params = _put(_params(), mesh)
    shardings = flora_jax.state_shardings(tx, params)
    step = jax.jit(tx.update)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    states = []
    for t in range(STEPS):
      u, state = step(_put(grads[t], mesh), state, params)
      states.append(state)
    manager = ocp.CheckpointManager(tmp_path / name)
    manager.save(1, args=ocp.args.StandardSave(states[0]))
    manager.wait_until_finished()

    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params), shardings)
    restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
    keys = [x for x in jax.tree.leaves(restored)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert keys  # typed keys round-trip as typed keys
    for t in range(1, STEPS):
      _, restored = step(_put(grads[t], mesh), restored, params)
    _assert_bitwise(restored, states[-1])

  other = _mesh(shape=(4, 2))
  with jax.set_mesh(other):
    other_params = _put(_params(), other)
    other_shardings = flora_jax.state_shardings(tx, other_params)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, other_params), other_shardings)
    moved = manager.restore(1, args=ocp.args.StandardRestore(abstract))
  _assert_bitwise(moved, states[0])
  for leaf, want in zip(jax.tree.leaves(moved),
                        jax.tree.leaves(other_shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  manager.close()


def _assert_bitwise(a, b):
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  jax.tree.map(same, a, b)


# ------------------------------------------- simulated devices without the flag


def test_refresh_is_selected_without_the_sequential_scheduler(monkeypatch):
  """The scheduler flag is read when the update is traced: without it the
  GaLore refresh is computed at every step and selected (no conditional in
  the program, nothing for the CPU scheduler to misorder); with it the
  refresh is a real conditional. The results are the same."""
  mesh = _mesh()
  grads = [_grads(t) for t in range(3)]
  programs, results = {}, {}
  for flags in ('', flora_jax._src.compat.SEQUENTIAL_CPU_SCHEDULER):
    monkeypatch.setenv(
        'XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {flags}')
    tx = TRANSFORMS['galore']()
    with jax.set_mesh(mesh):
      params = _put(_params(), mesh)
      state = jax.jit(tx.init, out_shardings=flora_jax.state_shardings(
          tx, params))(params)
      step = jax.jit(tx.update)
      programs[flags] = step.lower(params, state, params).compile().as_text()
      results[flags] = _run(tx, params, [_put(g, mesh) for g in grads],
                            step)[0]
  assert 'conditional' not in programs['']
  sequential = flora_jax._src.compat.SEQUENTIAL_CPU_SCHEDULER
  assert 'conditional' in programs[sequential]
  for a, b in zip(*(jax.tree.leaves(r) for r in results.values()),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
