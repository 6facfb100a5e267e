"""Quality: a byte-level LM pre-trained on Shakespeare with each optimizer.

Every run trains the same model (the quickstart's decoder-only transformer,
in the training loop of examples/train_lm.py, `lm_training.train` of
flora_jax_examples) from the same initialisation on the same batches for
the same number of steps; only the optimizer differs. The low-rank
optimizers project the transformer blocks' matrices (the embedding, norms
and biases keep full state in every run). Several seeds; the table gives the
final held-out loss as mean ± (max - min) / 2 over seeds, and each seed's,
and a PNG shows the held-out curves. Every optimizer has the same learning
rate (``--lr``), APOLLO's and APOLLO-Mini's included (the APOLLO paper uses
GaLore's; α = 1 and sqrt(128), their paper defaults).

Run::

  pip install -e . -e "./examples[benchmarks]"        # once
  python -m flora_jax_examples.datasets fetch         # once
  python benchmarks/benchmark_lm_quality.py --quick   # about a minute (CI)
  python benchmarks/benchmark_lm_quality.py           # ~40 min on 2 cores
  python benchmarks/benchmark_lm_quality.py --only apollo  # ~7 min

The table goes to stdout and to ``<out>/lm_quality.md`` (default
``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``), the
plot to ``<out>/lm_quality.png``. With ``--only`` the rows run replace
theirs in ``lm_quality.md`` and its other rows are kept (when its steps,
seeds, learning rate, period and corpus are this run's), and the plot goes
to ``lm_quality_<prefixes>.png``.
"""

from __future__ import annotations

import argparse
import os
import re

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
    # Stored projectors, each slice re-drawn at its own step of the period.
    ('flora r8 staggered', 'flora-staggered', 8, {}),
    ('flora r32 staggered', 'flora-staggered', 32, {}),
    ('galore r32', 'galore', 32, {}),
    ('fira r32', 'fira', 32, {}),
    # APOLLO (flora_jax.apollo): Adam's per-channel scaling from a rank-32
    # random projection; APOLLO-Mini: one scale per matrix, rank 1.
    ('apollo r32', 'apollo', 32, {}),
    ('apollo-mini', 'apollo-mini', 1, {}),
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


TABLE_HEADER = ('| optimizer | held-out loss | vs adamw | optimizer state'
                ' | per seed |\n|---|---|---|---|---|')


def table_row(label: str, histories) -> str:
  """A row of the table: mean ± (max - min) / 2 over seeds, and each seed."""
  final = np.array([h.eval_loss[-1] for h in histories])
  spread = (final.max() - final.min()) / 2
  return (f'| {label} | {final.mean():.4f} ± {spread:.4f} |'
          f' {{vs_adamw}} | {histories[0].state_bytes / 2**20:.2f} MiB |'
          f' {", ".join(f"{x:.4f}" for x in final)} |')


def kept_rows(path: str, settings: str, run: set[str]) -> dict[str, str]:
  """The rows of an earlier ``lm_quality.md`` for the labels not in ``run``.

  None when the file has other settings (its rows are not comparable).
  """
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  if settings not in lines:
    print(f'\n{path} has other settings: its rows are not kept.')
    return {}
  rows = {}
  for line in lines:
    cells = [cell.strip() for cell in line.split('|')]
    if (len(cells) > 2 and line.startswith('| ') and cells[1] != 'optimizer'
        and cells[1] not in run):
      rows[cells[1]] = line
  return rows


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
  parser.add_argument('--out', default=None,
                      help='folder of lm_quality.md and the plot (default'
                      ' benchmarks/results, or benchmarks/results/quick)')
  parser.add_argument('--quick', action='store_true', help='smoke test (CI)')
  parser.add_argument('--only', nargs='*', metavar='LABEL',
                      help='run only the rows whose label starts with one of'
                      ' these (adamw is always run: the baseline)')
  args = parser.parse_args()
  args.out = args.out or os.path.join(
      os.path.dirname(__file__), 'results/quick' if args.quick else 'results')
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
  settings = (f'{args.steps} steps, {args.seeds} seed(s), lr {args.lr},'
              f' period {args.period}, corpus {args.corpus}; held-out loss in'
              ' nats per byte.')
  rows = {}
  for label, histories in results.items():
    mean = np.mean([h.eval_loss[-1] for h in histories])
    rows[label] = table_row(label, histories).format(
        vs_adamw=f'{mean - base:+.4f}')
  table = TABLE_HEADER + '\n' + '\n'.join(rows.values())
  print(f'\n{settings}\n\n{table}')

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'lm_quality.md')
  if args.only:  # the earlier rows of the others, in the order of RUNS
    rows.update(kept_rows(path, settings, set(rows)))
    order = [run[0] for run in RUNS]
    rows = dict(sorted(rows.items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order))))
  with open(path, 'w', encoding='utf-8') as f:
    f.write('# LM quality (`python benchmarks/benchmark_lm_quality.py`)\n\n'
            f'{settings}\n\n{TABLE_HEADER}\n' + '\n'.join(rows.values())
            + '\n')
  print(f'\ntable: {path}')

  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('\n(no plot: pip install -e . -e "./examples[benchmarks]")')
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, histories in results.items():
    curves = np.array([h.eval_loss for h in histories])
    ax.plot(histories[0].eval_steps, curves.mean(0), label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('held-out loss (nats/byte)')
  ax.set_title(f'Byte-level LM on {args.corpus}')
  ax.legend()
  fig.tight_layout()
  name = 'lm_quality.png'
  if args.only:  # not the full run's plot
    name = 'lm_quality_' + '_'.join(
        re.sub(r'[^a-z0-9]+', '-', prefix.lower()) for prefix in args.only
    ) + '.png'
  path = os.path.join(args.out, name)
  fig.savefig(path, dpi=120)
  print(f'plot: {path}')


if __name__ == '__main__':
  main()
