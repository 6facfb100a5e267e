"""Data + model parallel training with Flora and Fira, checkpointed and resumed.

The quickstart's byte-level transformer is trained on a (data=2, model=4)
device mesh with `jax.jit` and `NamedSharding`: the batch is split along
``data``; every weight matrix is split along both axes (tensor parallel along
``model``, fully sharded along ``data``). The optimizer state is laid out by
`flora_jax.state_shardings`, so each device holds only its part of the
compressed momenta, projectors and factored statistics.

For each optimizer the run is checkpointed with orbax halfway, restored into
fresh arrays from an abstract (shape + sharding) tree, checked against the
sha256 of every leaf saved with it (`flora_jax_examples.checkpoints`), and
continued; the resumed run must end bit for bit where the uninterrupted one
did, across a Flora resample and a Fira subspace refresh. A table then
gives, per device, the bytes of optimizer state next to AdamW's (laid out
on the mesh, not trained).

Without accelerators the 8 devices are simulated on the CPU (the flags are
set below, before jax starts). Run::

  python examples/train_sharded.py          # under a minute on 2 CPU cores
  python examples/train_sharded.py --quick  # smoke test (CI)
"""

from __future__ import annotations

import os

# Eight simulated CPU devices, and the CPU scheduler setting under which
# conditionals holding collectives (a GaLore refresh) cannot deadlock them;
# both are ignored by GPU and TPU backends.
# (Nothing but os.environ is set here, so the imports below still count as
# the top of the file.)
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *(
    flag for flag in ('--xla_force_host_platform_device_count=8',
                      '--xla_cpu_enable_concurrency_optimized_scheduler=false')
    if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''))]).strip()
# The simulated devices make their LAPACK calls (Fira's SVDs, to OpenBLAS)
# all at once, each from a thread of its own; a multithreaded OpenBLAS then
# spins its threads against XLA's, which on 2 cores made an SVD about 700x
# slower (minutes a run, and "may be stuck" rendezvous warnings). One thread
# per call is plenty for these small matrices.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse
import dataclasses
import math
import re
import tempfile

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import flora_jax
from flora_jax_examples import byte_lm  # the quickstart's model and loss
from flora_jax_examples import checkpoints
from flora_jax_examples import datasets

# Where each parameter lives, by its '/'-joined path (first match wins).
# Column-parallel matrices split their outputs along 'model', row-parallel
# ones their inputs; the other axis is split along 'data' (FSDP).
SHARDING_RULES = (
    (r'.*/(query|key|value|mlp_in)/kernel', P('data', 'model')),
    (r'.*/(out|mlp_out)/kernel', P('model', 'data')),
    (r'.*/mlp_in/bias', P('model')),
    (r'embed/embedding', P('model', 'data')),
    (r'.*', P()),  # norms, biases, the position table: replicated
)


def param_specs(params):
  def spec(key_path, leaf):
    del leaf
    path = jax.tree_util.keystr(key_path, simple=True, separator='/')
    return next(s for pattern, s in SHARDING_RULES
                if re.fullmatch(pattern, path))

  return jax.tree.map_with_path(spec, params)


def make_optimizers(args):
  return {
      'flora': flora_jax.flora(
          args.lr, rank=args.rank, kappa=args.period, min_dim=64,
          min_dim_size_to_factor=64),
      'fira': flora_jax.fira(
          args.lr, args.rank, update_proj_gap=args.period, min_dim=64),
  }


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """The bytes of ``tree`` that each device holds."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      data = shard.data
      if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(data)
      held[shard.device] = held.get(shard.device, 0) + data.nbytes
  return held


def layout_bytes_per_device(shapes) -> dict[jax.Device, int]:
  """`bytes_per_device` of arrays that are only described, not allocated.

  Args:
    shapes: `jax.ShapeDtypeStruct` leaves with their ``sharding``.
  """
  held = {}
  for leaf in jax.tree.leaves(shapes):
    itemsize = leaf.dtype.itemsize  # a PRNG key's: its key data's
    nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    for device in leaf.sharding.device_set:
      held[device] = held.get(device, 0) + nbytes
  return held


class Model:
  """The model on the mesh: its parameters, their shardings and the loss."""

  def __init__(self, mesh, cfg, seed):
    graphdef, params = nnx.split(byte_lm.ByteTransformer(cfg,
                                                         rngs=nnx.Rngs(seed)))
    # On the host: each run puts its own copy on the mesh. (A device_put of
    # device arrays may alias them, and a run's update donates its params.)
    self.params = jax.tree.map(np.array, nnx.as_pure(params))
    self.shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                                  param_specs(self.params))
    self.batch_sharding = NamedSharding(mesh, P('data'))
    self.graphdef = graphdef

  def loss(self, params, batch):
    """The mean next-byte cross-entropy of ``batch`` under ``params``."""
    return byte_lm.loss_fn(nnx.merge(self.graphdef, params), batch)

  def abstract_state(self, tx):
    """``tx.init``'s state as sharded `jax.ShapeDtypeStruct` leaves."""
    shardings = flora_jax.state_shardings(tx, self.params, self.shardings)
    return jax.eval_shape(jax.jit(tx.init, out_shardings=shardings),
                          self.params)


