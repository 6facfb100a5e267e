"""Memory of Flora, GaLore, Fira and APOLLO against optax, without allocating.

Five measurements; none allocates the arrays it measures, so a 7B model is
fine on a laptop:

1. Optimizer-state bytes: ``jax.eval_shape(tx.init, params)`` on LLaMA-shaped
   float32 parameter trees (the GaLore / Fira paper shapes, 60M to 7B, vocab
   32000, untied head), for each optimizer and rank. Shapes and dtypes only,
   so these figures do not depend on the device.

2. Compiled memory of one full train step (forward, backward, optimizer
   update, parameter update) of a small LLaMA-style decoder with float32
   parameters and float32 compute, from
   ``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()
   .memory_analysis()``. The step is compiled, never executed. XLA's
   buffer assignment reports

   * argument bytes: the inputs, i.e. parameters + optimizer state + tokens;
   * output bytes: new parameters + new optimizer state + the loss;
   * alias bytes: outputs written into donated inputs' buffers (counted in
     both of the above, but allocated once);
   * temp bytes: the packed peak of every intermediate buffer (activations
     kept for the backward pass, gradients, optimizer temporaries).

   The peak estimate is ``argument + output - alias + temp``: arguments live
   for the whole call, outputs that could not reuse a donated buffer are
   fresh allocations, and temporaries come on top. The persistent part,
   what stays allocated between steps, is parameters + optimizer state.
   These figures come from the compiler of whatever backend JAX picks (its
   fusion and scheduling decide the temporaries), so the header names it.

3. The peak of the same donated step, measured the same way, at the 60M,
   350M, 1B and 7B shapes of section 1, written the way large JAX models
   are: each layer's parameters stacked into leaves with a leading layer
   axis, the layers run with `jax.lax.scan`, each layer checkpointed
   (`jax.checkpoint`, saving nothing but the residual stream carried from
   layer to layer), batch 1 x 2048 tokens, float32 and bfloat16
   parameters. One table per model and dtype, with the gradients and the
   accelerators (24 / 40 / 80 GB) the step fits.

4. Section 3's step against the fused one, `flora_jax.fused_train_step`
   (the optimizer applied to each stacked layer inside the backward pass,
   so the stacked gradient is never held whole), at 60M, 1B and 7B in
   float32 and 7B in bfloat16, for AdamW, Flora, GaLore and Fira: both
   peaks, the saving, and the saving as a share of (L-1)/L of the stack's
   gradient bytes. Then the fused step with compressed gradient
   accumulation (`flora_jax.FloraMultiSteps`, 4 micro-batches) against the
   fused step without accumulation.

5. A LLaMA-7B step in 24 GB: the same stacked, checkpointed 7B step with
   memory-efficient attention (queries 256 at a time, each chunk
   checkpointed), for AdamW in float32 and bfloat16, then with bfloat16
   weights rounded stochastically: 8-bit AdamW, GaLore and Flora in the
   ordinary step, and 8-bit AdamW, GaLore and Flora fused. The last two
   rows, fused GaLore and Flora with their states in 8 bits, are this
   library's recipe; the table marks the steps whose peak is at most 22
   GiB.

Run it with

  python benchmarks/benchmark_memory.py          # full: about 13 min on 2 cores
  python benchmarks/benchmark_memory.py --quick  # CI smoke mode, about 80 s
  python benchmarks/benchmark_memory.py --skip-step --peak-models 7B
  python benchmarks/benchmark_memory.py --skip-step --skip-peak  # section 4
  python benchmarks/benchmark_memory.py --only-recipe  # section 5, 3-6 min

Section 3 takes 5 of the full run's 13 minutes: 80 compilations (4 sizes, 2
dtypes, 10 optimizers) of 1 to 8 s each, whatever the size; the process
stays under 1.2 GB of host memory, 7B included. With --quick it compiles
2 optimizers for a 2-layer bfloat16 model instead. Section 4 takes 3
minutes, 36 compilations of 2 to 7 s; with --quick, 3 for a 16-layer
float32 model (AdamW ordinary and fused, FloraMultiSteps fused). Section 5
takes 3 to 6 minutes, 8 compilations of 7B steps; with --quick, 2 for the
16-layer model.

It needs the examples' support package, ``flora_jax_examples`` (the LLaMA
model and the tables, in ``examples/flora_jax_examples/llama.py`` and
``memory_tables.py``), with matplotlib:
``pip install -e . -e "./examples[benchmarks]"``.

Markdown tables go to stdout and to ``<out>/memory.md``; PNG plots to
``<out>`` (default ``benchmarks/results``, ``benchmarks/results/quick`` with
``--quick`` so a smoke run never overwrites the full figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import pathlib
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_jax
# The LLaMA model and its compiled step; the optimizers and their tables.
from flora_jax_examples import llama
from flora_jax_examples import memory_tables
from flora_jax_examples.memory_tables import GIB
from flora_jax_examples.memory_tables import MIB

FULL_MODELS = tuple(llama.LLAMA_SHAPES)
FULL_RANKS = (128, 256, 512)
QUICK_MODELS = ('60M', '130M')
QUICK_RANKS = (128, 256)
PLOT_RANK = 256  # the model-size plot; the rank sweep uses RANK_SWEEP_MODEL
RANK_SWEEP_MODEL = '1B'

# Full mode: the 60M paper shape (58M parameters), seq 256 as in the GaLore
# paper's pretraining runs, rank 128 as the paper uses at this size.
FULL_STEP_MODEL = llama.StepModel('LLaMA-60M', 512, 1376, 8, llama.LLAMA_VOCAB,
                                  4, 256, 128)
# Quick mode: 5.7M parameters. Rank 64, since every matrix side is >= 256 and a
# rank must be smaller than the compressed side for anything to be projected.
QUICK_STEP_MODEL = llama.StepModel('tiny LLaMA', 256, 688, 2, 8000, 2, 128,
                                   64)

# Section 3: stacked, scanned and checkpointed; batch 1 x 2048 tokens.
PEAK_MODELS = ('60M', '350M', '1B', '7B')
PEAK_DTYPES = (jnp.float32, jnp.bfloat16)
PEAK_BATCH, PEAK_SEQ_LEN = 1, 2048
# Quick mode: the tiny model above, stacked, in bfloat16 only (each compile
# takes seconds whatever the size, and CI has about 10 s for this section).
QUICK_PEAK_MODEL = llama.StepModel('tiny LLaMA', 256, 688, 2, 8000, 1, 128,
                                   64, jnp.bfloat16, stacked=True, remat=True)
QUICK_PEAK_DTYPES = (jnp.bfloat16,)


# Section 4: the ordinary step of section 3 against the fused one
# (`flora_jax.fused_train_step`), float32; bfloat16 too for FUSED_BF16_MODELS.
FUSED_MODELS = ('60M', '1B', '7B')
FUSED_BF16_MODELS = ('7B',)
# Quick mode: 16 small layers, stacked, whose gradient (40 MiB) is most of
# the step's temporaries (vocab 512, 64 tokens): adamw and flora only.
QUICK_FUSED_MODEL = llama.StepModel('tiny LLaMA', 256, 512, 16, 512, 1, 64,
                                    32, stacked=True, remat=True)

# Section 5: the 7B step of section 3 with memory-efficient attention.
RECIPE_MODEL, RECIPE_QUERY_CHUNK = '7B', 256
QUICK_RECIPE_QUERY_CHUNK = 16


def peak_rank(model: str) -> int:
  """Rank 128 at 60M as the GaLore paper; 256 above (it uses 256 to 1024)."""
  return 128 if model == '60M' else 256


def peak_step_model(model: str, dtype) -> llama.StepModel:
  """The section-3 step of one ``llama.LLAMA_SHAPES`` size and dtype."""
  d_model, ffn, layers = llama.LLAMA_SHAPES[model]
  return llama.StepModel(f'LLaMA-{model}', d_model, ffn, layers,
                         llama.LLAMA_VOCAB, PEAK_BATCH, PEAK_SEQ_LEN,
                         peak_rank(model), dtype, stacked=True, remat=True)


STATE_NOTES = """\
Notes on the state table:

