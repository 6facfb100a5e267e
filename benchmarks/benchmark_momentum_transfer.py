"""Flora's momentum transfer at a re-draw, measured on the byte-level LM.

Every ``kappa`` steps `flora_jax.flora` draws a new random projection and
moves its compressed momentum into the new subspace; ``momentum_transfer``
says how: ``'least_squares'`` (the old momentum's least-squares fit in the
new subspace), ``'paper'`` (the paper's ``down_new(up_old(C))``, unbiased
but growing the momentum's norm by about ``sqrt(dim / r)`` per re-draw) or
``'reset'`` (zero). This benchmark trains the model of
``benchmarks/benchmark_lm_quality.py`` (the byte-level transformer of
`flora_jax_examples.byte_lm` on Shakespeare, the blocks' matrices
projected, lr 2e-3, batches of 16) with Flora at rank 8, where
``sqrt(dim / r)`` is large (every projected matrix has ``dim`` 128:
``sqrt(128 / 8) = 4``), for each transfer and ``kappa`` in (10, 50, 1000);
AdamW and Flora without momentum (``b1=None``) are references. The table
gives the final held-out loss as mean ± (max - min) / 2 over seeds (each
seed: initialisation, batches and projection key), whether the run stayed
finite, and the compressed momentum's norm along the run.

``flora`` refuses the paper transfer at ``init`` when
``sqrt(dim / r) * b1^kappa > 1`` (it provably grows the momentum
geometrically; here at kappa = 10: 4 * 0.9^10 = 1.39). Those cells say so,
and ALSO show what the refused configuration does when the check is
bypassed (`unchecked_paper_transfer`, a monkeypatch that exists only in
this benchmark): that is the evidence for the refusal. With fewer steps
than ``kappa`` (the default 300 < 1000) there is no re-draw at all, the
transfer never runs, and one run stands for all three.

Run::

  pip install -e . -e "./examples[benchmarks]"             # once
  python -m flora_jax_examples.datasets fetch              # once
  python benchmarks/benchmark_momentum_transfer.py --quick  # ~1 min (CI)
  python benchmarks/benchmark_momentum_transfer.py          # ~16 min (CPU)

``--kappas 10 50 200 1000`` adds a kappa between; ``--divergence-steps N``
also runs the unchecked paper transfer at the smallest kappa for N steps to
see where it breaks. It prints the table and writes it to
``OUT/momentum_transfer.md`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_jax
from flora_jax._src import flora as flora_lib
from flora_jax_examples import byte_lm
from flora_jax_examples import lm_training

RANK = 8
B1 = 0.9
MIN_DIM = 64  # as lm_training.TrainConfig: every block matrix is projected
KAPPAS = (10, 50, 1000)
TRANSFERS = ('least_squares', 'paper', 'reset')
NO_REDRAW = 'any (no re-draw)'


@dataclasses.dataclass(frozen=True)
class Config:
  """One optimizer setting (a cell of the table)."""

  label: str
  optimizer: str = 'flora'  # or 'adamw'
  kappa: int = 1000
  transfer: str = 'least_squares'
  b1: float | None = B1


@dataclasses.dataclass
class Run:
  """One seed of one `Config`: its held-out curve and momentum norms."""

  eval_steps: list[int] = dataclasses.field(default_factory=list)
  eval_loss: list[float] = dataclasses.field(default_factory=list)
  momentum_norm: list[float] = dataclasses.field(default_factory=list)
  nonfinite_step: int | None = None  # first step whose loss was not finite
  refused: str | None = None  # the library's ValueError, when it refused
  seconds: float = 0.0


def configs(steps: int, kappas, quick: bool) -> list[Config]:
  """The settings to run; one for all transfers when ``kappa >= steps``."""
  runs = [] if quick else [Config('adamw', 'adamw'),
                           Config('flora b1=None', b1=None)]
  for kappa in kappas:
    if kappa >= steps:
      runs.append(Config(f'k={kappa} {NO_REDRAW}', kappa=kappa))
      continue
    runs += [Config(f'k={kappa} {transfer}', kappa=kappa, transfer=transfer)
             for transfer in TRANSFERS]
  return runs


def make_tx(config: Config, lr: float,
            seed: int) -> optax.GradientTransformation:
  """AdamW, or Flora projecting the blocks' matrices as the LM benchmark."""
  if config.optimizer == 'adamw':
    return optax.adamw(lr)
  return flora_jax.flora(
      lr, rank=RANK, kappa=config.kappa, b1=config.b1, key=seed,
      momentum_transfer=config.transfer, min_dim=MIN_DIM,
      min_dim_size_to_factor=MIN_DIM,
      projection_mask=flora_jax.path_mask(byte_lm.in_blocks))


