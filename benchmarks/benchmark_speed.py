"""Speed of each optimizer relative to AdamW, same shapes, in one process.

Three measurements, each interleaved (one call of every optimizer per round,
so that machine noise hits all of them alike) and summarised by the median
over rounds, after compilation:

* ``update``: the jitted ``tx.update`` alone on a LLaMA-style layer stack.
  Optimizers with a periodic refresh (Flora's resample, GaLore's SVD) are
  timed on a steady step and on a refresh step separately, from states
  whose counter is fixed; ``amortized = steady + (refresh - steady) / T``.
* ``train step``: forward + backward + update of a residual MLP stack with
  the same matrices (steady steps).
* ``torch``: the official PyTorch GaLore and Fira against
  ``torch.optim.AdamW`` on the same shapes, when installed
  (``pip install -e ".[oracles]"``); the published flora-opt 0.0.3 is
  probed and reported when it cannot run.

Ratios, not absolute times, are the result: on a CPU the absolute times say
little about an accelerator. The same script runs on a GPU (it uses JAX's
default device). Run::

  python benchmarks/benchmark_speed.py --quick   # seconds (CI)
  python benchmarks/benchmark_speed.py           # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

import flora_jax


@dataclasses.dataclass(frozen=True)
class Shapes:
  d_model: int
  d_ffn: int
  layers: int

  def matrices(self) -> dict[str, tuple[int, int]]:
    d, f = self.d_model, self.d_ffn
    shapes = {}
    for i in range(self.layers):
      for name in ('q', 'k', 'v', 'o'):
        shapes[f'layer{i}/{name}'] = (d, d)
      shapes[f'layer{i}/up'] = (d, f)
      shapes[f'layer{i}/down'] = (f, d)
    return shapes


def init_params(shapes: Shapes, key) -> dict[str, jax.Array]:
  params = {}
  for i, (name, shape) in enumerate(sorted(shapes.matrices().items())):
    params[name] = jax.random.normal(jax.random.fold_in(key, i), shape) * (
        shape[0] ** -0.5)
  params['norm'] = jnp.ones((shapes.d_model,))
  return params


def optimizers(rank: int, period: int) -> dict[str, tuple[
    optax.GradientTransformation, Optional[int]]]:
  """name -> (transform, refresh period or None)."""
  lr = 1e-3
  return {
      'adamw': (optax.adamw(lr), None),
      'adafactor': (optax.adafactor(lr), None),
      'flora': (flora_jax.flora(lr, rank=rank, kappa=period), period),
      'flora_compress+adam': (optax.chain(
          flora_jax.flora_compress(rank, kappa=period), optax.adam(lr)),
                              period),
      'galore': (flora_jax.galore(lr, rank, update_proj_gap=period), period),
      'galore randomized': (flora_jax.galore(
          lr, rank, update_proj_gap=period, projector='randomized'), period),
      'fira': (flora_jax.fira(lr, rank, update_proj_gap=period), period),
      'optax.contrib.galore': (optax.contrib.galore(
          lr, rank=rank, update_proj_gap=period), period),
  }


def with_count(state, count: int):
  """``state`` with every step counter set to ``count``."""
  def set_count(path, leaf):
    name = jax.tree_util.keystr(path[-1:]) if path else ''
    if 'count' in name and jnp.issubdtype(jnp.asarray(leaf).dtype,
                                          jnp.integer):
      return jnp.full_like(leaf, count)
    return leaf

  return jax.tree.map_with_path(set_count, state)


def interleaved_medians(calls: dict[str, Callable[[], object]],
                        rounds: int) -> dict[str, float]:
  for call in calls.values():  # compile and warm up
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def forward_loss(params, x, y):
  h = x
  for i in range(len([k for k in params if k.endswith('/up')])):
    p = lambda name: params[f'layer{i}/{name}']
    mixed = (h @ p('q')) * jax.nn.sigmoid(h @ p('k')) + h @ p('v')
    h = h + mixed @ p('o')
    h = h + jax.nn.gelu(h @ p('up')) @ p('down')
    h = h * params['norm'] / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
  return jnp.mean((h - y) ** 2)


def bench_jax(shapes: Shapes, rank: int, period: int, rounds: int,
              batch: int):
  key = jax.random.key(0)
  params = init_params(shapes, key)
  grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape) * 1e-2,
                       params)
  x = jax.random.normal(jax.random.fold_in(key, 1), (batch, shapes.d_model))
  y = jax.random.normal(jax.random.fold_in(key, 2), (batch, shapes.d_model))
  rows = {}
  update_calls, refresh_calls, step_calls = {}, {}, {}
  for name, (tx, refresh_period) in optimizers(rank, period).items():
    update = jax.jit(tx.update)
    state = tx.init(params)
    # A refresh happens when count % period == 0; 1 is a steady step.
    steady = with_count(update(grads, state, params)[1], 1)
    update_calls[name] = lambda u=update, s=steady: u(grads, s, params)
    if refresh_period:
      fresh = with_count(steady, refresh_period)
      refresh_calls[name] = lambda u=update, s=fresh: u(grads, s, params)

    def train_step(params, state, tx=tx):
      loss, g = jax.value_and_grad(forward_loss)(params, x, y)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    step = jax.jit(train_step)
    step_calls[name] = lambda s=step, st=steady: s(params, st)
    rows[name] = refresh_period
  steady_t = interleaved_medians(update_calls, rounds)
  refresh_t = interleaved_medians(refresh_calls, max(rounds // 4, 3))
  step_t = interleaved_medians(step_calls, rounds)
  return rows, steady_t, refresh_t, step_t


# ---------------------------------------------------------------- PyTorch


def bench_torch(shapes: Shapes, rank: int, period: int, rounds: int):
  """Step times of the official GaLore/Fira relative to torch AdamW."""
  try:
    import torch
    import galore_torch
    import fira
  except ImportError as err:
    return None, f'not installed ({err.name}); pip install -e ".[oracles]"'
  torch.manual_seed(0)
  matrices = shapes.matrices()

  def make(name):
    params = [torch.nn.Parameter(torch.randn(n, m) * m ** -0.5)
              for (m, n) in matrices.values()]  # PyTorch layout (out, in)
    if name == 'adamw':
      opt = torch.optim.AdamW(params, lr=1e-3)
    else:
      cls = {'galore': galore_torch.GaLoreAdamW, 'fira': fira.FiraAdamW}[name]
      group = {'params': params, 'rank': rank, 'update_proj_gap': period,
               'scale': 0.25, 'alpha': 0.25, 'proj_type': 'std'}
      opt = cls([group], lr=1e-3, no_deprecation_warning=True)
    for p in params:
      p.grad = torch.randn_like(p) * 1e-2
    return opt

  names = ('adamw', 'galore', 'fira')
  opts = {name: make(name) for name in names}
  for opt in opts.values():  # the first step fits the projectors
    opt.step()
  steps = {name: [] for name in names}
  for i in range(max(rounds, 2 * period)):
    for name, opt in opts.items():
      start = time.perf_counter()
      opt.step()
      steps[name].append((i + 1, time.perf_counter() - start))
  steady = {n: statistics.median(t for i, t in s if i % period)
            for n, s in steps.items()}
  refresh = {n: statistics.median(t for i, t in s if i % period == 0)
             for n, s in steps.items()}
  about = f'torch {torch.__version__}, {torch.get_num_threads()} threads'
  return (steady, refresh), about


def probe_flora_opt() -> str:
  import importlib
  try:
    importlib.import_module('flora_opt')
  except ImportError as err:
    return f'flora-opt: cannot run here ({err})'
  return 'flora-opt: importable (not benchmarked by this script)'


# ------------------------------------------------------------------ report


def ratio(t: float, base: float) -> str:
  return f'{t / base:.2f}x'


def plot(periods, steady, refresh, step, period, out):
  """Bars of the amortized update and train-step ratios."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('(no plot: pip install -e . -e "./examples[benchmarks]")')
    return
  names = list(periods)
  update = [
      (steady[n] + (refresh[n] - steady[n]) / period if periods[n]
       else steady[n]) / steady['adamw'] for n in names]
  train = [step[n] / step['adamw'] for n in names]
  fig, ax = plt.subplots(figsize=(8, 4))
  x = range(len(names))
  ax.bar([i - 0.2 for i in x], update, 0.4, label='update (amortized)')
  ax.bar([i + 0.2 for i in x], train, 0.4, label='train step')
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set_xticks(list(x), names, rotation=30, ha='right')
  ax.set_ylabel('time / AdamW')
  ax.legend()
  fig.tight_layout()
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'speed.png')
  fig.savefig(path, dpi=120)
  print(f'plot: {path}')


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--d-model', type=int, default=768)
  parser.add_argument('--d-ffn', type=int, default=2048)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--rank', type=int, default=128)
  parser.add_argument('--period', type=int, default=200,
                      help='kappa / update_proj_gap (for the amortized time)')
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--quick', action='store_true', help='smoke test (CI)')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results'), help='where the PNG goes')
  args = parser.parse_args()
  if args.quick:
    args.d_model, args.d_ffn, args.layers = 128, 344, 1
    args.rank, args.rounds, args.period = 16, 5, 10
  shapes = Shapes(args.d_model, args.d_ffn, args.layers)
  n_params = sum(m * n for m, n in shapes.matrices().values())
  device = jax.devices()[0]
  print(f'jax {jax.__version__}, optax {optax.__version__}, device'
        f' {device.device_kind} ({device.platform}); {args.layers} layer(s)'
        f' d={args.d_model} ffn={args.d_ffn} ({n_params / 1e6:.1f}M matrix'
        f' parameters), rank {args.rank}, period {args.period}, median of'
        f' {args.rounds} interleaved rounds.\n')

  periods, steady, refresh, step = bench_jax(shapes, args.rank, args.period,
                                             args.rounds, args.batch)
  base = steady['adamw']
  print('| optimizer | update (steady) | update (refresh step) |'
        ' update (amortized) | train step |')
  print('|---|---|---|---|---|')
  for name, period in periods.items():
    if period:
      amortized = steady[name] + (refresh[name] - steady[name]) / period
      refresh_cell = ratio(refresh[name], base)
      amortized_cell = ratio(amortized, base)
    else:
      refresh_cell = amortized_cell = '–'
    print(f'| {name} | {ratio(steady[name], base)} | {refresh_cell} |'
          f' {amortized_cell} | {ratio(step[name], step["adamw"])} |')
  print(f'\nAdamW: update {1e3 * base:.2f} ms, train step'
        f' {1e3 * step["adamw"]:.2f} ms (the unit of every ratio).')
  plot(periods, steady, refresh, step, args.period, args.out)

  if not args.no_torch:
    result, about = bench_torch(shapes, args.rank, args.period, args.rounds)
    print(f'\nPyTorch peers ({about}):')
    if result:
      t_steady, t_refresh = result
      print('\n| optimizer (torch) | step (steady) | step (refresh) |'
            ' step (amortized) |')
      print('|---|---|---|---|')
      for name in t_steady:
        amortized = t_steady[name] + (t_refresh[name] - t_steady[name]) / (
            args.period)
        print(f'| {name} | {ratio(t_steady[name], t_steady["adamw"])} |'
              f' {ratio(t_refresh[name], t_steady["adamw"])} |'
              f' {ratio(amortized, t_steady["adamw"])} |')
  print('\n' + probe_flora_opt())


if __name__ == '__main__':
  main()
