"""The optimizers and markdown tables of ``benchmarks/benchmark_memory.py``.

Which optimizers the memory benchmark compares, how it measures their
state (``jax.eval_shape(tx.init, params)`` on the abstract LLaMA trees of
`flora_jax_examples.llama`: nothing is allocated), and the tables it
prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import flora_jax
from flora_jax_examples import llama

LEARNING_RATE = 1e-3  # irrelevant to memory; any value builds the same state
ACCUMULATION_STEPS = 4

GIB = 2**30
MIB = 2**20


def millions(count: int) -> str:
  """A parameter count as ``58.1M`` or ``6.74B``."""
  if count >= 1e9:
    return f'{count / 1e9:.2f}B'
  return f'{count / 1e6:.1f}M'


def percent(part: float, whole: float) -> str:
  """``part`` as a percentage of ``whole``; two decimals below 1%."""
  share = 100 * part / whole
  return f'{share:.2f}%' if share < 1 else f'{share:.1f}%'


# -------------------------------------------------- 1. optimizer state


@dataclasses.dataclass(frozen=True)
class StateOptimizer:
  """One row of the state table: a label and how to build the optimizer."""

  label: str
  build: Callable[[int], Any]  # rank -> optimizer with an ``init``
  uses_rank: bool = True
  plotted: bool = True


def state_optimizers() -> list[StateOptimizer]:
  """The optimizers of the state table, baselines first.

  Every Adam here is `optax.adamw` (``optax.adam`` has the same state: the
  decoupled decay keeps none), so the accumulation and compression rows
  differ from the AdamW row only by what they add.
  """
  lr = LEARNING_RATE
  k = ACCUMULATION_STEPS
  return [
      StateOptimizer('optax.adamw', lambda r: optax.adamw(lr),
                     uses_rank=False),
      StateOptimizer('optax.adafactor', lambda r: optax.adafactor(lr),
                     uses_rank=False),
      StateOptimizer(f'optax.MultiSteps(adamw, {k})',
                     lambda r: optax.MultiSteps(optax.adamw(lr), k),
                     uses_rank=False),
      StateOptimizer('flora_jax.flora', lambda r: flora_jax.flora(lr, rank=r)),
      StateOptimizer('flora_jax.flora, bf16 momentum',
                     lambda r: flora_jax.flora(
                         lr, rank=r, momentum_dtype=jnp.bfloat16)),
      StateOptimizer(f'flora_jax.FloraMultiSteps(adamw, {k})',
                     lambda r: flora_jax.FloraMultiSteps(
                         optax.adamw(lr), k, r)),
      StateOptimizer('chain(flora_compress, adamw)',
                     lambda r: optax.chain(flora_jax.flora_compress(r),
                                           optax.adamw(lr))),
      StateOptimizer('flora_jax.galore',
                     lambda r: flora_jax.galore(lr, rank=r)),
      StateOptimizer('flora_jax.fira', lambda r: flora_jax.fira(lr, rank=r)),
      StateOptimizer('optax.contrib.galore',
                     lambda r: optax.contrib.galore(lr, rank=r)),
      # The choices optax.contrib.galore makes, in this library; not plotted
      # (it lies on the optax.contrib.galore line).
      StateOptimizer("flora_jax.galore, side='larger', max_aspect_ratio=None",
                     lambda r: flora_jax.galore(lr, rank=r, side='larger',
                                                max_aspect_ratio=None),
                     plotted=False),
  ]


def state_size(optimizer, params) -> int:
  """Bytes of ``optimizer.init(params)``, from shapes alone."""
  return flora_jax.memory.state_bytes(jax.eval_shape(optimizer.init, params))


def measure_states(models, ranks) -> dict:
  """``{(label, rank or None, model): bytes}`` for every table cell."""
  sizes = {}
  for model in models:
    params = llama.llama_params(*llama.LLAMA_SHAPES[model])
    for spec in state_optimizers():
      for rank in (ranks if spec.uses_rank else (None,)):
        sizes[spec.label, rank, model] = state_size(spec.build(rank), params)
  return sizes


def state_table(sizes, models, ranks) -> str:
  """Markdown: a row per optimizer and rank, a column per model size."""
  header_cells = []
  for model in models:
    count = llama.parameter_count(
        llama.llama_params(*llama.LLAMA_SHAPES[model]))
    header_cells.append(f'{model} ({millions(count)} params)')
  lines = [
      '| optimizer | rank | ' + ' | '.join(header_cells) + ' |',
      '|---|---|' + '---|' * len(models),
  ]
  for spec in state_optimizers():
    for rank in (ranks if spec.uses_rank else (None,)):
      cells = []
      for model in models:
        size = sizes[spec.label, rank, model]
        adamw = sizes['optax.adamw', None, model]
        cells.append(f'{size / GIB:.3f} GiB ({percent(size, adamw)})')
      rank_cell = str(rank) if rank else '–'
      lines.append(f'| {spec.label} | {rank_cell} | '
                   + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ---------------------------------------------------- 2. train step memory


def step_optimizers(rank: int, quick: bool) -> dict:
  """The optimizers whose train step is compiled."""
  lr = LEARNING_RATE
  optimizers = {
      # No state: what forward, backward and a plain update need on their
      # own, the floor every optimizer's peak is compared against.
      'optax.sgd (no state)': optax.sgd(lr),
      'optax.adamw': optax.adamw(lr),
      'flora_jax.flora': flora_jax.flora(lr, rank=rank),
      'flora_jax.fira': flora_jax.fira(lr, rank=rank),
  }
  if not quick:
    optimizers['flora_jax.galore'] = flora_jax.galore(lr, rank=rank)
    optimizers['optax.contrib.galore'] = optax.contrib.galore(lr, rank=rank)
  return optimizers


def step_table(results: dict) -> str:
  """Markdown: the `llama.StepMemory` of each optimizer, in MiB."""
  adamw_peak = results['optax.adamw'].peak
  lines = [
      '| optimizer | params | opt state | persistent (params + state) '
      '| arguments | outputs | aliased | temporaries | peak estimate '
      '| peak vs AdamW |',
      '|---|' + '---:|' * 9,
  ]
  for label, m in results.items():
    cells = [m.params, m.opt_state, m.persistent, m.argument, m.output,
             m.alias, m.temp, m.peak]
    lines.append(
        f'| {label} | ' + ' | '.join(f'{c / MIB:,.1f}' for c in cells)
        + f' | {percent(m.peak, adamw_peak)} |')
  return '\n'.join(lines)


# ------------------------------------------- 3. train-step peak, 60M to 7B

# Accelerators of 24, 40 and 80 GB. Their "GB" are GiB (an A100 80GB has
# 81,920 MiB), and a step may use 95% of them: what JAX can be given with
# XLA_PYTHON_CLIENT_MEM_FRACTION=.95, the rest left to the CUDA context and
# library workspaces, which the compiler's estimate does not count.
ACCELERATOR_GB = (24, 40, 80)
USABLE_FRACTION = 0.95


def fits(peak: int, capacity_gb: int) -> bool:
  """Whether ``peak`` bytes fit in ``USABLE_FRACTION`` of the capacity."""
  return peak <= USABLE_FRACTION * capacity_gb * GIB


def peak_optimizers(rank: int, quick: bool) -> dict:
  """The optimizers of the peak tables: baselines first.

  ``optax.contrib.galore`` keeps its defaults: its dimension numbers can
  name no batch axis, so it projects only 2-D leaves and keeps full Adam
  moments for stacked ``(L, m, n)`` ones.
  """
  lr = LEARNING_RATE
  if quick:
    return {'optax.adamw': optax.adamw(lr),
            'flora_jax.flora': flora_jax.flora(lr, rank=rank)}
  return {
      'optax.sgd (no state)': optax.sgd(lr),
      'optax.adamw': optax.adamw(lr),
      'optax.adafactor': optax.adafactor(lr),
      'optax.contrib.galore': optax.contrib.galore(lr, rank=rank),
      'flora_jax.flora': flora_jax.flora(lr, rank=rank),
      'flora_jax.flora, bf16 momentum': flora_jax.flora(
          lr, rank=rank, momentum_dtype=jnp.bfloat16),
      'flora_jax.galore': flora_jax.galore(lr, rank=rank),
      'flora_jax.fira': flora_jax.fira(lr, rank=rank),
  }


def peak_table(results: dict) -> str:
  """Markdown: each optimizer's parts of the peak, and what fits.

  In GiB, or MiB for models whose AdamW step peaks under 1 GiB.
  """
  adamw_peak = results['optax.adamw'].peak
  unit, scale = ('GiB', GIB) if adamw_peak >= GIB else ('MiB', MIB)
  columns = ['parameters', 'gradients', 'optimizer state', 'temporaries',
             'activations and other temporaries', 'peak estimate']
  lines = [
      '| optimizer | state dtypes | '
      + ' | '.join(f'{c} ({unit})' for c in columns)
      + ' | % of AdamW peak |'
      + ''.join(f' fits {gb} GB |' for gb in ACCELERATOR_GB),
      '|---|---|' + '---:|' * (len(columns) + 1)
      + ':---:|' * len(ACCELERATOR_GB),
  ]
  for label, m in results.items():
    sizes = [m.params, m.gradients, m.opt_state, m.temp,
             m.activations_and_other, m.peak]
    cells = [' + '.join(m.state_dtypes) or '–']
    cells += [f'{size / scale:,.2f}' for size in sizes]
    cells.append(percent(m.peak, adamw_peak))
    cells += ['yes' if fits(m.peak, gb) else 'no' for gb in ACCELERATOR_GB]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