def projection_plans(model: nnx.Module) -> list:
  """The `LeafPlan` of each parameter, in the order of the state's leaves."""
  rule = flora_jax.ProjectionRule(
      RANK, min_dim=MIN_DIM,
      projection_mask=flora_jax.path_mask(byte_lm.in_blocks))
  plans = rule.plan(nnx.state(model, nnx.Param))
  return jax.tree.leaves(plans, is_leaf=lambda x: hasattr(x, 'projected'))


def growth(plans: list, kappa: int) -> float:
  """The largest ``sqrt(dim / r) * b1^kappa`` of the projected matrices."""
  return max(math.sqrt(p.dim / p.rank) * B1**kappa
             for p in plans if p.projected)


@contextlib.contextmanager
def unchecked_paper_transfer():
  """BYPASSES the library's refusal of a diverging paper transfer.

  Benchmark only: it measures what the refused configuration would do,
  which is the evidence for refusing it.
  """
  original = flora_lib._check_paper_transfer  # noqa: SLF001
  flora_lib._check_paper_transfer = lambda *args: None  # noqa: SLF001
  try:
    yield
  finally:
    flora_lib._check_paper_transfer = original  # noqa: SLF001


def make_optimizer(model, tx, run: Run) -> nnx.Optimizer:
  """``nnx.Optimizer``; a refused paper transfer is recorded, then bypassed."""
  try:
    return nnx.Optimizer(model, tx, wrt=nnx.Param)
  except ValueError as error:
    if "momentum_transfer='paper'" not in str(error):
      raise
    run.refused = str(error)
  with unchecked_paper_transfer():
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def momentum_norm(optimizer: nnx.Optimizer, plans: list) -> float:
  """Global norm of the compressed momenta (NaN when there is none)."""
  state = nnx.as_pure(optimizer.opt_state)
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, flora_jax.FloraMomentumState))
           if isinstance(s, flora_jax.FloraMomentumState)]
  if not found:
    return math.nan
  leaves = jax.tree.leaves(found[0].momentum)
  assert [x.shape for x in leaves] == [p.low_rank_shape for p in plans]
  # In float64: the unchecked paper transfer's float32 squares overflow.
  return math.sqrt(sum(
      np.sum(np.square(np.asarray(x, np.float64)))
      for x, p in zip(leaves, plans, strict=True) if p.projected))


