"""Quality: a byte-level LM pre-trained on Shakespeare with each optimizer.

Every run trains the same model (the quickstart's decoder-only transformer,
in the training loop of examples/train_lm.py, `lm_training.train` of
flora_jax_examples) from the same initialisation on the same batches for
the same number of steps; only the optimizer differs. The low-rank
optimizers project the transformer blocks' matrices (the embedding, norms
and biases keep full state in every run). Several seeds; the table gives the
final held-out loss as mean ± (max - min) / 2 over seeds, and a PNG shows
the held-out curves.

Run::

  pip install -e . -e "./examples[benchmarks]"        # once
  python -m flora_jax_examples.datasets fetch         # once
  python benchmarks/benchmark_lm_quality.py --quick   # about a minute (CI)
  python benchmarks/benchmark_lm_quality.py           # ~35 min on 2 cores
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from flora_jax_examples import lm_training

# (label, optimizer, rank, other TrainConfig fields)
_8BIT = dict(state_bits=8)
_BF16_SR = dict(param_dtype='bfloat16', rounding='stochastic')
RUNS = (
    ('adamw', 'adamw', None, {}),
    ('adafactor', 'adafactor', None, {}),
    ('flora r8', 'flora', 8, {}),
    ('flora r32', 'flora', 32, {}),
    ('flora r128', 'flora', 128, {}),
    ('flora r8 rademacher', 'flora-rademacher', 8, {}),
    ('flora r32 rademacher', 'flora-rademacher', 32, {}),
    ('galore r32', 'galore', 32, {}),
    ('fira r32', 'fira', 32, {}),
    # Low precision: 8-bit states (flora_jax.quantize_state), bfloat16
    # weights rounded to nearest or stochastically.
    ('adamw 8-bit state', 'adamw', None, _8BIT),
    ('flora r32 8-bit state', 'flora', 32, _8BIT),
    ('galore r32 8-bit state', 'galore', 32, _8BIT),
    ('fira r32 8-bit state', 'fira', 32, _8BIT),
    ('adamw bf16 weights, nearest', 'adamw', None,
     dict(param_dtype='bfloat16')),
    ('adamw bf16 weights, stochastic', 'adamw', None, _BF16_SR),
    ('flora r32 bf16 weights, stochastic, 8-bit state', 'flora', 32,
     dict(_BF16_SR, **_8BIT)),
)
# CI's train_lm run has the last row.
QUICK_RUNS = tuple(run for run in RUNS
                   if run[0] in ('adamw', 'flora r32', 'galore r32'))


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--period', type=int, default=200)
  parser.add_argument('--corpus', choices=lm_training.CORPORA,
                      default='shakespeare')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results'))
  parser.add_argument('--quick', action='store_true', help='smoke test (CI)')
  parser.add_argument('--only', nargs='*', metavar='LABEL',
                      help='run only the rows whose label starts with one of'
                      ' these (adamw is always run: the baseline)')
  args = parser.parse_args()
  runs = QUICK_RUNS if args.quick else RUNS
  if args.only:
    runs = [run for run in runs if run[0] == 'adamw'
            or any(run[0].startswith(prefix) for prefix in args.only)]
  quick_settings = {}
  if args.quick:
    args.steps, args.seeds, args.period = 20, 1, 5
    quick_settings = dict(batch_size=8, eval_batches=1)

  results = {}
  for label, name, rank, extra in runs:
    histories = []
    for seed in range(args.seeds):
      config = lm_training.TrainConfig(
          optimizer=name, rank=rank or 32, steps=args.steps, seed=seed,
          lr=args.lr, period=args.period, corpus=args.corpus,
          eval_every=max(args.steps // 10, 1), **quick_settings, **extra)
      histories.append(lm_training.train(config, progress=False))
      print(f'{label} seed {seed}: held-out {histories[-1].eval_loss[-1]:.4f}'
            f' ({histories[-1].seconds:.0f} s)', flush=True)
    results[label] = histories

  base = np.mean([h.eval_loss[-1] for h in results['adamw']])
  print(f'\n{args.steps} steps, {args.seeds} seed(s), lr {args.lr},'
        f' corpus {args.corpus}; held-out loss in nats per byte.\n')
  print('| optimizer | held-out loss | vs adamw | optimizer state |')
  print('|---|---|---|---|')
  for label, histories in results.items():
    final = np.array([h.eval_loss[-1] for h in histories])
    spread = (final.max() - final.min()) / 2
    print(f'| {label} | {final.mean():.4f} ± {spread:.4f} |'
          f' {final.mean() - base:+.4f} |'
          f' {histories[0].state_bytes / 2**20:.2f} MiB |')

  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('\n(no plot: pip install -e . -e "./examples[benchmarks]")')
    return
  os.makedirs(args.out, exist_ok=True)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, histories in results.items():
    curves = np.array([h.eval_loss for h in histories])
    ax.plot(histories[0].eval_steps, curves.mean(0), label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('held-out loss (nats/byte)')
  ax.set_title(f'Byte-level LM on {args.corpus}')
  ax.legend()
  fig.tight_layout()
  path = os.path.join(args.out, 'lm_quality.png')
  fig.savefig(path, dpi=120)
  print(f'\nplot: {path}')


if __name__ == '__main__':
  main()
