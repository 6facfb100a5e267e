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
  # The rank column of an optimizer at one fixed rank (uses_rank False).
  fixed_rank: int | None = None


def state_optimizers() -> list[StateOptimizer]:
  """The optimizers of the state table built at its ranks, baselines first.

  Each one built with rank r projects at rank r (or keeps full state); the
  table adds `fixed_rank_optimizers` (`table_optimizers`).

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
      StateOptimizer('flora_jax.apollo',
                     lambda r: flora_jax.apollo(lr, rank=r)),
      StateOptimizer('optax.contrib.galore',
                     lambda r: optax.contrib.galore(lr, rank=r)),
      # The choices optax.contrib.galore makes, in this library; not plotted
      # (it lies on the optax.contrib.galore line).
      StateOptimizer("flora_jax.galore, side='larger', max_aspect_ratio=None",
                     lambda r: flora_jax.galore(lr, rank=r, side='larger',
                                                max_aspect_ratio=None),
                     plotted=False),
  ]


def fixed_rank_optimizers() -> list[StateOptimizer]:
  """The state table's optimizers at a rank of their own, not the table's.

  APOLLO-Mini, at the paper's rank 1 (`state_optimizers` are those that
  project at the rank they are built with).
  """
  return [StateOptimizer('flora_jax.apollo_mini',
                         lambda r: flora_jax.apollo_mini(LEARNING_RATE),
                         uses_rank=False, fixed_rank=1)]


def table_optimizers() -> list[StateOptimizer]:
  """Every row of the benchmark's state table and plots: `state_optimizers`,
  with `fixed_rank_optimizers` after APOLLO."""
  specs = state_optimizers()
  at = 1 + next(i for i, spec in enumerate(specs)
                if spec.label == 'flora_jax.apollo')
  return specs[:at] + fixed_rank_optimizers() + specs[at:]


def state_size(optimizer, params) -> int:
  """Bytes of ``optimizer.init(params)``, from shapes alone."""
  return flora_jax.memory.state_bytes(jax.eval_shape(optimizer.init, params))


def measure_states(models, ranks, specs=None) -> dict:
  """``{(label, rank or None, model): bytes}`` for every table cell.

  ``specs``: the rows, `state_optimizers` by default (the benchmark's are
  `table_optimizers`).
  """
  sizes = {}
  for model in models:
    params = llama.llama_params(*llama.LLAMA_SHAPES[model])
    for spec in specs or state_optimizers():
      for rank in (ranks if spec.uses_rank else (None,)):
        sizes[spec.label, rank, model] = state_size(spec.build(rank), params)
  return sizes


def state_table(sizes, models, ranks, specs=None) -> str:
  """Markdown: a row per optimizer and rank, a column per model size.

  ``specs``: the rows, as in `measure_states`.
  """
  header_cells = []
  for model in models:
    count = llama.parameter_count(
        llama.llama_params(*llama.LLAMA_SHAPES[model]))
    header_cells.append(f'{model} ({millions(count)} params)')
  lines = [
      '| optimizer | rank | ' + ' | '.join(header_cells) + ' |',
      '|---|---|' + '---|' * len(models),
  ]
  for spec in specs or state_optimizers():
    for rank in (ranks if spec.uses_rank else (None,)):
      cells = []
      for model in models:
        size = sizes[spec.label, rank, model]
        adamw = sizes['optax.adamw', None, model]
        cells.append(f'{size / GIB:.3f} GiB ({percent(size, adamw)})')
      rank_cell = str(rank or spec.fixed_rank or '–')
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
    optimizers['flora_jax.apollo'] = flora_jax.apollo(lr, rank=rank)
    optimizers['flora_jax.apollo_mini'] = flora_jax.apollo_mini(lr)
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
      'flora_jax.apollo': flora_jax.apollo(lr, rank=rank),
      'flora_jax.apollo_mini': flora_jax.apollo_mini(lr),  # rank 1
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


# ------------------------------------------- 4. fused per-layer updates

FUSED_LABELS = ('optax.adamw', 'flora_jax.flora', 'flora_jax.galore',
                'flora_jax.fira')
# Quick mode: AdamW only (a Flora step takes 4 to 8 s to compile, whatever
# the size); the accumulation row still compiles a projecting optimizer.
QUICK_FUSED_LABELS = ('optax.adamw',)
# The accumulator's rank of the accumulation rows, whatever the model's.
ACCUMULATION_RANK = 128


def fused_optimizers(rank: int, quick: bool) -> dict:
  """The optimizers whose ordinary and fused steps are compared.

  The same constructors and rank as the peak tables (`peak_optimizers`).
  """
  optimizers = peak_optimizers(rank, quick=False)
  labels = QUICK_FUSED_LABELS if quick else FUSED_LABELS
  return {label: optimizers[label] for label in labels}


def accumulation_optimizer() -> tuple[str, Any]:
  """`flora_jax.FloraMultiSteps` around AdamW, and its label."""
  k, rank = ACCUMULATION_STEPS, ACCUMULATION_RANK
  return (f'flora_jax.FloraMultiSteps(adamw, {k}, rule=ProjectionRule({rank}))',
          flora_jax.FloraMultiSteps(optax.adamw(LEARNING_RATE), k,
                                    rule=flora_jax.ProjectionRule(rank)))


@dataclasses.dataclass(frozen=True)
class FusedComparison:
  """One optimizer's ordinary and fused step on one stacked model."""

  model: llama.StepModel
  label: str
  ordinary: llama.StepMemory  # value_and_grad, tx.update, apply_updates
  fused: llama.StepMemory  # flora_jax.fused_train_step

  @property
  def saving(self) -> int:
    return self.ordinary.peak - self.fused.peak

  @property
  def stack_gradient(self) -> int:
    """Bytes of the stacked layers' gradient (``params['layers']``)."""
    return llama.stack_bytes(self.model)

  @property
  def expected(self) -> int:
    """``(L-1)/L`` of the stack's gradient: one layer's gradient remains."""
    layers = self.model.layers
    return (layers - 1) * self.stack_gradient // layers

  @property
  def ratio(self) -> float:
    """The saving as a share of `expected`."""
    return self.saving / self.expected


