"""One of the processes that `test_multiprocess.py` starts (not a test).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process has 4 simulated CPU devices (its XLA_FLAGS); `jax.distributed`
joins them into one 8-device job whose cross-process collectives go through
gloo. On a (2, 4) ('data', 'model') mesh -- 'data' across the processes,
'model' within each -- it trains a small MLP around stacked blocks with
`flora_jax.flora` and `flora_jax.fira`, the optimizer state laid out by
`flora_jax.state_shardings`, and checks, raising on any difference:

* the state stays laid out as the helper says through the jitted steps;
* an orbax checkpoint written by both processes restores in both, bit for
  bit, into the same layout and into one with the processes' halves swapped
  (each process then reads what the other one wrote);
* training resumed from the restored state ends bit for bit where the
  uninterrupted run did, across the Flora resample / Fira refresh at step 2.

It then writes the gathered losses, final parameters and final optimizer
state to OUT_DIR/process_<id>.npz, for the test to compare with one process.

The model, data and optimizers are defined here, at module level with numpy
only (importing this module starts no jax backend), so that the test builds
the single-process reference from the same definitions.
"""

import pathlib
import sys
import time

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

import flora_jax

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
MESH_SHAPE = (2, 4)  # ('data', 'model'): 'data' spans the two processes
AXES = ('data', 'model')
RANK = 5  # divides neither mesh axis: the rank axis stays replicated
STEPS = 4  # a Flora resample and a Fira refresh at step 2
SAVED_AFTER = 1  # checkpoint after this many steps; resume from there
BATCH, WIDTH, HIDDEN, LAYERS = 8, 16, 32, 2

SPECS = {
    'w_in': P('data', 'model'),
    'b_in': P('model'),
    'blocks': P(None, 'data', 'model'),  # (L, m, n): scan-over-layers kernels
    'w_out': P('model', 'data'),
}
BATCH_SPEC = P('data')

OPTIMIZERS = {
    'flora': lambda: flora_jax.flora(1e-2, rank=RANK, kappa=2, min_dim=16,
                                     min_dim_size_to_factor=16),
    'fira': lambda: flora_jax.fira(1e-2, RANK, update_proj_gap=2,
                                   min_dim=16),
}


def params_np():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {
      'w_in': normal(WIDTH, HIDDEN) / 4,
      'b_in': normal(HIDDEN) / 4,
      'blocks': normal(LAYERS, HIDDEN, HIDDEN) / 6,
      'w_out': normal(HIDDEN, WIDTH) / 6,
  }


def batches_np():
  """One (x, y) global batch per step."""
  rng = np.random.default_rng(1)
  return [tuple(rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
                for _ in range(2)) for _ in range(STEPS)]


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w_in'] + params['b_in'])

  def block(h, kernel):
    return h + jnp.tanh(h @ kernel), None

  h, _ = jax.lax.scan(block, h, params['blocks'])
  return jnp.mean((h @ params['w_out'] - y) ** 2)


