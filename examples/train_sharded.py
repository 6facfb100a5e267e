"""Data + model parallel training with Flora and Fira, checkpointed and resumed.

The quickstart's byte-level transformer is trained on a (data=2, model=4)
device mesh with `jax.jit` and `NamedSharding`: the batch is split along
``data``; every weight matrix is split along both axes (tensor parallel along
``model``, fully sharded along ``data``). The optimizer state is laid out by
`flora_jax.state_shardings`, so each device holds only its part of the
compressed momenta, projectors and factored statistics.

For each optimizer the run is checkpointed with orbax halfway, restored into
fresh arrays from an abstract (shape + sharding) tree, and continued; the
resumed run must end bit for bit where the uninterrupted one did, across a
Flora resample and a Fira subspace refresh. A table then gives, per device,
the bytes of optimizer state next to AdamW's.

Without accelerators the 8 devices are simulated on the CPU (the flags are
set below, before jax starts). Run::

  python examples/train_sharded.py          # about a minute on 2 CPU cores
  python examples/train_sharded.py --quick  # smoke test (CI)
"""

from __future__ import annotations

import os

# Eight simulated CPU devices, and the CPU scheduler setting under which
# conditionals holding collectives (a GaLore refresh) cannot deadlock them;
# both are ignored by GPU and TPU backends.
for flag in ('--xla_force_host_platform_device_count=8',
             '--xla_cpu_enable_concurrency_optimized_scheduler=false'):
  if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"

import argparse
import re
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import flora_jax
from flora_jax_examples import byte_lm  # the quickstart's model and loss
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
      'adamw': optax.adamw(args.lr),
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


class Run:
  """One optimizer on the mesh: sharded init, jitted step, checkpoints."""

  def __init__(self, tx, mesh, cfg, seed):
    model = byte_lm.ByteTransformer(cfg, rngs=nnx.Rngs(seed))
    self.graphdef, params = nnx.split(model)
    params = nnx.as_pure(params)
    self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                                        param_specs(params))
    self.state_shardings = flora_jax.state_shardings(
        tx, params, self.param_shardings)
    self.tx = tx
    self.params = jax.device_put(params, self.param_shardings)
    self.opt_state = jax.jit(tx.init, out_shardings=self.state_shardings)(
        self.params)
    self.batch_sharding = NamedSharding(mesh, P('data'))
    self.step = jax.jit(
        self._step,
        in_shardings=(self.param_shardings, self.state_shardings,
                      self.batch_sharding),
        out_shardings=(self.param_shardings, self.state_shardings, None),
        donate_argnums=(0, 1),
    )

  def _step(self, params, opt_state, batch):
    def loss(params):
      return byte_lm.loss_fn(nnx.merge(self.graphdef, params), batch)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def train(self, batches):
    losses = []
    for batch in batches:
      batch = jax.device_put(batch, self.batch_sharding)
      self.params, self.opt_state, loss = self.step(
          self.params, self.opt_state, batch)
      losses.append(loss)
    return [float(x) for x in losses]

  def checkpoint(self):
    """What is saved; the step donates its inputs, so a copy."""
    return jax.tree.map(jnp.copy, {'params': self.params,
                                   'opt_state': self.opt_state})

  def abstract_checkpoint(self):
    """Shapes, dtypes and shardings to restore into, nothing allocated."""
    shapes = jax.eval_shape(lambda: self.checkpoint())
    shardings = {'params': self.param_shardings,
                 'opt_state': self.state_shardings}
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                 sharding=sharding),
        shapes, shardings)


def identical(a, b) -> bool:
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    return np.array_equal(np.asarray(x), np.asarray(y))

  return all(jax.tree.leaves(jax.tree.map(same, a, b)))


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
  if args.quick:
    args.steps, args.period, args.batch_size = 8, 3, 8
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
  cfg = byte_lm.ModelConfig()
  corpus = datasets.stdlib_corpus(2**20)
  batches = list(byte_lm.train_batches(corpus, args.steps, args.batch_size,
                                       cfg.seq_len, seed=0))
  root = args.checkpoint_dir or tempfile.mkdtemp(prefix='train_sharded_')
  print(f'{jax.device_count()} devices as {dict(mesh.shape)};'
        f' {args.steps} steps of {args.batch_size} x {cfg.seq_len} bytes;'
        f' checkpoint at step {resume_at} under {root}\n')

  rows = []
  with jax.set_mesh(mesh):
    for name, tx in make_optimizers(args).items():
      run = Run(tx, mesh, cfg, seed=0)
      first = run.train(batches[:resume_at])
      with ocp.CheckpointManager(os.path.join(root, name)) as manager:
        manager.save(resume_at, args=ocp.args.StandardSave(run.checkpoint()))
        manager.wait_until_finished()
        rest = run.train(batches[resume_at:])

        finished = run.checkpoint()
        restored = manager.restore(
            resume_at,
            args=ocp.args.StandardRestore(run.abstract_checkpoint()))
        run.params, run.opt_state = restored['params'], restored['opt_state']
        resumed_losses = run.train(batches[resume_at:])
      exact = (identical(run.checkpoint(), finished)
               and resumed_losses == rest)
      if not exact:
        raise SystemExit(f'{name}: the resumed run differs from the'
                         ' uninterrupted one')
      per_device = bytes_per_device(run.opt_state)
      rows.append((name, first[0], rest[-1], max(per_device.values()),
                   sum(per_device.values())))
      print(f'{name:>5}: loss {first[0]:.3f} -> {rest[-1]:.3f}; resumed from'
            f' step {resume_at}: bitwise identical')

  adamw_per_device = rows[0][3]
  header = (f'\n{"optimizer":<9} {"first loss":>10} {"last loss":>9}'
            f' {"state / device":>15} {"vs adamw":>8} {"all devices":>12}')
  print(header)
  print('-' * (len(header) - 1))
  for name, first, last, per_device, total in rows:
    print(f'{name:<9} {first:>10.3f} {last:>9.3f}'
          f' {per_device / 1024:>11.1f} KiB'
          f' {per_device / adamw_per_device:>8.1%}'
          f' {total / 1024:>8.1f} KiB')
  print('\nstate / device: the most any one device holds. Replicated leaves'
        ' (counters, keys, norms, biases) count on every device.')


if __name__ == '__main__':
  main()