def _unit(peaks) -> tuple[str, int, str]:
  """GiB (3 decimals), or MiB for steps that all peak under 1 GiB."""
  return ('GiB', GIB, '{:,.3f}') if max(peaks) >= GIB else (
      'MiB', MIB, '{:,.1f}')


def model_cells(model: llama.StepModel) -> str:
  return (f'{model.name.removeprefix("LLaMA-")} '
          f'({millions(llama.parameter_count(model.params()))}, '
          f'{model.layers} layers) | {jnp.dtype(model.dtype).name}')


def fused_table(rows: list[FusedComparison]) -> str:
  """Markdown: ordinary and fused peak, the saving and its share."""
  unit, scale, fmt = _unit([row.ordinary.peak for row in rows])
  columns = ['ordinary peak', 'fused peak', 'saving', 'stack gradient',
             '(L-1)/L x stack gradient']
  lines = [
      '| model | dtype | optimizer | '
      + ' | '.join(f'{c} ({unit})' for c in columns)
      + ' | fused % of ordinary | saving / ((L-1)/L x stack gradient) |',
      '|---|---|---|' + '---:|' * (len(columns) + 2),
  ]
  for row in rows:
    sizes = [row.ordinary.peak, row.fused.peak, row.saving,
             row.stack_gradient, row.expected]
    cells = [fmt.format(size / scale) for size in sizes]
    cells += [percent(row.fused.peak, row.ordinary.peak), f'{row.ratio:.2f}']
    lines.append(f'| {model_cells(row.model)} | {row.label} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class AccumulationComparison:
  """The fused step with and without compressed gradient accumulation."""

  model: llama.StepModel
  plain: llama.StepMemory  # fused optax.adamw
  accumulating: llama.StepMemory  # fused FloraMultiSteps(adamw, k)

  @property
  def difference(self) -> int:
    return self.accumulating.peak - self.plain.peak


def accumulation_table(rows: list[AccumulationComparison], label: str) -> str:
  """Markdown: the two fused peaks and where their difference is."""
  unit, scale, fmt = _unit([row.plain.peak for row in rows])
  lines = [
      f'| model | dtype | fused `optax.adamw` peak ({unit}) '
      f'| fused `{label}` peak ({unit}) | difference ({unit}) '
      f'| difference (% of the fused AdamW peak) '
      f'| of which optimizer state ({unit}) '
      f'| of which temporaries ({unit}) |',
      '|---|---|' + '---:|' * 6,
  ]
  for row in rows:
    plain, acc = row.plain, row.accumulating
    sizes = [plain.peak, acc.peak, row.difference]
    cells = [fmt.format(size / scale) for size in sizes]
    cells.append(f'{100 * row.difference / plain.peak:+.1f}%')
    cells += [fmt.format((acc.opt_state - plain.opt_state) / scale),
              fmt.format((acc.temp - plain.temp) / scale)]
    lines.append(f'| {model_cells(row.model)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ------------------------------------- 5. a LLaMA-7B step in 24 GB

RECIPE_LIMIT_GIB = 22  # the target: 2 GB of a 24 GB card left to the runtime


@dataclasses.dataclass(frozen=True)
class RecipeStep:
  """One row of the 24 GB table: an optimizer, the weights, the step."""

  label: str
  dtype: Any  # the parameters' (and the compute's)
  rounding: str  # of updates to the weights: 'nearest' or 'stochastic'
  fused: bool  # flora_jax.fused_train_step, else the ordinary step
  optimizer: Any


def recipe_steps(rank: int, quick: bool) -> list[RecipeStep]:
  """The rows of the 24 GB table: baselines, then the library's recipe.

  Every bfloat16 row but plain AdamW's rounds its updates stochastically
  (`flora_jax.stochastic_rounding`, last in the chain); "8-bit" is
  `flora_jax.quantize_state` around the optimizer.
  """
  lr = LEARNING_RATE

  def rounded(tx):
    return optax.chain(tx, flora_jax.stochastic_rounding(0))

  def eight_bit(tx):
    return rounded(flora_jax.quantize_state(tx))

  f32, bf16 = jnp.float32, jnp.bfloat16
  recipe = RecipeStep('8-bit flora_jax.flora', bf16, 'stochastic', True,
                      eight_bit(flora_jax.flora(lr, rank=rank)))
  if quick:
    return [RecipeStep('optax.adamw', f32, 'nearest', False,
                       optax.adamw(lr)), recipe]
  return [
      RecipeStep('optax.adamw', f32, 'nearest', False, optax.adamw(lr)),
      RecipeStep('optax.adamw', bf16, 'nearest', False, optax.adamw(lr)),
      RecipeStep('8-bit optax.adamw', bf16, 'stochastic', False,
                 eight_bit(optax.adamw(lr))),
      RecipeStep('flora_jax.galore', bf16, 'stochastic', False,
                 rounded(flora_jax.galore(lr, rank=rank))),
      RecipeStep('flora_jax.flora', bf16, 'stochastic', False,
                 rounded(flora_jax.flora(lr, rank=rank))),
      RecipeStep('8-bit optax.adamw', bf16, 'stochastic', True,
                 eight_bit(optax.adamw(lr))),
      RecipeStep('8-bit flora_jax.galore', bf16, 'stochastic', True,
                 eight_bit(flora_jax.galore(lr, rank=rank))),
      recipe,
  ]


def recipe_table(rows: list[tuple[RecipeStep, llama.StepMemory]]) -> str:
  """Markdown: each step's parts of the peak, and what fits."""
  lines = [
      '| optimizer | weights | updates rounded | step | weights (GiB) '
      '| optimizer state (GiB) | temporaries (GiB) | peak estimate (GiB) '
      f'| ≤ {RECIPE_LIMIT_GIB} GiB |',
      '|---|---|---|---|---:|---:|---:|---:|:---:|',
  ]
  for step, m in rows:
    sizes = [m.params, m.opt_state, m.temp, m.peak]
    cells = [step.label, jnp.dtype(step.dtype).name,
             step.rounding if jnp.dtype(step.dtype).itemsize < 4 else '–',
             'fused' if step.fused else 'ordinary']
    cells += [f'{size / GIB:,.2f}' for size in sizes]
    cells.append('**yes**' if m.peak <= RECIPE_LIMIT_GIB * GIB else 'no')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