* Parameters are float32; "% of AdamW" is of `optax.adamw`'s state (two
  float32 moments per parameter, i.e. twice the parameter bytes).
* `chain(flora_compress, adamw)` saves nothing: the compressor only changes
  the gradient AdamW sees, AdamW still keeps full-size moments. The savers
  are `flora` (compressed momentum) and `FloraMultiSteps` (compressed
  accumulator: compare it with `optax.MultiSteps`, whose accumulator is a
  full gradient copy).
* A matrix is projected only if the rank is smaller than its compressed
  side, its smaller side is at least 128 and its aspect ratio at most 4
  (`flora_jax.ProjectionRule` defaults). Embedding and head (vocab x d) are
  never projected by this library's defaults, so at small sizes they
  dominate its state; at rank 512 no matrix of the 60M model (d = 512) is
  projected and the `flora_jax` rows equal their exact fallbacks.
* `flora_jax.galore` / `fira` compress the smaller axis, as the reference
  GaLore does (moments on the larger axis). `optax.contrib.galore`
  compresses the larger axis of every 2-D leaf, embeddings and head
  included, so its moments are smaller; it also clamps the rank to the
  matrix and still stores a projector when nothing is saved (at rank 512
  its 512 x 512 projector plus two 512 x 512 moments are more than Adam's).
  `side='larger', max_aspect_ratio=None` makes this library take the same
  choices (the same arrays plus a key and a counter, 12 bytes, wherever the
  rank is below the compressed side; where it is not, this library keeps
  exact Adam and no projector, so it needs less).
* `fira` stores GaLore's state plus one float per projected matrix (the
  norm-growth limiter's previous norm).
* `apollo` keeps Adam's moments on the rank-r projection, the shapes of
  GaLore's, but no projector: its Gaussian projection is regenerated from
  a key (plus Fira's one float per projected matrix). `apollo_mini` is its
  rank-1 form (one scale per matrix, always rank 1 in this table): two
  vectors per projected matrix. The embedding and head, never projected,
  keep full AdamW moments in both: nearly all of `apollo_mini`'s state
  (1.95 of its 1.97 GiB at 7B)."""


def step_notes(model: llama.StepModel) -> str:
  params = llama.llama_params(model.d_model, model.ffn, model.layers,
                              model.vocab)
  return f"""\
Train step: {model.name} (d {model.d_model}, ffn {model.ffn}, {model.layers} \
layers, {model.d_model // llama.HEAD_DIM} heads, vocab {model.vocab}; \
{memory_tables.millions(llama.parameter_count(params))} float32 parameters, \
float32 compute), \
batch {model.batch} x {model.seq_len} tokens, rank {model.rank}. Sizes in MiB.
Peak estimate = arguments + outputs - aliased + temporaries (parameters and
optimizer state are donated, so the new ones are written in place and counted
once). Persistent = what stays allocated between steps; the rest of the peak
is the step's temporaries (activations saved for the backward pass, the
gradients, optimizer intermediates; GaLore/Fira's SVD refresh branch is
compiled into every step and counts, LAPACK's own workspace does not).
Temporaries depend on the backend's fusion and scheduling: on CPU, XLA_FLAGS=
--xla_cpu_enable_concurrency_optimized_scheduler=false (a sequential,
memory-leaner schedule) gives different ones; read them per backend."""


def peak_heading(model: llama.StepModel) -> str:
  count = llama.parameter_count(model.params())
  return (f'### {model.name} ({memory_tables.millions(count)} parameters), '
          f'{jnp.dtype(model.dtype).name} parameters, rank {model.rank}\n')


def peak_notes(model: llama.StepModel) -> str:
  frac = memory_tables.USABLE_FRACTION
  return f"""\
Notes on the peak tables:

* The step: forward, backward, optimizer update and `optax.apply_updates`,
  `jax.jit(step, donate_argnums=(0, 1))` (parameters and optimizer state
  donated), compiled for abstract inputs (`jax.ShapeDtypeStruct`) and never
  run. Batch {model.batch} x {model.seq_len} tokens; heads of \
{llama.HEAD_DIM}, vocab {model.vocab}, untied head.
* Layout: each layer's parameters stacked into leaves with a leading layer
  axis, `(L, m, n)` matrices and `(L, d)` norms, and the layers run with
  `jax.lax.scan`. The scanned layer is `jax.checkpoint`-ed with
  `jax.checkpoint_policies.nothing_saveable`: the backward pass keeps only
  each layer's input, the residual stream the scan carries (L x batch x
  seq x d), and recomputes the rest of a layer when it reaches it.
* float32: parameters, gradients and compute in float32. bfloat16:
  parameters, gradients and compute in bfloat16, with RMSNorm statistics,
  RoPE, attention scores and softmax, and the loss in float32; no float32
  master copy. The optimizer state takes the dtypes each optimizer picks
  for such parameters (the "state dtypes" column; `optax.adamw` keeps its
  moments in the parameters' dtype).
* "gradients" is the bytes of the gradient tree (the parameters' shapes
  and dtypes). XLA does not report it apart: the whole tree is alive at
  the optimizer update of this unfused step, so it is part of the
  temporaries. "activations and other temporaries" = temporaries -
  gradients: the saved residual streams, one layer's recomputed
  activations, the logits and their gradient, the optimizer's
  intermediates. `optax.sgd` keeps no state: its row is the floor.
* Peak estimate = arguments + outputs - aliased + temporaries, as in
  section 2; "% of AdamW peak" is of `optax.adamw`'s. "fits N GB": peak
  estimate <= {frac} x N GiB. These cards' "GB" are GiB (an A100 80GB has
  81,920 MiB), and {frac} is the share JAX can be given with
  XLA_PYTHON_CLIENT_MEM_FRACTION={frac} (its default preallocation is 75%),
  the rest left to what the estimate does not count (below); cards that
  reserve memory for ECC have less.
* Rank as in each heading: 128 at 60M and 256 above in the full run (the
  GaLore paper uses 512 at 1B and 1024 at 7B; section 1 has the state at
  512), but `apollo_mini`'s, always 1 (the paper's). `optax.adafactor` has
  its defaults: no momentum, factored second moments.
* `flora_jax`'s `ProjectionRule` treats leading axes as a stack of
  independent matrices: each layer's slice of an `(L, m, n)` leaf gets its
  own projector, as with unstacked leaves. `optax.contrib.galore`'s
  `GaLoreDimensionNumbers` must give every axis to the rows or the columns
  (no batch axes): with its defaults it projects only the 2-D embedding and
  head and keeps full Adam moments for the stacked layer weights. Giving it
  `reduction_axis=(0, 1)` would merge the layers into one matrix with one
  projector, another method, so it is left at its defaults.
* What the estimate is: XLA's buffer assignment for the backend in the
  header (its fusion and scheduling), for the compiled program. On CPU it is
  the CPU compiler's; the same script run on a GPU reports the GPU
  compiler's, which fuses and schedules differently. Not included: LAPACK /
  cuSOLVER workspaces (GaLore and Fira's SVD; its refresh branch is compiled
  into every step and its buffers count), cuBLAS workspaces, the CUDA
  context, allocator fragmentation and the runtime's own reservations.
* Two CPU-compiler effects to keep in mind. XLA's CPU backend computes
  bfloat16 in float32, and widens the backward scan's stacked bfloat16
  gradient buffers (and the saved residual streams) to float32, which the
  program JAX emits does not contain: the bfloat16 temporaries here
  carry about 4 bytes per layer parameter that a bfloat16-native backend
  would not (compare the two dtypes' `optax.sgd` rows). And the CPU's
  default schedule is concurrency-optimized, not memory-optimized:
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false
  (a sequential schedule) changes the temporaries: a little for AdamW,
  by up to tens of GiB at 7B for the optimizers with per-matrix work
  (Adafactor, Flora, GaLore, Fira), not always downwards, so their
  "% of AdamW peak" depends on the schedule too."""


def fused_notes(models: list[llama.StepModel]) -> str:
  k, rank = memory_tables.ACCUMULATION_STEPS, memory_tables.ACCUMULATION_RANK
  model = models[0]
  ranks = ', '.join(dict.fromkeys(f'{m.rank} at {m.name}' for m in models))
  return f"""\
Notes on the fused tables:

* The figures: XLA's `memory_analysis()` of the compiled step, on the
  backend in the header (CPU here), as in sections 2 and 3: compiled for
  abstract inputs, never run, nothing allocated. Peak estimate = arguments
  + outputs - aliased + temporaries. Batch {model.batch} x {model.seq_len} \
tokens; rank {ranks}.
* "ordinary": section 3's step, stacked + scanned + checkpointed
  (`jax.value_and_grad` of the loss, `tx.update` on the whole gradient
  tree, `optax.apply_updates`). "fused": `flora_jax.fused_train_step` of
  the same model and loss (`llama.fused_train_step_fn`): a reverse scan
  that recomputes each layer from its saved input, takes its gradient with
  `jax.vjp` and updates that layer's slices of the parameters and the
  optimizer state in place. Both `jax.jit(..., donate_argnums=(0, 1))`;
  the persistent part (parameters + optimizer state) is the same.
* "stack gradient": the bytes of `params['layers']` in the parameters'
  dtype, the stacked gradient the ordinary step holds whole at the
  update. The fused step holds one layer's gradient at a time, so it is
  expected to save about (L-1)/L of it; the last column is saving /
  ((L-1)/L x stack gradient), 1.00 for exactly that (the goal was >= 0.8).
* Above 1 for `flora` and `fira`: their ordinary update has stack-sized
  intermediates of its own (section 3's "activations and other
  temporaries"), which the fused step also only has for one layer.
* Where the peaks are, in the full run (read from
  `XLA_FLAGS=--xla_dump_to=DIR`: the compiled module's
  `*buffer-assignment.txt` and `*live-range.txt`). 7B float32, AdamW:
  the ordinary step peaks in the backward scan, its stacked gradient
  buffers (24.1 GiB) live with one layer's recomputed attention (four
  64 x 2048 x 2048 float32 buffers, 4 GiB) and the saved residual
  streams (1 GiB); the fused step peaks at the same point of a layer
  (8.1 GiB of temporaries: the attention buffers, the residual streams,
  the embedding's gradient, one layer's parameter slices and update).
  60M float32: the stack is small (0.09 GiB); the ordinary step peaks at
  the head, the logits and their softmax (2 x 2048 x 32000 float32, 0.49
  GiB) with the zeroed stacked-gradient buffers already allocated, the
  fused step inside a layer's attention backward (4 x 8 x 2048 x 2048
  float32, 0.5 GiB): the saving is 8% of the peak, and more than the
  stack gradient because the two peaks are at different points.
* bfloat16 on CPU: XLA's CPU backend has no bfloat16 slicing or slice
  update and widens them to float32, whole stacks at a time. The ordinary
  scanned step pays for it (float32 copies of its stacked matrices and
  gradient buffers, see section 3's notes); the fused step reads and
  writes its stacks so that it holds no such copy, hence its bfloat16
  savings above 3.
* Accumulation: `flora_jax.FloraMultiSteps(optax.adamw, {k},
  rule=flora_jax.ProjectionRule({rank}))`, fused (each layer's gradient
  compressed and added to its accumulator inside the backward pass, the
  inner AdamW applied once per cycle), against the fused non-accumulating
  AdamW step; both branches (accumulate, and apply at the cycle's end) are
  compiled. The difference is the accumulator, in the optimizer state:
  rank-{rank} sketches of the projected matrices (0.75 GiB at 7B) and
  exact sums of the leaves it does not project (the norms, and the
  embedding and head, vocab x d, aspect ratio above 4: 0.98 GiB at 7B),
  float32 whatever the parameters' dtype; the temporaries are the same
  or slightly smaller. Relative to
  the peak it shrinks with the model: at 60M the exact sums of the
  embedding and head (0.12 GiB) are most of it."""


# ------------------------------------------------------------------- plots


def plotted_state_optimizers() -> list[memory_tables.StateOptimizer]:
  return [spec for spec in memory_tables.table_optimizers() if spec.plotted]


def draw_curves(ax, xs, curves: dict) -> None:
  """One line per optimizer; a line on top of an earlier one is dotted.

  GaLore and Fira have the same state up to a few bytes, and the compressor
  in front of AdamW has AdamW's: those lines would hide each other, so the
  later one is drawn dotted and its legend names the one it covers. Lines
  past the tenth get colours of their own, not the cycle's again.
  """
  markers = 'osD^v<>xP*hpdX8'
  colors = [f'C{i}' for i in range(10)] + [
      'black', 'darkgoldenrod', 'teal', 'indigo', 'lime']
  drawn = {}
  for (label, ys), marker, color in zip(curves.items(), markers, colors,
                                        strict=False):
    same_as = next((other for other, other_ys in drawn.items()
                    if np.allclose(ys, other_ys, rtol=1e-3)), None)
    if same_as is None:
      ax.plot(xs, ys, '-', marker=marker, color=color, label=label)
    else:
      ax.plot(xs, ys, ':', marker=marker, color=color, markersize=4,
              linewidth=2.5, label=f'{label} (= {same_as})')
    drawn[label] = ys


def plot_state_vs_model(sizes, models, rank, path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(9, 5))
  curves = {}
  for spec in plotted_state_optimizers():
    r = rank if spec.uses_rank else None
    curves[spec.label] = [
        100 * sizes[spec.label, r, m] / sizes['optax.adamw', None, m]
        for m in models]
  draw_curves(ax, models, curves)
  ax.set_yscale('log')
  ax.set_xlabel('LLaMA model size (float32 parameters)')
  ax.set_ylabel('optimizer state, % of optax.adamw (log scale)')
  ax.set_title(f'Optimizer-state memory relative to AdamW, rank {rank}')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_state_vs_rank(sizes, model, ranks, path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(9, 5))
  curves = {
      spec.label: [sizes[spec.label, r if spec.uses_rank else None, model]
                   / GIB for r in ranks]
      for spec in plotted_state_optimizers()
  }
  draw_curves(ax, ranks, curves)
  ax.set_xscale('log', base=2)
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.set_xlabel('rank')
  ax.set_ylabel('optimizer state (GiB)')
  ax.set_title(f'Optimizer-state bytes vs rank, LLaMA-{model} shapes, float32')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_step_memory(results, model: llama.StepModel, path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = list(results)
  parts = {
      'parameters': [results[name].params for name in labels],
      'optimizer state': [results[name].opt_state for name in labels],
      'temporaries': [results[name].temp for name in labels],
      # Outputs that did not reuse a donated buffer, plus the tokens.
      'other (non-aliased outputs, batch)': [
          results[name].peak - results[name].persistent - results[name].temp
          for name in labels],
  }
  fig, ax = plt.subplots(figsize=(9, 5))
  bottom = np.zeros(len(labels))
  largest = max(m.peak for m in results.values()) / MIB
  for name, values in parts.items():
    values = np.asarray(values, float) / MIB
    if values.max() < 0.002 * largest:  # e.g. the tokens: invisible anyway
      continue
    ax.bar(labels, values, bottom=bottom, label=name)
    bottom += values
  for x, total in enumerate(bottom):
    ax.annotate(f'{total:,.0f}', (x, total), ha='center', va='bottom',
                fontsize=8)
  ax.margins(y=0.08)
  ax.set_ylabel('MiB')
  ax.set_title(f'Compiled train-step peak estimate, {model.name}, '
               f'rank {model.rank} ({jax.default_backend()})')
  plt.setp(ax.get_xticklabels(), rotation=20, ha='right')
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_peaks(results, path) -> None:
  """Peak GiB against model size, one line per optimizer, a panel per dtype."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  dtypes = sorted({jnp.dtype(m.dtype).name for m in results},
                  key=lambda name: -jnp.dtype(name).itemsize)
  fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5.5),
                           sharey=True, squeeze=False)
  for ax, dtype in zip(axes[0], dtypes, strict=True):
    models = [m for m in results if jnp.dtype(m.dtype).name == dtype]
    xs = [llama.parameter_count(m.params()) for m in models]
    curves = {label: [results[m][label].peak / GIB for m in models]
              for label in results[models[0]]}
    draw_curves(ax, xs, curves)
    for gb in memory_tables.ACCELERATOR_GB:
      usable = memory_tables.USABLE_FRACTION * gb
      ax.axhline(usable, color='grey', linestyle='--', linewidth=1)
      ax.annotate(f'{gb} GB ({usable:.1f} GiB usable)', (xs[0], usable),
                  fontsize=7, color='grey', va='bottom')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks(xs, [m.name.removeprefix('LLaMA-') for m in models])
    ax.minorticks_off()
    ax.set_xlabel('model (parameters, log scale)')
    ax.set_title(f'{dtype} parameters')
    ax.grid(True, which='both', alpha=0.3)
  axes[0][0].set_ylabel('peak estimate (GiB, log scale)')
  axes[0][-1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.suptitle('Compiled train-step peak, stacked + scanned + checkpointed, '
               f'batch 1 x {next(iter(results)).seq_len} '
               f'({jax.default_backend()})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_fused(rows, path) -> None:
  """Ordinary against fused peak, one panel per model and dtype."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  models = list(dict.fromkeys(row.model for row in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 5),
                           squeeze=False)
  for ax, model in zip(axes[0], models, strict=True):
    panel = [row for row in rows if row.model == model]
    unit, scale = ('GiB', GIB) if max(
        row.ordinary.peak for row in panel) >= GIB else ('MiB', MIB)
    xs = np.arange(len(panel))
    ax.bar(xs - 0.2, [row.ordinary.peak / scale for row in panel], 0.4,
           label='ordinary')
    bars = ax.bar(xs + 0.2, [row.fused.peak / scale for row in panel], 0.4,
                  label='fused')
    for bar, row in zip(bars, panel, strict=True):
      ax.annotate(f'{row.ratio:.2f}', (bar.get_x() + bar.get_width() / 2,
                                       bar.get_height()),
                  ha='center', va='bottom', fontsize=8)
    ax.set_xticks(xs, [row.label.removeprefix('flora_jax.')
                       .removeprefix('optax.') for row in panel])
    ax.set_ylabel(f'peak estimate ({unit})')
    ax.set_title(f'{model.name}, {jnp.dtype(model.dtype).name}')
    ax.margins(y=0.1)
    ax.grid(True, axis='y', alpha=0.3)
  axes[0][-1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.suptitle('Compiled train-step peak, ordinary vs fused per-layer '
               f'updates ({jax.default_backend()}); above the bars: saving '
               '/ ((L-1)/L x stack gradient)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# -------------------------------------------------------------------- main


def environment() -> str:
  """Versions and device, printed above the figures they produced."""
  device = jax.devices()[0]
  text = (
      f'jax {jax.__version__}, jaxlib {importlib.metadata.version("jaxlib")}, '
      f'optax {optax.__version__}, flora_jax {flora_jax.__version__}, '
      f'numpy {np.__version__}, Python {platform.python_version()}; '
      f'backend {jax.default_backend()}, device {device.device_kind} '
      f'x{jax.device_count()}, {os.cpu_count()} CPU cores'
  )
  # Scheduler flags change the compiled temporaries, so they are part of the
  # provenance of sections 2 to 4.
  if os.environ.get('XLA_FLAGS'):
    text += f'; XLA_FLAGS={os.environ["XLA_FLAGS"]}'
  return text + (
      '.\nSection 1 is shapes only (the same on any device); sections 2 to'
      " 4 are what this backend's compiler assigns.")


def require_matplotlib() -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise SystemExit(
        'The plots need matplotlib:'
        ' pip install -e . -e "./examples[benchmarks]".') from err
  matplotlib.use('Agg')  # files only; never needs a display


def section3_models(args) -> list[llama.StepModel]:
  """The models of section 3, float32 ones first."""
  if args.quick and not args.peak_models:
    return [QUICK_PEAK_MODEL]
  dtypes = QUICK_PEAK_DTYPES if args.quick else PEAK_DTYPES
  return [peak_step_model(model, dtype) for dtype in dtypes
          for model in args.peak_models or PEAK_MODELS]


def fused_step_models(args) -> list[llama.StepModel]:
  """The models of section 4: float32, then bfloat16 for FUSED_BF16_MODELS."""
  if args.quick and not args.fused_models:
    return [QUICK_FUSED_MODEL]
  names = args.fused_models or FUSED_MODELS
  models = [peak_step_model(name, jnp.float32) for name in names]
  if not args.quick:
    models += [peak_step_model(name, jnp.bfloat16) for name in names
               if name in FUSED_BF16_MODELS]
  return models


def fused_command(args) -> str:
  """The command line that reproduces section 4 alone."""
  command = 'python benchmarks/benchmark_memory.py --skip-step --skip-peak'
  if args.quick:
    command += ' --quick'
  if args.fused_models:
    command += ' --fused-models ' + ' '.join(args.fused_models)
  return command


def fused_section(args, emit) -> list[memory_tables.FusedComparison]:
  """Section 4: each optimizer's ordinary and fused step, and accumulation."""
  emit('## 4. Fused per-layer updates (`flora_jax.fused_train_step`), '
       'ordinary vs fused\n')
  emit(f'`{fused_command(args)}`\n')
  start = time.perf_counter()
  models = fused_step_models(args)
  acc_label, accumulating = memory_tables.accumulation_optimizer()
  rows, accumulation = [], []
  for model in models:
    name = f'{model.name} {jnp.dtype(model.dtype).name}'
    for label, optimizer in memory_tables.fused_optimizers(
        model.rank, args.quick).items():
      ordinary = llama.compile_step_memory(model, optimizer)
      fused = llama.compile_step_memory(model, optimizer, fused=True)
      rows.append(memory_tables.FusedComparison(model, label, ordinary,
                                                fused))
      print(f'  compiled {name} {label}: ordinary in '
            f'{ordinary.compile_seconds:.1f} s, fused in '
            f'{fused.compile_seconds:.1f} s', file=sys.stderr, flush=True)
    plain = next(row.fused for row in rows
                 if row.model == model and row.label == 'optax.adamw')
    accumulation.append(memory_tables.AccumulationComparison(
        model, plain,
        llama.compile_step_memory(model, accumulating, fused=True)))
    print(f'  compiled {name} fused {acc_label} in '
          f'{accumulation[-1].accumulating.compile_seconds:.1f} s',
          file=sys.stderr, flush=True)
  emit(memory_tables.fused_table(rows) + '\n')
  emit('Compressed gradient accumulation in the fused step, against the '
       'fused step without accumulation:\n')
  emit(memory_tables.accumulation_table(accumulation, acc_label) + '\n')
  emit(fused_notes(models) + '\n')
  emit(f'Section 4: {2 * len(rows) + len(accumulation)} compilations in '
       f'{time.perf_counter() - start:.1f} s.\n')
  return rows


def recipe_model(args, dtype) -> llama.StepModel:
  """Section 5's step: section 3's stacked, checkpointed step (or the quick
  fused model), queries taken in chunks."""
  if args.quick:
    return dataclasses.replace(QUICK_FUSED_MODEL, dtype=dtype,
                               query_chunk=QUICK_RECIPE_QUERY_CHUNK)
  return dataclasses.replace(peak_step_model(RECIPE_MODEL, dtype),
                             query_chunk=RECIPE_QUERY_CHUNK)


def recipe_section(args, emit) -> None:
  """Section 5: the baselines and the recipe, one table."""
  model = recipe_model(args, jnp.float32)
  emit(f'## 5. A {model.name} step in 24 GB\n')
  command = 'python benchmarks/benchmark_memory.py --only-recipe'
  emit(f'`{command}{" --quick" if args.quick else ""}`\n')
  start = time.perf_counter()
  rows = []
  for step in memory_tables.recipe_steps(model.rank, args.quick):
    model = recipe_model(args, step.dtype)
    memory = llama.compile_step_memory(model, step.optimizer,
                                       fused=step.fused)
    rows.append((step, memory))
    print(f'  compiled {model.name} {step.label} ({step.dtype.__name__}, '
          f'{"fused" if step.fused else "ordinary"}) in '
          f'{memory.compile_seconds:.1f} s', file=sys.stderr, flush=True)
  emit(memory_tables.recipe_table(rows) + '\n')
  emit(recipe_notes(model) + '\n')
  emit(f'Section 5: {len(rows)} compilations in '
       f'{time.perf_counter() - start:.1f} s.\n')


def recipe_notes(model: llama.StepModel) -> str:
  return f"""\
Notes on the 24 GB table:

* The step: {model.name}, layers stacked and scanned, each checkpointed,
  batch {model.batch} x {model.seq_len} tokens, rank {model.rank}, vocab
  {model.vocab}; the attention takes its queries {model.query_chunk} at a
  time (each chunk checkpointed), so the scores of all heads are never held
  whole: what flash attention does on an accelerator. Compiled for the CPU
  backend, never run: XLA's buffer assignment
  (`compile().memory_analysis()`), as in sections 2 to 4.
* "8-bit" is `flora_jax.quantize_state` (block-wise 8-bit codes of the
  large state leaves, 25.4% of float32); "stochastic" is
  `flora_jax.stochastic_rounding` last in the chain. The bfloat16 AdamW row
  keeps its moments in bfloat16 (optax's default: the parameters' dtype).
* The recipe (the last two rows): bfloat16 weights rounded
  stochastically, GaLore's or Flora's state in 8 bits (the embedding's and
  the head's full-size moments included), each layer updated inside the
  backward pass (`flora_jax.fused_train_step`).
* In an ordinary step the 8-bit state costs temporaries: XLA's CPU backend
  reads a reduction's input (the new state's block maxima) from memory,
  so the new moments of every coded leaf are held in float32 while they
  are coded (about 10 bytes per parameter for AdamW). The fused step codes
  one layer at a time.
* XLA's CPU backend has no bfloat16 slicing or in-place slice update: it
  widens them to float32, whole stacks at a time. The fused step reads and
  writes its stacks so that this costs nothing (`compat.read_layer`,
  `compat.write_layer`); an ordinary scanned step, in which `lax.scan`
  slices the stacks and stacks the gradients, pays for it in these CPU
  figures (in the bfloat16 "ordinary" rows)."""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='small sizes for CI: finishes in seconds')
  parser.add_argument('--out', type=pathlib.Path, default=None,
                      help='folder for the PNGs and memory.md (default '
                      'benchmarks/results, or benchmarks/results/quick)')
  parser.add_argument('--models', nargs='+',
                      choices=tuple(llama.LLAMA_SHAPES),
                      help='state table model sizes')
  parser.add_argument('--ranks', nargs='+', type=int,
                      help='state table ranks')
  parser.add_argument('--skip-step', action='store_true',
                      help='skip section 2 (the unrolled LLaMA-60M step)')
  parser.add_argument('--peak-models', nargs='+',
                      choices=tuple(llama.LLAMA_SHAPES),
                      help='section 3 model sizes (default 60M 350M 1B 7B; '
                      'a 2-layer model with --quick)')
  parser.add_argument('--skip-peak', action='store_true',
                      help='skip section 3 (the peak tables)')
  parser.add_argument('--fused-models', nargs='+',
                      choices=tuple(llama.LLAMA_SHAPES),
                      help='section 4 model sizes (default 60M 1B 7B, and 7B '
                      'in bfloat16; a 16-layer tiny model, AdamW only, with '
                      '--quick)')
  parser.add_argument('--skip-fused', action='store_true',
                      help='skip section 4 (ordinary vs fused step)')
  parser.add_argument('--skip-recipe', action='store_true',
                      help='skip section 5 (a LLaMA-7B step in 24 GB)')
  parser.add_argument('--only-recipe', action='store_true',
                      help='section 5 alone, to <out>/memory_recipe.md')
  args = parser.parse_args(argv)
  require_matplotlib()  # before minutes of work, not after
  # The tables include settings that project nothing on purpose (rank 512
  # at 60M): their rows say so; the warning would only repeat it.
  warnings.filterwarnings('ignore',
                          category=flora_jax.memory.LowCompressionWarning)

  models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
  ranks = tuple(sorted(
      args.ranks or (QUICK_RANKS if args.quick else FULL_RANKS)))
  out = args.out or pathlib.Path(__file__).parent / (
      'results/quick' if args.quick else 'results')
  out.mkdir(parents=True, exist_ok=True)
  step_model = QUICK_STEP_MODEL if args.quick else FULL_STEP_MODEL
  start = time.perf_counter()

  report = []

  def emit(text=''):
    print(text, flush=True)
    report.append(text)

  emit(f'# Memory benchmark{" (--quick)" if args.quick else ""}\n')
  emit(environment() + '\n')
  if args.only_recipe:
    recipe_section(args, emit)
    (out / 'memory_recipe.md').write_text('\n'.join(report) + '\n')
    print(f'Wrote {out / "memory_recipe.md"}')
    return

  emit('## 1. Optimizer-state bytes (`jax.eval_shape(tx.init, params)`)\n')
  specs = memory_tables.table_optimizers()
  sizes = memory_tables.measure_states(models, ranks, specs)
  emit(memory_tables.state_table(sizes, models, ranks, specs) + '\n')
  emit(STATE_NOTES + '\n')

  plot_rank = PLOT_RANK if PLOT_RANK in ranks else ranks[0]
  sweep_model = RANK_SWEEP_MODEL if RANK_SWEEP_MODEL in models else models[-1]
  pngs = [out / f'state_vs_model_size_rank{plot_rank}.png',
          out / f'state_vs_rank_{sweep_model}.png']
  plot_state_vs_model(sizes, models, plot_rank, pngs[0])
  plot_state_vs_rank(sizes, sweep_model, ranks, pngs[1])

  if not args.skip_step:
    emit('## 2. Compiled train-step memory '
         '(`jit(step).lower(...).compile().memory_analysis()`)\n')
    results = {}
    optimizers = memory_tables.step_optimizers(step_model.rank, args.quick)
    for label, optimizer in optimizers.items():
      results[label] = llama.compile_step_memory(step_model, optimizer)
      print(f'  compiled {label} in {results[label].compile_seconds:.1f} s',
            file=sys.stderr, flush=True)
    emit(memory_tables.step_table(results) + '\n')
    emit(step_notes(step_model) + '\n')
    pngs.append(out / 'train_step_memory.png')
    plot_step_memory(results, step_model, pngs[-1])

  if not args.skip_peak:
    emit('## 3. Compiled train-step peak, LLaMA-60M to 7B, stacked and '
         'scanned\n')
    peak_models = section3_models(args)
    peaks = {}
    for model in peak_models:
      peaks[model] = {}
      for label, optimizer in memory_tables.peak_optimizers(
          model.rank, args.quick).items():
        peaks[model][label] = llama.compile_step_memory(model, optimizer)
        print(f'  compiled {model.name} {jnp.dtype(model.dtype).name} '
              f'{label} in {peaks[model][label].compile_seconds:.1f} s',
              file=sys.stderr, flush=True)
      emit(peak_heading(model))
      emit(memory_tables.peak_table(peaks[model]) + '\n')
    emit(peak_notes(peak_models[0]) + '\n')
    pngs.append(out / 'train_step_peak.png')
    plot_peaks(peaks, pngs[-1])

  if not args.skip_fused:
    fused_rows = fused_section(args, emit)
    pngs.append(out / 'fused_step_peak.png')
    plot_fused(fused_rows, pngs[-1])

  if not args.skip_recipe:
    recipe_section(args, emit)

  emit(f'Wall time {time.perf_counter() - start:.1f} s.')
  (out / 'memory.md').write_text('\n'.join(report) + '\n')
  print('Wrote ' + ', '.join(str(p) for p in pngs + [out / 'memory.md']))


if __name__ == '__main__':
  main()