class Run:
  """One optimizer on the mesh: sharded init, jitted step, checkpoints."""

  def __init__(self, tx, model):
    self.model = model
    self.params = jax.device_put(model.params, model.shardings)
    self.state_shardings = flora_jax.state_shardings(
        tx, model.params, model.shardings)
    self.opt_state = jax.jit(tx.init, out_shardings=self.state_shardings)(
        self.params)

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(model.loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    # One program for the whole step. (A gradient program shared by the
    # runs, with an update program each, compiles no faster, and it ends in
    # many independent collectives, with which the simulated CPU devices
    # deadlocked now and then.)
    self.step = jax.jit(
        step,
        in_shardings=(model.shardings, self.state_shardings,
                      model.batch_sharding),
        out_shardings=(model.shardings, self.state_shardings, None),
        donate_argnums=(0, 1),
    )

  def train(self, batches):
    losses = []
    for batch in batches:
      batch = jax.device_put(batch, self.model.batch_sharding)
      self.params, self.opt_state, loss = self.step(
          self.params, self.opt_state, batch)
      losses.append(loss)
    return [float(x) for x in losses]

  def state(self):
    """What a checkpoint holds: the live arrays, which the next step donates.

    Save them before that step; keep them only once the run holds others.
    """
    return {'params': self.params, 'opt_state': self.opt_state}

  def restore(self, state):
    self.params, self.opt_state = state['params'], state['opt_state']

  def abstract_state(self):
    """Shapes, dtypes and shardings to restore into, nothing allocated."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        self.state())


def identical(a, b) -> bool:
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    return np.array_equal(np.asarray(x), np.asarray(y))

  return all(jax.tree.leaves(jax.tree.map(same, a, b)))


def train_and_resume(name, run, batches, resume_at, root):
  """Trains, checkpointing at ``resume_at``; resumes there; compares.

  Returns:
    The losses of the uninterrupted run.
  """
  losses = run.train(batches[:resume_at])
  with ocp.CheckpointManager(os.path.join(root, name)) as manager:
    checkpoints.save(manager, resume_at, run.state())
    # Written before the next step donates (reuses) the saved arrays.
    manager.wait_until_finished()
    losses += run.train(batches[resume_at:])
    finished = run.state()
    run.restore(checkpoints.restore(manager, resume_at, run.abstract_state()))
  resumed = run.train(batches[resume_at:])
  if not (identical(run.state(), finished) and resumed == losses[resume_at:]):
    raise SystemExit(f'{name}: the resumed run differs from the'
                     ' uninterrupted one')
  return losses


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--period', type=int, default=15,
                      help="Flora's kappa and Fira's update_proj_gap")
  parser.add_argument('--checkpoint-dir', default=None,
                      help='default: a fresh temporary directory')
  parser.add_argument('--quick', action='store_true', help='smoke test (CI)')
  args = parser.parse_args()
  cfg = byte_lm.ModelConfig()
  if args.quick:
    # One block: compiling dominates a smoke test, and it grows with depth.
    args.steps, args.period, args.batch_size = 8, 3, 8
    cfg = dataclasses.replace(cfg, num_layers=1)
  resume_at = args.steps // 2
  if not resume_at < args.period * (resume_at // args.period + 1) <= args.steps:
    parser.error('choose --steps and --period so that a resample/refresh'
                 ' falls after the checkpoint')

  if jax.device_count() < 8:
    raise SystemExit(f'needs 8 devices, found {jax.device_count()}')
  # Auto axes: the compiler places the model's intermediate values; the
  # quickstart model carries no Explicit-sharding annotations.
  mesh = jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(AxisType.Auto,) * 2)
  corpus = datasets.stdlib_corpus(2**20)
  batches = list(byte_lm.train_batches(corpus, args.steps, args.batch_size,
                                       cfg.seq_len, seed=0))
  root = args.checkpoint_dir or tempfile.mkdtemp(prefix='train_sharded_')
  print(f'{jax.device_count()} devices as {dict(mesh.shape)};'
        f' {args.steps} steps of {args.batch_size} x {cfg.seq_len} bytes;'
        f' checkpoint at step {resume_at} under {root}\n')

  with jax.set_mesh(mesh):
    model = Model(mesh, cfg, seed=0)
    # AdamW is the yardstick of the state sizes: laid out, never trained.
    adamw = layout_bytes_per_device(
        model.abstract_state(optax.adamw(args.lr)))
    rows = []
    for name, tx in make_optimizers(args).items():
      run = Run(tx, model)
      losses = train_and_resume(name, run, batches, resume_at, root)
      per_device = bytes_per_device(run.opt_state)
      rows.append((name, losses[0], losses[-1], max(per_device.values()),
                   sum(per_device.values())))
      print(f'{name:>5}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; resumed'
            f' from step {resume_at} (checksums verified): bitwise identical')

  header = (f'\n{"optimizer":<9} {"first loss":>10} {"last loss":>9}'
            f' {"state / device":>15} {"vs adamw":>8} {"all devices":>12}')
  print(header)
  print('-' * (len(header) - 1))
  adamw_per_device = max(adamw.values())
  print(f'{"adamw":<9} {"-":>10} {"-":>9} {adamw_per_device / 1024:>11.1f} KiB'
        f' {1:>8.1%} {sum(adamw.values()) / 1024:>8.1f} KiB')
  for name, first, last, per_device, total in rows:
    print(f'{name:<9} {first:>10.3f} {last:>9.3f}'
          f' {per_device / 1024:>11.1f} KiB'
          f' {per_device / adamw_per_device:>8.1%}'
          f' {total / 1024:>8.1f} KiB')
  print('\nstate / device: the most any one device holds. Replicated leaves'
        ' (counters, keys, norms, biases) count on every device. AdamW is'
        ' laid out on the mesh, not trained.')


if __name__ == '__main__':
  main()