def make_step(tx):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def host_tree(tree):
  """The tree as numpy, typed PRNG keys as their key data."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def flat_names(tree):
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree.leaves_with_path(tree)]


# ------------------------------------------------------------- the worker


_START = time.monotonic()


def _log(message):
  print(f'[process {jax.process_index()}, {time.monotonic() - _START:5.1f} s]'
        f' {message}', flush=True)


def _check_layout(tree, shardings, what):
  for (path, leaf), want in zip(jax.tree.leaves_with_path(tree),
                                jax.tree.leaves(shardings), strict=True):
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      raise AssertionError(
          f'{what}{jax.tree_util.keystr(path)}: laid out as'
          f' {leaf.sharding}, not {want}')


def _check_local_shards(tree, global_values, what):
  """Every shard this process holds equals the global value, bit for bit."""
  tree = host_tree(tree)
  for (path, leaf), want in zip(jax.tree.leaves_with_path(tree),
                                jax.tree.leaves(global_values), strict=True):
    for shard in leaf.addressable_shards:
      got = np.asarray(shard.data)
      if got.dtype != want.dtype or not np.array_equal(got, want[shard.index]):
        raise AssertionError(
            f'{what}{jax.tree_util.keystr(path)} differs on'
            f' {shard.device} at {shard.index}')


def _run(name, mesh, swapped, params, batches, out_dir):
  import orbax.checkpoint as ocp  # a slow import, needed here only

  tx = OPTIMIZERS[name]()
  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  shardings = flora_jax.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  _check_layout(state, shardings, f'{name} init ')
  step = jax.jit(make_step(tx))
  trajectory, losses = [], []
  p, s = params, state
  for t in range(STEPS):
    p, s, loss = step(p, s, *batches[t])
    _check_layout(s, shardings, f'{name} step {t} ')
    trajectory.append({'params': p, 'opt_state': s})
    losses.append(loss)
  _log(f'{name}: trained {STEPS} steps, losses {[float(x) for x in losses]}')

  saved = trajectory[SAVED_AFTER - 1]
  _log(f'{name}: gathering')
  saved_global = multihost_utils.process_allgather(
      host_tree(saved), tiled=True)
  directory = pathlib.Path(out_dir) / 'checkpoints' / name
  manager = ocp.CheckpointManager(directory)
  try:
    manager.save(SAVED_AFTER, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()
    _log(f'{name}: saved')

    def target(param_shardings, shardings):
      abstract = {'params': params, 'opt_state': jax.eval_shape(tx.init,
                                                                params)}
      layout = {'params': param_shardings, 'opt_state': shardings}
      return jax.tree.map(
          lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
          abstract, layout)

    restored = manager.restore(
        SAVED_AFTER,
        args=ocp.args.StandardRestore(target(param_shardings, shardings)))
    _check_layout(restored, {'params': param_shardings,
                             'opt_state': shardings}, f'{name} restored ')
    _check_local_shards(restored, saved_global, f'{name} restored ')
    # The other process's devices hold this process's half now: restoring
    # reads what the other process wrote.
    relayout = lambda tree: jax.tree.map(
        lambda sh: NamedSharding(swapped, sh.spec), tree)
    moved = manager.restore(
        SAVED_AFTER,
        args=ocp.args.StandardRestore(target(relayout(param_shardings),
                                             relayout(shardings))))
    _check_layout(moved, {'params': relayout(param_shardings),
                          'opt_state': relayout(shardings)},
                  f'{name} swapped restore ')
    _check_local_shards(moved, saved_global, f'{name} swapped restore ')
  finally:
    manager.close()
  _log(f'{name}: checkpoint restored bit for bit (same and swapped layout)')

  p, s = restored['params'], restored['opt_state']
  for t in range(SAVED_AFTER, STEPS):
    p, s, _ = step(p, s, *batches[t])
  final_global = multihost_utils.process_allgather(
      host_tree(trajectory[-1]), tiled=True)
  _check_local_shards({'params': p, 'opt_state': s}, final_global,
                      f'{name} resumed ')
  _log(f'{name}: resumed run ends bit for bit where the uninterrupted did')
  losses = multihost_utils.process_allgather(
      jnp.stack(losses), tiled=True)
  return {'losses': np.asarray(losses), **final_global}


def main(process_id, num_processes, port, out_dir):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=f'localhost:{port}', num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)
  assert jax.process_count() == num_processes, jax.process_count()
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
  assert jax.device_count() == num_processes * LOCAL_DEVICES
  mesh = jax.make_mesh(MESH_SHAPE, AXES, axis_types=(AxisType.Auto,) * 2)
  owners = [{d.process_index for d in row} for row in mesh.devices]
  assert owners == [{0}, {1}], owners  # 'data' goes across the processes
  swapped = Mesh(mesh.devices[::-1], AXES, axis_types=mesh.axis_types)
  _log(f'{jax.device_count()} devices in {jax.process_count()} processes')

  with jax.set_mesh(mesh):
    params = {
        k: jax.make_array_from_callback(
            v.shape, NamedSharding(mesh, SPECS[k]), lambda i, v=v: v[i])
        for k, v in params_np().items()
    }
    # Each process supplies the rows of the batch its devices hold.
    local = slice(BATCH // num_processes * process_id,
                  BATCH // num_processes * (process_id + 1))
    batches = [
        tuple(jax.make_array_from_process_local_data(
            NamedSharding(mesh, BATCH_SPEC), a[local], a.shape) for a in xy)
        for xy in batches_np()
    ]
    results = {name: _run(name, mesh, swapped, params, batches, out_dir)
               for name in OPTIMIZERS}

  leaves = jax.tree.leaves(results)
  np.savez(pathlib.Path(out_dir) / f'process_{process_id}.npz',
           *[np.asarray(x) for x in leaves])
  _log('done')
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