def train(config: Config, seed: int, data, args, steps: int,
          evals: int = 5) -> Run:
  """Trains one seed of ``config``; stops early at a non-finite loss."""
  train_data, val_batches = data
  cfg = byte_lm.ModelConfig()
  model = byte_lm.ByteTransformer(cfg, rngs=nnx.Rngs(seed))
  plans = projection_plans(model)
  run = Run()
  optimizer = make_optimizer(model, make_tx(config, args.lr, seed), run)
  eval_every = max(steps // evals, 1)
  batches = byte_lm.train_batches(train_data, steps, args.batch_size,
                                  cfg.seq_len, seed)
  began = time.perf_counter()
  for step, batch in enumerate(batches):
    loss = byte_lm.train_step(model, optimizer, jnp.asarray(batch))
    last = step == steps - 1
    if (step % 10 == 0 or last) and not np.isfinite(float(loss)):
      run.nonfinite_step = step
      run.eval_steps.append(step + 1)
      run.eval_loss.append(math.nan)
      run.momentum_norm.append(math.nan)
      break
    if (step + 1) % eval_every == 0 or last:
      run.eval_steps.append(step + 1)
      run.eval_loss.append(float(np.mean(
          [byte_lm.eval_step(model, b) for b in val_batches])))
      run.momentum_norm.append(momentum_norm(optimizer, plans))
  run.seconds = time.perf_counter() - began
  return run


# ----------------------------------------------------------------- report


def loss_cell(runs: list[Run]) -> str:
  """``mean ± half-range`` of the final held-out losses, and finiteness."""
  final = np.array([r.eval_loss[-1] for r in runs])
  bad = [r.nonfinite_step for r in runs if r.nonfinite_step is not None]
  if bad or not np.all(np.isfinite(final)):
    return f'**non-finite** (step {min(bad) if bad else "?"})'
  return f'{final.mean():.4f} ± {(final.max() - final.min()) / 2:.4f}'


def transfer_cell(runs: list[Run], factor: float) -> str:
  """The loss cell; for a refused configuration, the refusal first."""
  if runs[0].refused is None:
    return loss_cell(runs)
  return (f'refused (provably diverges: sqrt(dim/r)·b1^κ = {factor:.3g});'
          f' unchecked: {loss_cell(runs)}')


def main_table(results: dict, plans: list, steps: int, kappas) -> list[str]:
  """Rows κ, columns the transfers; then the references."""
  lines = ['| κ | re-draws | sqrt(dim/r)·b1^κ | ' + ' | '.join(TRANSFERS)
           + ' |', '|---|---|---|---|---|---|']
  for kappa in kappas:
    factor = growth(plans, kappa)
    redraws = (steps - 1) // kappa
    if kappa >= steps:
      cells = [loss_cell(results[f'k={kappa} {NO_REDRAW}'])] * 3
    else:
      cells = [transfer_cell(results[f'k={kappa} {t}'], factor)
               for t in TRANSFERS]
    lines.append(f'| {kappa} | {redraws} | {factor:.3g} | '
                 + ' | '.join(cells) + ' |')
  refs = [label for label in ('adamw', 'flora b1=None') if label in results]
  if refs:
    lines += ['', '| reference | held-out loss |', '|---|---|']
    lines += [f'| {label} | {loss_cell(results[label])} |' for label in refs]
  return lines


def norm_table(results: dict) -> list[str]:
  """Final momentum norm of every Flora setting, seed 0, and run time."""
  lines = ['| setting | final compressed-momentum norm (seed 0) |'
           ' s/run |', '|---|---|---|']
  for label, runs in results.items():
    if label == 'adamw' or 'b1=None' in label:
      continue
    norm = runs[0].momentum_norm[-1] if runs[0].momentum_norm else math.nan
    seconds = np.mean([r.seconds for r in runs])
    lines.append(f'| {label} | {norm:.3g} | {seconds:.0f} |')
  return lines


def curve_table(results: dict, kappa: int) -> list[str]:
  """Held-out loss and momentum norm along the run for one κ, seed 0."""
  labels = [f'k={kappa} {t}' for t in TRANSFERS
            if f'k={kappa} {t}' in results]
  if not labels:
    return []
  steps = results[labels[0]][0].eval_steps
  lines = ['| step | ' + ' | '.join(f'{t} loss (norm)' for t in TRANSFERS)
           + ' |', '|---|' + '---|' * len(labels)]
  for i, step in enumerate(steps):
    cells = []
    for label in labels:
      run = results[label][0]
      if i < len(run.eval_loss):
        cells.append(f'{run.eval_loss[i]:.3f} ({run.momentum_norm[i]:.3g})')
      else:
        cells.append('–')
    lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
  return lines


def divergence_probe(data, args) -> list[str]:
  """The refused (unchecked) paper transfer at the smallest κ, run long."""
  kappa = min(args.kappas)
  steps = args.divergence_steps
  run = train(Config('probe', kappa=kappa, transfer='paper'), 0, data, args,
              steps, evals=10)
  print(f'divergence probe: {run.eval_loss[-1]:.4f}'
        f' ({run.seconds:.0f} s)', flush=True)
  end = ('stayed finite' if run.nonfinite_step is None
         else f'loss non-finite at step {run.nonfinite_step}')
  lines = [f'## Unchecked paper transfer at κ = {kappa}, {steps} steps'
           f' (seed 0): {end}', '',
           '| step | held-out loss | compressed-momentum norm |',
           '|---|---|---|']
  for step, loss, norm in zip(run.eval_steps, run.eval_loss,
                              run.momentum_norm, strict=True):
    lines.append(f'| {step} | {loss:.4f} | {norm:.3g} |')
  return lines


def report(results: dict, plans: list, args, seconds: float,
           probe: list[str]) -> str:
  head = (f'# Flora momentum transfer at a re-draw\n\n'
          f'Byte-level LM on Shakespeare (`byte_lm.ModelConfig()`), '
          f'{args.steps} steps of {args.batch_size} sequences, lr {args.lr},'
          f' {args.seeds} seed(s); Flora rank {RANK}, b1 {B1}, the blocks\''
          f' matrices projected (all have dim 128: sqrt(dim/r) = 4).'
          f' Final held-out loss (nats/byte), mean ± (max - min) / 2 over'
          f' seeds; "non-finite" marks a run whose loss became NaN/inf.'
          f' jax {jax.__version__}, backend {jax.default_backend()},'
          f' {os.cpu_count()} CPU cores; {seconds / 60:.1f} min in all.\n')
  notes = [
      '',
      '* "refused": `flora(...)` raises ValueError at `init` for this'
      ' configuration; "unchecked" is the same run with the check'
      ' bypassed by this benchmark (`unchecked_paper_transfer`), the'
      ' evidence for the refusal.',
  ]
  if max(args.kappas) >= args.steps:
    notes.append(f'* κ ≥ {args.steps} steps: no re-draw happens, the'
                 ' transfer never runs, and one run stands for all three'
                 ' columns.')
  parts = [head, *main_table(results, plans, args.steps, args.kappas),
           *notes, '', '## Compressed-momentum norm at the end', '',
           *norm_table(results)]
  curves = curve_table(results, min(args.kappas))
  if curves:
    parts += ['', f'## κ = {min(args.kappas)} along the run (seed 0):'
              ' held-out loss (compressed-momentum norm)', '', *curves]
  if probe:
    parts += ['', *probe]
  return '\n'.join(parts) + '\n'


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--eval-batches', type=int, default=8)
  parser.add_argument('--kappas', type=int, nargs='+', default=list(KAPPAS))
  parser.add_argument(
      '--divergence-steps', type=int, default=0,
      help='also run the unchecked paper transfer at the smallest kappa'
      ' this long (seed 0), to see where it breaks; 0: skip')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results'))
  parser.add_argument('--quick', action='store_true', help='smoke test (CI)')
  args = parser.parse_args()
  if args.quick:
    args.steps, args.seeds, args.kappas = 20, 1, [10]
    args.batch_size, args.eval_batches = 8, 1

  began = time.perf_counter()
  train_data, val_data = lm_training.load_corpus('shakespeare', 4 << 20)
  val_batches = byte_lm.eval_batches(val_data, args.eval_batches, 32,
                                     byte_lm.ModelConfig().seq_len)
  data = (train_data, val_batches)
  plans = projection_plans(
      byte_lm.ByteTransformer(byte_lm.ModelConfig(), rngs=nnx.Rngs(0)))
  results = {}
  for config in configs(args.steps, args.kappas, args.quick):
    results[config.label] = []
    for seed in range(args.seeds):
      run = train(config, seed, data, args, args.steps)
      results[config.label].append(run)
      print(f'{config.label} seed {seed}: held-out {run.eval_loss[-1]:.4f}'
            f'{" (refused; unchecked)" if run.refused else ""}'
            f' ({run.seconds:.0f} s)', flush=True)

  probe = divergence_probe(data, args) if args.divergence_steps else []
  text = report(results, plans, args, time.perf_counter() - began, probe)
  print('\n' + text)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'momentum_transfer.md')
  with open(path, 'w') as f:
    f.write(text)
  print(f'table: {path}')


if __name__ == '__main__':
  main()
