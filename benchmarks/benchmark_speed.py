"""Speed of Flora, GaLore, Fira and APOLLO against optax baselines, one process.

Every time is the median over interleaved rounds (one call of every
candidate per round, the order rotated from round to round, so that machine
noise hits all of them alike), after compilation. The tables:

1. Update time (``jax.jit(tx.update)``) on full LLaMA parameter trees of the
   GaLore / Fira paper shapes (`flora_jax_examples.llama.llama_params`:
   embedding, untied 32000-word head and norms included; default 60M and
   130M), rank 128. Optimizers with a periodic refresh are timed on a steady
   step and on a refresh step separately, from states whose counters are
   fixed (Flora resamples when ``count % kappa == 0, count > 0``, GaLore and
   Fira refit when ``count % T == 0``); amortized = steady + (refresh -
   steady) / period. APOLLO and APOLLO-Mini (rank 1 whatever the rank) draw
   their projection at every step, so every step is their steady one.
   For the gradient-accumulation wrappers, steady is the
   accumulate-only micro-step, refresh the emitting one and the period the
   micro-steps per update, so amortized is per micro-batch.
2. Flora's floor: what each Flora transform computes besides making its
   projectors, timed in the same rounds as the sum of separately compiled
   parts. For ``flora``: its chain without the momentum (``flora(b1=None)``:
   `optax.scale_by_factored_rms`, per-matrix RMS clipping, learning rate)
   plus, per projected leaf, one down-projection of the full-size update
   and one up-projection of the low-rank history, with the projectors
   precomputed and passed in (`flora_jax.projections.project_down` /
   ``project_up``; the leaves and sides from
   ``flora_jax.ProjectionRule(rank).plan(params)``), and the full momentum
   of the leaves that are not projected. Flora with ``store_projectors``
   (rows "stored projectors") has the same floor; with
   ``refresh_schedule='staggered'`` too, its resample row is the step that
   re-draws the most projector values, its steady row one that re-draws
   none (`staggered_counts`). Likewise for
   ``scale_by_flora_momentum`` + SGD, ``flora_compress`` + Adam (Adam, and
   ``up(down(g))``) and ``FloraMultiSteps`` (accumulate: ``acc + down(g)``
   and the zero updates; emit: AdamW, and ``up(acc + down(g)) / k``). Then
   flora against its floor leaf group by leaf group (attention, MLP in, MLP
   out, not projected) on the first size.
3. The published flora-opt 0.0.3 (``pip install flora-opt==0.0.3``), run
   through a small compatibility shim (see `load_flora_opt`) with flora's
   settings, when installed.
4. Compile time of each ``jax.jit(tx.update).lower(...).compile()``,
   measured once per candidate and size (also on the 1B tree, abstract
   shapes only: compiling allocates nothing), against optax.adafactor's.
5. Staggered refresh: GaLore and Fira with ``refresh_schedule='staggered'``
   (if this flora_jax has it), the worst step of a period against the
   steady step. Timing every step of a period costs one full round of SVDs
   per period, so this uses a short period T (``--stagger-period``, default
   8) on the first size, each step timed from the real state at that point
   of the period; ``mesh_refresh.py`` (6.) times T = 200.
6. With ``--mesh-refresh``: ``benchmarks/mesh_refresh.py`` (GaLore's refresh
   on a mesh of 8 simulated CPU devices), in a subprocess with its own
   ``XLA_FLAGS``; its table is printed as it comes.
7. The full train step (forward, backward, update; ``jax.jit`` with the
   parameters and state donated) of the LLaMA decoder of
   `flora_jax_examples.llama` at a realistic batch (default 16 x 512 tokens
   at 60M; the 32000-word head included) and at a tiny one (1 x 64), each
   optimizer against AdamW.
8. The official PyTorch GaLore and Fira against ``torch.optim.AdamW`` on the
   same parameters (first size), counters fixed the same way, when
   installed (``pip install -e ".[oracles]"``); one torch thread on a CPU.

Ratios, not absolute times, are the result: on a CPU the absolute times say
little about an accelerator. The script never fails on a timing; targets
are printed next to the ratios they concern.

SVDs on CPU: two OpenBLAS threads spinning on two cores make an SVD about
ten times slower, so the script sets ``OPENBLAS_NUM_THREADS=1`` (unless it
is already set) before numpy and jax load it. Timings on a shared machine
move with its load: the header and the footer print the load average.

Run::

  python benchmarks/benchmark_speed.py --quick   # CI smoke test, ~35 s
  python benchmarks/benchmark_speed.py           # ~45 min on 2 CPU cores,
                                                 # 20 of them 16 x 512 steps
  python benchmarks/benchmark_speed.py --sizes 60M --skip-train-step  # 13 min
  python benchmarks/benchmark_speed.py --only flora,galore --rounds 20
  python benchmarks/benchmark_speed.py --mesh-refresh  # adds ~4 min

On a GPU (JAX's default device is used; ``--gpu`` is the configuration for
one 80 GB accelerator, by estimate: update and compile tables at 350M and
1B, train steps of LLaMA-350M at 8 x 1024 and 1 x 64 tokens, 20 rounds;
the PyTorch peers on CUDA)::

  pip install -e . -e "./examples[benchmarks]" "jax[cuda12]"
  python benchmarks/benchmark_speed.py --gpu --out /tmp/speed_gpu

Markdown tables go to stdout and to ``<out>/speed.md``, the plot to
``<out>/speed.png`` (default ``benchmarks/results``, ``benchmarks/results/
quick`` with ``--quick``).
"""

# ruff: noqa: E402  (the environment is set before jax is imported)

from __future__ import annotations

import os

# Before numpy and jax load OpenBLAS (see the module docstring).
OPENBLAS_PRESET = os.environ.get('OPENBLAS_NUM_THREADS')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import math
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_jax
from flora_jax import projections
from flora_jax_examples import llama

LR = 1e-3
KAPPA = 1000  # Flora's resample period (the alias default)
GAP = 200  # GaLore / Fira update_proj_gap (the reference default)
MICRO_STEPS = 4  # micro-batches per update of the accumulation wrappers

# --quick's model: every kind of leaf (projected square and rectangular
# matrices, a too-elongated embedding and head, norms), compiled fast.
TINY = (128, 344, 1, 1024)  # d_model, ffn, layers, vocab
# --quick's candidates: one of each code path (refresh-free, resampling,
# accumulating, SVD-refreshing and APOLLO's scaling transforms, the momentum
# and accumulation floors, the flora-opt shim). Compiling, not running,
# takes --quick's time (APOLLO's update: about a second).
QUICK_ONLY = 'flora,flora_multisteps,galore,apollo,flora_opt'

ADAMW, ADAFACTOR = 'adamw', 'adafactor'
FLOOR_NOTE = (
    'A floor is the sum of the medians of separately compiled parts: the'
    ' base transform (for flora its chain without the momentum,'
    ' `flora(b1=None)`) and the products, per projected leaf one'
    ' down-projection of the full-size update and one up-projection of the'
    ' low-rank history with the projectors passed in (the full momentum of'
    ' the leaves that are not projected; for the accumulation wrapper'
    ' `acc + down(g)` and the zero updates, at the emitting step AdamW and'
    ' `up(acc + down(g)) / k`; for flora_compress Adam and `up(down(g))`).'
    ' The accumulation wrappers\' accumulate step is timed twice: as the'
    ' other rows, and with its state and gradients donated as in a training'
    ' loop (undonated, XLA must copy the inner optimizer\'s state into new'
    ' buffers at every micro-step: two copies of the parameters for AdamW).')
FLOOR_TARGET, COMPILE_TARGET, STAGGER_TARGET = 1.1, 3.0, 3.0


# ------------------------------------------------------------- parameters


def model_shape(size: str) -> tuple[int, int, int, int]:
  """``(d_model, ffn, layers, vocab)`` of a `llama.LLAMA_SHAPES` name."""
  if size == 'tiny':
    return TINY
  return (*llama.LLAMA_SHAPES[size], llama.LLAMA_VOCAB)


def abstract_params(size: str) -> dict:
  return llama.llama_params(*model_shape(size))


# Random values come from numpy: a jax.random draw compiles once per shape,
# seconds that --quick does not have.


def _normal(rng, shape, dtype, scale):
  return jnp.asarray((rng.standard_normal(shape, np.float32) * scale)
                     .astype(dtype))


def materialise(tree, seed: int = 0, scale: float = 0.02) -> Any:
  """Normal entries times ``scale`` for matrices, ones for norm weights."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: _normal(rng, leaf.shape, leaf.dtype, scale)
      if len(leaf.shape) >= 2 else jnp.ones(leaf.shape, leaf.dtype), tree)


def random_grads(params, seed: int = 1) -> Any:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: _normal(rng, p.shape, p.dtype, 1e-2), params)


def with_count(state, count: int):
  """``state`` with every step counter (a field named ``count``) set."""
  def set_count(path, leaf):
    last = path[-1] if path else None
    name = getattr(last, 'name', getattr(last, 'key', None))
    if name == 'count' and jnp.issubdtype(leaf.dtype, jnp.integer):
      return jnp.full_like(leaf, count)
    return leaf

  return jax.tree.map_with_path(set_count, state)


# ------------------------------------------------------------- candidates


@dataclasses.dataclass(frozen=True)
class Inputs:
  """One size's parameters, gradients, plans and projectors (for floors)."""

  params: Any
  grads: Any
  plans: Any  # ProjectionRule(rank).plan(params)
  projectors: Any  # a Gaussian Q per projected leaf, None for the others


# A floor: what a Flora transform computes besides making its projectors,
# as separately compiled parts (zero-argument calls); its time is the sum of
# theirs. {'floor': parts} bounds the steady and the resample step; an
# accumulation wrapper's 'floor' is its accumulate-only micro-step and
# 'floor_emit' its emitting step.
FloorParts = dict[str, list[Callable[[], Any]]]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """An optimizer under test.

  Attributes:
    key: its name for ``--only``.
    label: its name in the tables.
    make: rank -> a fresh transform (fresh: no two measurements share a
      compilation).
    period: steps per refresh (Flora's kappa, GaLore's T) or micro-steps per
      update (``accumulates``); None when every step is alike.
    accumulates: a MultiSteps-style wrapper: steady = accumulate-only
      micro-step, refresh = the emitting one.
    fitted: its refresh fits projectors (an SVD or range finder): timed in
      the slow group, with fewer rounds.
    floor: `Inputs` -> its `FloorParts`, or None.
    staggered: its resamples are spread over the period by hashed phases
      (Flora's ``refresh_schedule='staggered'``): steady is a step at which
      no slice re-draws, refresh the step that re-draws the most.
  """

  key: str
  label: str
  make: Callable[[int], Any]
  period: int | None = None
  accumulates: bool = False
  fitted: bool = False
  floor: Callable[[Inputs], FloorParts] | None = None
  staggered: bool = False


def candidates(flora_opt_module=None) -> list[Candidate]:
  """Every candidate; flora-opt's if its module is given."""
  def adamw():
    return optax.adamw(LR)

  out = [
      Candidate(ADAMW, 'optax.adamw', lambda r: adamw()),
      Candidate(ADAFACTOR, 'optax.adafactor', lambda r: optax.adafactor(LR)),
      Candidate('flora', f'flora_jax.flora (kappa {KAPPA})',
                lambda r: flora_jax.flora(LR, r, KAPPA), KAPPA,
                floor=flora_floor),
      Candidate('flora_stored', 'flora_jax.flora, stored projectors',
                lambda r: flora_jax.flora(LR, r, KAPPA,
                                          store_projectors=True),
                KAPPA, floor=flora_floor),
      Candidate('flora_staggered',
                'flora_jax.flora, stored projectors, staggered',
                lambda r: flora_jax.flora(LR, r, KAPPA, store_projectors=True,
                                          refresh_schedule='staggered'),
                KAPPA, floor=flora_floor, staggered=True),
      Candidate('flora_momentum', 'scale_by_flora_momentum + sgd',
                lambda r: optax.chain(
                    flora_jax.scale_by_flora_momentum(0.9, rule=r,
                                                      kappa=KAPPA),
                    optax.scale_by_learning_rate(LR)),
                KAPPA, floor=momentum_sgd_floor),
      Candidate('flora_compress', 'flora_compress + optax.adam',
                lambda r: optax.chain(flora_jax.flora_compress(r, kappa=KAPPA),
                                      optax.adam(LR)),
                KAPPA, floor=compress_floor),
      Candidate('flora_multisteps',
                f'FloraMultiSteps(adamw, {MICRO_STEPS})',
                lambda r: flora_jax.FloraMultiSteps(adamw(), MICRO_STEPS,
                                                    rule=r),
                MICRO_STEPS, accumulates=True, floor=accumulation_floor),
      Candidate('multisteps', f'optax.MultiSteps(adamw, {MICRO_STEPS})',
                lambda r: optax.MultiSteps(adamw(), MICRO_STEPS),
                MICRO_STEPS, accumulates=True),
      Candidate('galore', f'flora_jax.galore (T {GAP})',
                lambda r: flora_jax.galore(LR, r, GAP), GAP, fitted=True),
      Candidate('galore_randomized', 'flora_jax.galore, randomized',
                lambda r: flora_jax.galore(LR, r, GAP,
                                           projector='randomized'),
                GAP, fitted=True),
      Candidate('fira', 'flora_jax.fira', lambda r: flora_jax.fira(LR, r, GAP),
                GAP, fitted=True),
      # APOLLO draws its Gaussian projection from the key at every step (it
      # is never stored; the key changes every T), so every step is alike:
      # no refresh to time.
      Candidate('apollo', f'flora_jax.apollo (T {GAP})',
                lambda r: flora_jax.apollo(LR, r, GAP)),
      # The paper's rank 1 whatever --rank, one scale per matrix.
      Candidate('apollo_mini', 'flora_jax.apollo_mini (rank 1)',
                lambda r: flora_jax.apollo_mini(LR, 1, GAP)),
      Candidate('contrib_galore', 'optax.contrib.galore',
                lambda r: optax.contrib.galore(LR, rank=r,
                                               update_proj_gap=GAP),
                GAP, fitted=True),
  ]
  if flora_opt_module is not None:
    out.append(Candidate(
        'flora_opt', 'flora-opt 0.0.3 (optax)',
        lambda r: flora_opt_transform(flora_opt_module, r), KAPPA))
  return out


# ------------------------------------------------------------------ floors


def projector_tree(plans, seed: int = 7) -> Any:
  """A Gaussian ``N(0, 1/r)`` projector per projected leaf, else None."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda plan: _normal(rng, plan.projector_shape, jnp.float32,
                           plan.rank ** -0.5) if plan.projected else None,
      plans)


def low_rank_zeros(plans) -> Any:
  return jax.tree.map(lambda plan: jnp.zeros(plan.low_rank_shape), plans)


def _down(plan, q, x):
  return projections.project_down(q, x, plan.side) if plan.projected else x


def _up(plan, q, c):
  return projections.project_up(q, c, plan.side) if plan.projected else c


def _call(fn, *args):
  """A zero-argument call of ``jax.jit(fn)`` on ``args``."""
  return functools.partial(jax.jit(fn), *args)


def _update(tx, x: Inputs):
  """A call of ``tx``'s update on the gradients, from its initial state."""
  return _call(tx.update, x.grads, tx.init(x.params), x.params)


def momentum_products(plans, updates, history, qs, b1=0.9):
  """Per projected leaf ``down(u)`` and ``up(C)``, the bare products; the
  full momentum ``b1 C + (1 - b1) u`` of the leaves that are not projected.
  """
  return jax.tree.map(
      lambda plan, u, c, q: (_down(plan, q, u), _up(plan, q, c))
      if plan.projected else b1 * c + (1 - b1) * u,
      plans, updates, history, qs)


def _momentum(x: Inputs):
  return _call(functools.partial(momentum_products, x.plans), x.grads,
               low_rank_zeros(x.plans), x.projectors)


def flora_floor(x: Inputs) -> FloorParts:
  """``flora(b1=None)`` (its chain without the momentum) + the momentum."""
  return {'floor': [_update(flora_jax.flora(LR, b1=None), x), _momentum(x)]}


def momentum_sgd_floor(x: Inputs) -> FloorParts:
  return {'floor': [_update(optax.scale_by_learning_rate(LR), x),
                    _momentum(x)]}


def compress_products(plans, grads, qs):
  """``up(down(g))`` per projected leaf."""
  return jax.tree.map(
      lambda plan, g, q: _up(plan, q, _down(plan, q, g))
      if plan.projected else None, plans, grads, qs)


def compress_floor(x: Inputs) -> FloorParts:
  """Adam + the compression's products."""
  products = functools.partial(compress_products, x.plans)
  return {'floor': [_update(optax.adam(LR), x),
                    _call(products, x.grads, x.projectors)]}


def accumulate_products(plans, grads, acc, qs):
  """``acc + down(g)`` per leaf (``acc + g`` unprojected), and the zero
  updates a MultiSteps wrapper returns mid-cycle."""
  return (jax.tree.map(jnp.zeros_like, grads),
          jax.tree.map(lambda plan, g, a, q: a + _down(plan, q, g),
                       plans, grads, acc, qs))


def decompress_products(plans, grads, acc, qs):
  """The emitting step's mean, ``up(acc + down(g)) / k`` per leaf."""
  return jax.tree.map(
      lambda plan, g, a, q: _up(plan, q, a + _down(plan, q, g)) / MICRO_STEPS,
      plans, grads, acc, qs)


def accumulation_floor(x: Inputs) -> FloorParts:
  """Accumulate: its products; emit: AdamW + the decompression."""
  acc = low_rank_zeros(x.plans)
  accumulate = functools.partial(accumulate_products, x.plans)
  decompress = functools.partial(decompress_products, x.plans)
  return {'floor': [_call(accumulate, x.grads, acc, x.projectors)],
          'floor_emit': [_update(optax.adamw(LR), x),
                         _call(decompress, x.grads, acc, x.projectors)]}


# --------------------------------------------------------------- flora-opt


# Names flora-opt 0.0.3 calls that jax 0.6 removed; see `legacy_jax_names`.
LEGACY_JAX = {
    'tree_map': jax.tree.map,
    'tree_leaves': jax.tree.leaves,
    'tree_flatten': jax.tree.flatten,
    'tree_structure': jax.tree.structure,
    'tree_unflatten': jax.tree.unflatten,
}


@contextlib.contextmanager
def legacy_jax_names():
  """Compatibility shim: ``jax.tree_map`` & co. for the duration of a call.

  flora-opt 0.0.3 was written for jax < 0.6 and calls these at trace time.
  They are aliases of today's ``jax.tree`` functions, added only while its
  code runs, so that nothing else in this process ever sees them.
  """
  added = [name for name in LEGACY_JAX if not hasattr(jax, name)]
  for name in added:
    setattr(jax, name, LEGACY_JAX[name])
  try:
    yield
  finally:
    for name in added:
      delattr(jax, name)


def _with_legacy_names(fn):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with legacy_jax_names():
      return fn(*args, **kwargs)
  return wrapped


def load_flora_opt(rank: int) -> tuple[Any, str]:
  """flora-opt's optax module and a line about it, or None and why not.

  Compatibility shim for its import, undone afterwards: it imports
  ``optax._src.clipping`` (removed from optax; a stand-in module provides
  ``clip_by_block_rms``, the one function it uses) and, with torch
  installed, its PyTorch half, which needs ``accelerate`` and loads
  bitsandbytes; that half is blocked (it is not benchmarked), so the import
  takes its own "PyTorch dependencies are not installed" path.
  """
  try:
    version = importlib.metadata.version('flora-opt')
  except importlib.metadata.PackageNotFoundError:
    return None, ('flora-opt: not installed (pip install flora-opt==0.0.3,'
                  ' or -e "./examples[benchmarks]").')
  clipping = types.ModuleType('optax._src.clipping')
  clipping.clip_by_block_rms = optax.clip_by_block_rms  # pyright: ignore
  stand_ins = {'optax._src.clipping': clipping,
               'flora_opt.optimizers.torch.flora': None}
  saved = {name: sys.modules.get(name) for name in stand_ins}
  sys.modules.update(stand_ins)
  try:
    with legacy_jax_names():
      module = importlib.import_module('flora_opt.optimizers.optax')
  except Exception as err:  # pylint: disable=broad-except
    return None, (f'flora-opt {version}: cannot run here, its import fails'
                  f' ({type(err).__name__}: {err}).')
  finally:
    for name, previous in saved.items():
      if previous is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = previous
  return module, (
      f'flora-opt {version} (optax half) runs through a compatibility shim:'
      ' jax.tree_map & co. aliased to jax.tree.* while its code traces, and'
      ' a stand-in optax._src.clipping at import. Settings as flora_jax.flora:'
      f' tau (rank) {rank}, kappa {KAPPA}, b1 0.9, factored second moment'
      ' with decay_rate 0.8 (its b2), eps 1e-30, clipping 1.0, no parameter'
      ' scaling. What cannot be matched: its momentum is bfloat16'
      ' (hard-coded; float32 here), it resamples at count 0 too, moves the'
      ' momentum with the old projection on both sides, and keeps one PRNG'
      ' key per leaf in its state.')


def flora_opt_transform(module, rank: int) -> optax.GradientTransformation:
  """flora-opt's Flora with `flora_jax.flora`'s settings (see above)."""
  tx = module.flora(
      LR, b1=0.9, b2=0.8, tau=rank, seed=0, kappa=KAPPA,
      clipping_threshold=1.0, multiply_by_parameter_scale=False,
      weight_decay=None, eps=1e-30, min_dim_size_to_factor=128,
      factorized_second_moment=True)
  return optax.GradientTransformation(_with_legacy_names(tx.init),
                                      _with_legacy_names(tx.update))


# ------------------------------------------------------------------ timing


def interleaved_medians(calls: dict[Any, Callable[[], Any]], rounds: int,
                        warmup: bool = True) -> dict[Any, float]:
  """Median seconds of each call over ``rounds`` interleaved rounds.

  Each round calls every candidate once, starting one further along the
  list than the round before, so that no candidate always runs right
  after the same neighbour.
  """
  names = list(calls)
  if warmup:
    for name in names:
      jax.block_until_ready(calls[name]())
  times = {name: [] for name in names}
  for i in range(rounds):
    shift = i % max(len(names), 1)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def timed_compile(fn, *args):
  """``(compiled, seconds)`` of ``jax.jit(fn).lower(*args).compile()``."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


# --------------------------------------------------------------- 1, 2, 4


@dataclasses.dataclass
class UpdateTimes:
  """One size's update measurements; times in seconds."""

  size: str
  steady: dict[str, float]
  refresh: dict[str, float]
  floor: dict[str, float]
  floor_emit: dict[str, float]
  compile: dict[str, float]
  # Accumulation wrappers: the accumulate step with its state and gradients
  # donated (`donated_accumulate`).
  donated: dict[str, float] = dataclasses.field(default_factory=dict)

  def amortized(self, c: Candidate) -> float:
    if c.key not in self.refresh:
      return self.steady[c.key]
    return (self.steady[c.key]
            + (self.refresh[c.key] - self.steady[c.key]) / c.period)


def staggered_counts(plans, period: int) -> tuple[int, int]:
  """Flora's staggered schedule: a count re-drawing nothing, and the count
  re-drawing the most projector values (`flora_jax` hashes the phases)."""
  drawn = collections.Counter()
  for plan in jax.tree.leaves(plans):
    if plan.projected:
      phases = projections.resample_phases(plan.path, plan.batch_shape,
                                           period)
      for phase in np.asarray(phases).reshape(-1).tolist():
        drawn[phase] += math.prod(plan.projector_shape[-2:])
  quiet = next(p for p in range(1, period) if p not in drawn)
  busiest = max(drawn, key=drawn.__getitem__)
  return period + quiet, period + busiest


def phase_states(c: Candidate, update, state, grads, params, plans):
  """The steady state and the refresh (or emitting) state, counters fixed."""
  if c.accumulates:
    steady = with_count(state, 1)  # mini_step 0: accumulate only
    emit = steady._replace(
        mini_step=jnp.asarray(c.period - 1, steady.mini_step.dtype))
    return steady, emit
  # One update from init: GaLore's projectors fitted, momenta non-zero.
  _, state = update(grads, state, params)
  if c.staggered:
    quiet, busiest = staggered_counts(plans, c.period)
    return with_count(state, quiet), with_count(state, busiest)
  steady = with_count(state, 1)
  return steady, with_count(state, c.period) if c.period else None


def measure_updates(size: str, cands: Sequence[Candidate], rank: int,
                    rounds: int, slow_rounds: int) -> UpdateTimes:
  x = size_inputs(size, rank)
  params, grads = x.params, x.grads
  # (candidate, phase, part) -> call; a floor's time is its parts' sum.
  fast, slow, compile_s = {}, {}, {}
  for c in cands:
    tx = c.make(rank)
    state = tx.init(params)
    update, compile_s[c.key] = timed_compile(tx.update, grads, state, params)
    steady, refresh = phase_states(c, update, state, grads, params,
                                   x.plans)
    fast[c.key, 'steady', 0] = functools.partial(update, grads, steady,
                                                 params)
    if c.accumulates and c.floor:
      fast[c.key, 'donated', 0] = donated_accumulate(tx, grads, steady,
                                                     params)
    if refresh is not None:
      group = slow if c.fitted else fast
      group[c.key, 'refresh', 0] = functools.partial(update, grads, refresh,
                                                     params)
    for phase, parts in (c.floor(x) if c.floor else {}).items():
      for i, part in enumerate(parts):
        fast[c.key, phase, i] = part
    print(f'  [{size}] compiled {c.key} in {compile_s[c.key]:.1f} s',
          file=sys.stderr, flush=True)
  times = interleaved_medians(fast, rounds)
  # Each refresh state has run once already (`phase_states`, count 0).
  times.update(interleaved_medians(slow, slow_rounds, warmup=False))
  by_phase = {phase: {} for phase in ('steady', 'refresh', 'floor',
                                      'floor_emit', 'donated')}
  for (key, phase, _), t in times.items():
    by_phase[phase][key] = by_phase[phase].get(key, 0.0) + t
  return UpdateTimes(size, compile=compile_s, **by_phase)


def donated_accumulate(tx, grads, steady, params) -> Callable[[], Any]:
  """The accumulate step as a training loop runs it: state donated.

  Undonated, the step must return the inner optimizer's state (AdamW: two
  copies of the parameters) in new buffers, and XLA copies it at every
  micro-step, as for `optax.MultiSteps`. The gradients are donated too: a
  donated state alone would lend its buffers to the zero updates, which
  come first among the outputs. Each call's zero updates are the next
  call's gradients (the same arithmetic as any values), ``mini_step``
  reset to accumulate again.
  """
  update = jax.jit(tx.update, donate_argnums=(0, 1))
  holder = [jax.tree.map(jnp.copy, grads), jax.tree.map(jnp.copy, steady)]

  def call():
    updates, state = update(*holder, params)
    holder[:] = [updates,
                 state._replace(mini_step=jnp.zeros_like(state.mini_step))]
    return updates

  return call


def size_inputs(size: str, rank: int) -> Inputs:
  params = materialise(abstract_params(size))
  plans = flora_jax.ProjectionRule(rank).plan(params)
  return Inputs(params, random_grads(params), plans, projector_tree(plans))


def compile_abstract(size: str, cands: Sequence[Candidate],
                     rank: int) -> dict[str, float]:
  """Compile seconds of each update on abstract shapes (nothing allocated)."""
  params = abstract_params(size)
  seconds = {}
  for c in cands:
    tx = c.make(rank)
    state = jax.eval_shape(tx.init, params)
    _, seconds[c.key] = timed_compile(tx.update, params, state, params)
    print(f'  [{size}, abstract] compiled {c.key} in {seconds[c.key]:.1f} s',
          file=sys.stderr, flush=True)
  return seconds


def warm_up_compiler() -> None:
  """One throwaway compilation: the first one in a process pays extra."""
  params = materialise(abstract_params('tiny'))
  tx = optax.sgd(LR)
  timed_compile(tx.update, params, tx.init(params), params)


# Leaf groups of the per-group comparison: (label, test on the key path).
LEAF_GROUPS = (
    ('attention q, k, v, o (d x d)', lambda path: "['attn']" in path),
    ('MLP gate, up (d x ffn)',
     lambda path: "['gate']" in path or "['up']" in path),
    ('MLP down (ffn x d)', lambda path: "['down']" in path),
    ('embedding, head, norms (not projected)',
     lambda path: not any(s in path for s in ("['attn']", "['mlp']"))),
)


def measure_groups(size: str, rank: int, rounds: int,
                   groups=LEAF_GROUPS) -> list[dict]:
  """Flora against its floor, one leaf group at a time.

  Per group, a flat tree of just its leaves: flora's steady and resample
  updates and the two parts of its floor, the chain without the momentum
  (``flora(b1=None)``) and the momentum's products.
  """
  whole = size_inputs(size, rank)
  all_p, all_g = flat_leaves(whole.params), flat_leaves(whole.grads)
  calls, rows = {}, []
  for label, belongs in groups:
    p = {k: v for k, v in all_p.items() if belongs(k)}
    g = {k: all_g[k] for k in p}
    plans = flora_jax.ProjectionRule(rank).plan(p)
    x = Inputs(p, g, plans, projector_tree(plans))
    tx = flora_jax.flora(LR, rank, KAPPA)
    update = jax.jit(tx.update)
    _, state = update(g, tx.init(p), p)
    calls[label, 'steady'] = functools.partial(update, g, with_count(state, 1),
                                               p)
    calls[label, 'resample'] = functools.partial(
        update, g, with_count(state, KAPPA), p)
    calls[label, 'base'], calls[label, 'products'] = flora_floor(x)['floor']
    rows.append({
        'label': label, 'leaves': len(p),
        'values': sum(v.size for v in p.values()),
        'projected': sum(plan.projected for plan in jax.tree.leaves(plans)),
    })
  times = interleaved_medians(calls, rounds)
  for row in rows:
    row.update({phase: times[row['label'], phase]
                for phase in ('steady', 'resample', 'base', 'products')})
    row['floor'] = row['base'] + row['products']
  return rows


def flat_leaves(tree) -> dict[str, Any]:
  """``{key path: leaf}``."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------- 5


def measure_staggered(size: str, rank: int, period: int, rounds: int,
                      keys: Sequence[str]) -> tuple[list[dict] | None, str]:
  """GaLore / Fira with a staggered refresh, each step of one period."""
  try:
    flora_jax.galore(LR, rank, period, refresh_schedule='staggered')
  except TypeError as err:
    return None, (f"not available: this flora_jax has no refresh_schedule"
                  f" ({err}).")
  params = materialise(abstract_params(size))
  grads = random_grads(params)
  calls, rows = {}, []
  aliases = {'galore': flora_jax.galore, 'fira': flora_jax.fira}
  for name, alias in aliases.items():
    if name not in keys:
      continue
    name = f'flora_jax.{name}'
    plain = alias(LR, rank, period)
    update = jax.jit(plain.update)
    _, state = update(grads, plain.init(params), params)
    calls[name, 'steady'] = functools.partial(
        update, grads, with_count(state, period + 1), params)
    calls[name, 'refresh'] = functools.partial(
        update, grads, with_count(state, 2 * period), params)
    staggered = alias(LR, rank, period, refresh_schedule='staggered')
    update = jax.jit(staggered.update)
    # The real states at each step of the second period, when every matrix
    # has had its first fit, whatever the schedule. What decides a step's
    # work is in their integer leaves (counters, phases); the arrays are
    # shared with the first (the full-size moments of the embedding and
    # head would otherwise be kept once per step).
    state = staggered.init(params)
    for step in range(2 * period):
      if step == period:
        first = state
      if step >= period:
        calls[name, step % period] = functools.partial(
            update, grads, integers_of(state, first), params)
      _, state = update(grads, state, params)
    rows.append({'name': name})
  print(f'  [{size}] staggered: timing {len(calls)} states',
        file=sys.stderr, flush=True)
  # Every state has run once: the plain ones at count 0, the staggered
  # ones on the way to the next.
  times = interleaved_medians(calls, rounds, warmup=False)
  for row in rows:
    steps = {j: times[row['name'], j] for j in range(period)}
    worst = max(steps, key=steps.get)
    row.update(steady=times[row['name'], 'steady'],
               refresh=times[row['name'], 'refresh'],
               worst=steps[worst], worst_at=worst,
               mean=statistics.mean(steps.values()))
  return rows, ''


def integers_of(state, reference):
  """``reference`` with the integer leaves of ``state``."""
  return jax.tree.map(
      lambda leaf, ref: leaf if jnp.issubdtype(leaf.dtype, jnp.integer)
      else ref, state, reference)


# --------------------------------------------------------------------- 6


MESH_ENV = {
    'XLA_FLAGS': '--xla_force_host_platform_device_count=8'
                 ' --xla_cpu_enable_concurrency_optimized_scheduler=false',
    'OPENBLAS_NUM_THREADS': '1',
}


def mesh_refresh(size: str, emit) -> None:
  """Runs ``mesh_refresh.py`` (another process: 8 devices) and prints it."""
  script = pathlib.Path(__file__).with_name('mesh_refresh.py')
  if not script.exists():
    emit(f'Skipped: {script.name} not found next to this script.\n')
    return
  command = [sys.executable, str(script)]
  if size in llama.LLAMA_SHAPES:
    command += ['--size', size]
  env = dict(os.environ, **MESH_ENV)
  shown = ' '.join([f'{k}={v!r}' for k, v in MESH_ENV.items()]
                   + ['python', f'benchmarks/{script.name}'] + command[2:])
  emit(f'`{shown}`:\n')
  result = subprocess.run(command, env=env, text=True, capture_output=True,
                          check=False)
  emit(result.stdout.rstrip() + '\n')
  if result.returncode:
    emit(f'{script.name} exited with status {result.returncode}:\n```\n'
         f'{result.stderr[-3000:]}\n```\n')


# --------------------------------------------------------------------- 7


def measure_train_steps(size: str, batches: Sequence[tuple[int, int]],
                        cands: Sequence[Candidate], rank: int,
                        rounds: Sequence[int]) -> dict:
  """Seconds per donated train step, ``{(batch, seq): {key: seconds}}``.

  Each optimizer keeps its own parameters and state through all batches.
  The first call of the first batch (not timed) fits GaLore's projectors;
  the counters then advance from 1, short of any refresh. The accumulation
  wrappers are timed on their accumulate-only micro-step (``mini_step``
  reset before each call); their emitting step is in the update table.
  """
  vocab = model_shape(size)[3]
  initial, live = materialise(abstract_params(size)), {}
  for c in cands:  # each its own copy: the step donates it
    params = jax.tree.map(jnp.copy, initial)
    live[c.key] = [params, c.make(rank).init(params)]
  del initial
  results = {}
  for i, (batch, seq) in enumerate(batches):
    tokens = jnp.asarray(np.random.default_rng(3).integers(
        0, vocab, (batch, seq + 1), np.int32))
    calls = {}
    for c in cands:
      tx = c.make(rank)
      step = jax.jit(llama.train_step_fn(tx), donate_argnums=(0, 1))
      step = step.lower(*live[c.key], tokens).compile()
      calls[c.key] = functools.partial(_donated_call, step, live[c.key],
                                       tokens, c.accumulates)
      print(f'  [{size} {batch}x{seq}] compiled the step of {c.key}',
            file=sys.stderr, flush=True)
    # The first batch warms up; a larger one's first call is a round.
    results[batch, seq] = interleaved_medians(calls, rounds[i],
                                              warmup=i == 0)
  return results


def _donated_call(step, holder: list, tokens, accumulates: bool):
  params, state = holder
  if accumulates:
    state = state._replace(mini_step=jnp.zeros_like(state.mini_step))
  holder[0], holder[1], loss = step(params, state, tokens)
  return loss


# --------------------------------------------------------------------- 8


def measure_torch(size: str, rank: int, rounds: int,
                  slow_rounds: int) -> tuple[dict | None, str]:
  """Official GaLore / Fira and torch AdamW steps on the same parameters.

  Same fixed-counter method: each optimizer's per-parameter ``step`` is set
  to 1 (steady) or T (refresh) before the step.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import galore_torch  # pylint: disable=g-import-not-at-top
    import fira  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    return None, f'not installed ({err.name}); pip install -e ".[oracles]"'
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device == 'cpu':
    # One thread, like OpenBLAS: OpenMP threads spinning at barriers on a
    # shared or small machine make small steps tens of times slower.
    torch.set_num_threads(1)
  torch.manual_seed(0)
  params = abstract_params(size)
  plans = jax.tree.leaves(flora_jax.ProjectionRule(rank).plan(params))

  def make(name):
    # PyTorch layout (out, in): the transpose of the (in, out) kernels.
    tensors = [torch.nn.Parameter(
        torch.randn(*reversed(plan.shape), device=device) * 0.02)
        for plan in plans]
    for t in tensors:
      t.grad = torch.randn_like(t) * 1e-2
    if name == 'adamw':
      return torch.optim.AdamW(tensors, lr=LR), []
    projected = [t for t, plan in zip(tensors, plans, strict=True)
                 if plan.projected]
    rest = [t for t, plan in zip(tensors, plans, strict=True)
            if not plan.projected]
    group = {'params': projected, 'rank': rank, 'update_proj_gap': GAP,
             'scale': 0.25, 'alpha': 0.25, 'proj_type': 'std'}
    cls = {'galore': galore_torch.GaLoreAdamW, 'fira': fira.FiraAdamW}[name]
    return cls([group, {'params': rest}], lr=LR,
               no_deprecation_warning=True), tensors

  opts = {name: make(name) for name in ('adamw', 'galore', 'fira')}

  def step(name, count):
    opt, tensors = opts[name]
    for t in tensors:
      if t in opt.state:
        opt.state[t]['step'] = count
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  for name in opts:  # the first step fits the projectors
    step(name, 0)
  steady = interleaved_medians(
      {name: functools.partial(step, name, 1) for name in opts}, rounds,
      warmup=False)
  refresh = interleaved_medians(
      {name: functools.partial(step, name, GAP) for name in ('galore', 'fira')},
      slow_rounds, warmup=False)
  threads = torch.get_num_threads()
  about = (f'torch {torch.__version__} on {device},'
           f' {threads} thread{"s" * (threads != 1)}')
  return {'steady': steady, 'refresh': refresh}, about


# ------------------------------------------------------------------ report


def ms(seconds: float) -> str:
  return f'{1e3 * seconds:.1f}' if seconds < 10 else f'{1e3 * seconds:.0f}'


def fmt_ratio(ratio: float) -> str:
  return f'{ratio:.2f}x' if ratio < 10 else f'{ratio:.1f}x'


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def update_table(t: UpdateTimes, cands: Sequence[Candidate]) -> str:
  base = t.steady[ADAMW]
  rows = []
  for c in cands:
    refreshes = c.key in t.refresh
    rows.append([
        c.label, ms(t.steady[c.key]),
        ms(t.refresh[c.key]) if refreshes else '–',
        str(c.period) if refreshes else '–',
        ms(t.amortized(c)), fmt_ratio(t.steady[c.key] / base),
        fmt_ratio(t.refresh[c.key] / base) if refreshes else '–',
        fmt_ratio(t.amortized(c) / base)])
  return table(['optimizer', 'steady ms', 'refresh ms', 'period',
                'amortized ms', 'steady / AdamW', 'refresh / AdamW',
                'amortized / AdamW'], rows)


def floor_table(t: UpdateTimes, cands: Sequence[Candidate]) -> str:
  """A row per Flora transform and step: its time against its floor."""
  rows = []

  def row(label, step, floor, got):
    rows.append([label, step, ms(floor), ms(got), fmt_ratio(got / floor)])

  for c in cands:
    if c.key not in t.floor:
      continue
    if c.accumulates:
      row(c.label, 'accumulate', t.floor[c.key], t.steady[c.key])
      row(c.label, 'accumulate, state donated', t.floor[c.key],
          t.donated[c.key])
      row(c.label, 'emit', t.floor_emit[c.key], t.refresh[c.key])
    else:
      row(c.label, 'steady', t.floor[c.key], t.steady[c.key])
      row(c.label, 'resample', t.floor[c.key], t.refresh[c.key])
  if 'flora_opt' in t.steady and 'flora' in t.floor:
    label = "flora-opt 0.0.3, against flora_jax.flora's floor"
    row(label, 'steady', t.floor['flora'], t.steady['flora_opt'])
    row(label, 'resample', t.floor['flora'], t.refresh['flora_opt'])
  return table(['optimizer', 'step', 'floor ms', 'time ms',
                f'time / floor (target ≤ {FLOOR_TARGET}x)'], rows)


def group_table(rows: Sequence[dict]) -> str:
  out = []
  for r in rows:
    out.append([
        r['label'], f"{r['leaves']} ({r['projected']} projected)",
        f"{r['values'] / 1e6:.1f}M", ms(r['base']), ms(r['products']),
        ms(r['floor']), ms(r['steady']), fmt_ratio(r['steady'] / r['floor']),
        ms(r['steady'] - r['floor']), ms(r['resample']),
        fmt_ratio(r['resample'] / r['floor'])])
  return table(['leaf group', 'leaves', 'values', 'base ms', 'products ms',
                'floor ms', 'flora steady ms', 'steady / floor',
                'steady - floor ms', 'flora resample ms', 'resample / floor'],
               out)


def flora_opt_table(updates: dict[str, UpdateTimes],
                    cands: Sequence[Candidate]) -> str:
  """flora-opt against flora_jax.flora, size by size."""
  if not any(c.key == 'flora' for c in cands):
    return ''
  rows = []
  for size, t in updates.items():
    for phase, got in (('steady', t.steady), ('resample', t.refresh)):
      rows.append([size, phase, ms(got['flora']), ms(got['flora_opt']),
                   fmt_ratio(got['flora_opt'] / got['flora'])])
    rows.append([size, 'compile', f"{t.compile['flora']:.2f} s",
                 f"{t.compile['flora_opt']:.2f} s",
                 fmt_ratio(t.compile['flora_opt'] / t.compile['flora'])])
  return table(['size', 'update', 'flora_jax.flora ms', 'flora-opt ms',
                'flora-opt / flora_jax'], rows)


def compile_table(columns: dict[str, dict[str, float]],
                  cands: Sequence[Candidate]) -> str:
  header = ['optimizer']
  for name in columns:
    header += [f'{name} s',
               f'{name} / adafactor (target ≤ {COMPILE_TARGET}x)']
  rows = []
  for c in cands:
    row = [c.label]
    for seconds in columns.values():
      row += [f'{seconds[c.key]:.2f}',
              fmt_ratio(seconds[c.key] / seconds[ADAFACTOR])]
    rows.append(row)
  return table(header, rows)


def staggered_table(rows: Sequence[dict], period: int) -> str:
  out = [[
      r['name'], ms(r['steady']), ms(r['refresh']),
      fmt_ratio(r['refresh'] / r['steady']),
      f"{ms(r['worst'])} (count % T = {r['worst_at']})", ms(r['mean']),
      fmt_ratio(r['worst'] / r['steady'])] for r in rows]
  return table([f'optimizer (T = {period})', 'steady ms',
                'usual refresh step ms', 'usual refresh / steady',
                'staggered: worst step ms', 'staggered: mean over T ms',
                f'staggered worst / steady (target ≤ {STAGGER_TARGET}x)'],
               out)


def train_table(results: dict, cands: Sequence[Candidate],
                updates: UpdateTimes | None) -> str:
  header, columns = ['optimizer'], list(results)
  for batch, seq in columns:
    header += [f'{batch}x{seq} step ms', f'{batch}x{seq} / AdamW']
  if updates is not None:
    batch, seq = columns[-1]
    header.append(f'{batch}x{seq} amortized / AdamW')
  rows = []
  for c in cands:
    row = [c.label]
    for key in columns:
      row += [ms(results[key][c.key]),
              fmt_ratio(results[key][c.key] / results[key][ADAMW])]
    if updates is not None:
      # The step's refresh (or emit) cost, from the update table.
      extra = updates.amortized(c) - updates.steady[c.key]
      row.append(fmt_ratio((results[columns[-1]][c.key] + extra)
                   / results[columns[-1]][ADAMW]))
    rows.append(row)
  return table(header, rows)


def torch_table(result: dict) -> str:
  steady, refresh = result['steady'], result['refresh']
  base = steady['adamw']
  rows = [['torch.optim.AdamW', ms(base), '1.00x', '–', '–']]
  for name, label in (('galore', 'galore_torch.GaLoreAdamW'),
                      ('fira', 'fira.FiraAdamW')):
    amortized = steady[name] + (refresh[name] - steady[name]) / GAP
    rows.append([label, ms(steady[name]), fmt_ratio(steady[name] / base),
                 fmt_ratio(refresh[name] / base), fmt_ratio(amortized / base)])
  return table(['optimizer (PyTorch)', 'steady ms', 'steady / AdamW',
                'refresh / AdamW', 'amortized / AdamW'], rows)


def plot(updates: UpdateTimes, train: dict | None,
         cands: Sequence[Candidate], out: pathlib.Path) -> str:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return '(no plot: pip install -e . -e "./examples[benchmarks]")'
  base = updates.steady[ADAMW]
  bars = {f'update, amortized ({updates.size})':
          [updates.amortized(c) / base for c in cands]}
  if train:
    (batch, seq), times = list(train.items())[-1]
    bars[f'train step ({batch}x{seq})'] = [
        times.get(c.key, float('nan')) / times[ADAMW] for c in cands]
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(bars)
  for i, (label, values) in enumerate(bars.items()):
    ax.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(cands))],
           values, width, label=label)
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set_xticks(range(len(cands)), [c.label for c in cands], rotation=30,
                ha='right', fontsize=8)
  ax.set_ylabel('time / AdamW')
  ax.legend()
  fig.tight_layout()
  path = out / 'speed.png'
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return f'plot: {path}'


def environment() -> str:
  device = jax.devices()[0]
  threads = os.environ['OPENBLAS_NUM_THREADS']
  how = ('set by this script' if OPENBLAS_PRESET is None
         else 'from the environment')
  load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
  text = (
      f'jax {jax.__version__}, jaxlib {importlib.metadata.version("jaxlib")},'
      f' optax {optax.__version__}, flora_jax {flora_jax.__version__},'
      f' Python {platform.python_version()}; backend {jax.default_backend()},'
      f' device {device.device_kind} x{jax.device_count()},'
      f' {os.cpu_count()} CPU cores; OPENBLAS_NUM_THREADS={threads} ({how}:'
      ' two OpenBLAS threads spinning on two cores make an SVD ~10x slower);'
      f' load average at start {load}')
  if os.environ.get('XLA_FLAGS'):
    text += f'; XLA_FLAGS={os.environ["XLA_FLAGS"]}'
  return text + '.'


# -------------------------------------------------------------------- main


def parse_batch(text: str) -> tuple[int, int]:
  batch, seq = text.lower().split('x')
  return int(batch), int(seq)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='CI smoke test: tiny shapes, rank 16, few rounds,'
                      ' fewer candidates (overrides the size and round'
                      ' options)')
  parser.add_argument('--gpu', action='store_true',
                      help='the GPU configuration (see the module docstring)')
  parser.add_argument('--sizes', default='60M,130M',
                      help='LLaMA sizes of the update tables')
  parser.add_argument('--compile-sizes', default='1B',
                      help='extra sizes compiled on abstract shapes only'
                      ' ("" for none)')
  parser.add_argument('--rank', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=10,
                      help='rounds of the steady steps, floors and 1x64 steps')
  parser.add_argument('--slow-rounds', type=int, default=3,
                      help='rounds of the SVD refresh steps')
  parser.add_argument('--only', default='',
                      help='comma-separated candidate keys (adamw and'
                      ' adafactor, the units, are always in): '
                      + ','.join(c.key for c in candidates()) + ',flora_opt')
  parser.add_argument('--stagger-period', type=int, default=8,
                      help='T of the staggered-refresh table (0: skip it)')
  parser.add_argument('--mesh-refresh', action='store_true',
                      help='run benchmarks/mesh_refresh.py on 8 simulated'
                      ' CPU devices (a subprocess)')
  parser.add_argument('--skip-train-step', action='store_true')
  parser.add_argument('--train-size', default='60M')
  parser.add_argument('--train-batch', type=parse_batch, default=(16, 512),
                      help='realistic batch, BATCHxSEQ')
  parser.add_argument('--tiny-batch', type=parse_batch, default=(1, 64),
                      help='tiny batch, BATCHxSEQ')
  parser.add_argument('--train-rounds', type=int, default=3,
                      help='rounds of the realistic-batch steps')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--out', type=pathlib.Path, default=None,
                      help='where speed.md and speed.png go')
  args = parser.parse_args(argv)
  if args.gpu:
    args.sizes, args.compile_sizes, args.train_size = '350M,1B', '', '350M'
    args.train_batch, args.rounds = (8, 1024), 20
  if args.quick:
    args.sizes, args.compile_sizes, args.train_size = 'tiny', '', 'tiny'
    args.rank, args.rounds, args.slow_rounds = 16, 3, 2
    args.stagger_period, args.train_rounds = 2, 2
    args.train_batch, args.tiny_batch = (2, 32), (1, 16)
  if args.quick and not args.only:
    args.only = QUICK_ONLY
  known = {c.key for c in candidates()} | {'flora_opt'}
  unknown = set(args.only.split(',')) - known - {''}
  if unknown:
    parser.error(f'--only: no candidate {", ".join(sorted(unknown))}')
  args.sizes = [s for s in args.sizes.split(',') if s]
  args.compile_sizes = [s for s in args.compile_sizes.split(',') if s]
  args.out = args.out or pathlib.Path(__file__).parent / (
      'results/quick' if args.quick else 'results')
  return args


def select(cands: Sequence[Candidate], only: str) -> list[Candidate]:
  """The candidates named in ``only`` (all if empty), and the units."""
  if not only:
    return list(cands)
  wanted = {ADAMW, ADAFACTOR} | set(only.split(','))
  return [c for c in cands if c.key in wanted]


# --quick compiles with LLVM's optimizations off: half the compile time
# (most of --quick's), and its figures only smoke-test the code paths.
QUICK_XLA_FLAG = '--xla_backend_optimization_level=0'


class Report:
  """Markdown to stdout and to ``speed.md``; progress lines to stderr."""

  def __init__(self):
    self.lines = []
    self.start = time.perf_counter()

  def __call__(self, text: str = '') -> None:
    if text.startswith('#'):
      print(f'[{time.perf_counter() - self.start:.0f} s, CPU'
            f' {time.process_time():.0f} s]', file=sys.stderr)
    print(text, flush=True)
    self.lines.append(text)

  def write(self, path: pathlib.Path) -> None:
    path.write_text('\n'.join(self.lines) + '\n')
    print(f'Wrote {path}')


def section_updates(args, cands, emit) -> dict[str, UpdateTimes]:
  updates = {}
  for size in args.sizes:
    d, ffn, layers, vocab = model_shape(size)
    n = llama.parameter_count(abstract_params(size))
    emit(f'## 1. Update time, LLaMA-{size} (d {d}, ffn {ffn}, {layers}'
         f' layers, vocab {vocab}: {n / 1e6:.1f}M parameters)\n')
    updates[size] = t = measure_updates(size, cands, args.rank, args.rounds,
                                        args.slow_rounds)
    emit(update_table(t, cands))
    emit('Period: kappa (Flora), T (GaLore, Fira) or the micro-steps per'
         ' update (MultiSteps rows: steady = accumulate-only micro-step,'
         ' refresh = the emitting step, amortized per micro-batch).\n')
    if {'galore', 'fira'} <= t.steady.keys():
      emit(f"Fira's steady step / GaLore's:"
           f" {t.steady['fira'] / t.steady['galore']:.2f}x (target ≤ 1.2x).\n")
    emit(f'## 2. Flora against its floor, LLaMA-{size}\n')
    emit(floor_table(t, cands))
    emit(FLOOR_NOTE + '\n')
  return updates


def section_groups(args, cands, emit) -> None:
  if not any(c.key == 'flora' for c in cands):
    return
  size = args.sizes[0]
  emit(f'### Flora against its floor by leaf group, LLaMA-{size}\n')
  groups = LEAF_GROUPS[:1] if args.quick else LEAF_GROUPS
  emit(group_table(measure_groups(size, args.rank, args.rounds, groups)))
  emit("base: flora(b1=None), the chain without the momentum; products: the"
       ' momentum with the projectors given (`momentum_products`); floor ='
       ' base + products, as above.\n')


def section_flora_opt(note, updates, cands, emit) -> None:
  emit('## 3. The published flora-opt 0.0.3\n')
  emit(note + '\n')
  if any(c.key == 'flora_opt' for c in cands):
    emit(flora_opt_table(updates, cands))


def section_compile(args, cands, updates, emit) -> None:
  emit('## 4. Compile time of the jitted update\n')
  columns = {size: updates[size].compile for size in args.sizes}
  for size in args.compile_sizes:
    columns[f'{size} (abstract)'] = compile_abstract(size, cands, args.rank)
  emit(compile_table(columns, cands))
  emit('Wall time of `jax.jit(tx.update).lower(grads, state,'
       ' params).compile()`, once per candidate and size, each transform'
       ' built afresh.\n')


def section_staggered(args, cands, emit) -> None:
  keys = [c.key for c in cands if c.key in ('galore', 'fira')]
  if not keys or not args.stagger_period:
    return
  size, period = args.sizes[0], args.stagger_period
  emit(f'## 5. Staggered refresh, LLaMA-{size}\n')
  rows, why = measure_staggered(size, args.rank, period, args.slow_rounds,
                                keys)
  if rows is None:
    emit(f"refresh_schedule='staggered': {why}\n")
    return
  emit(staggered_table(rows, period))
  emit(f'T = {period} here, not {GAP}: a round over a whole period of SVD'
       ' steps would take too long on a CPU. Each step of the second period'
       ' is timed from the real state at that step. With a longer T fewer'
       ' matrices share a step, so the worst step is lower.\n')


def section_mesh(args, emit) -> None:
  emit('## 6. Refresh on a mesh of 8 simulated CPU devices\n')
  mesh_refresh(args.sizes[0], emit)


def section_train(args, cands, updates, emit) -> dict:
  size = args.train_size
  emit(f'## 7. Train step (forward, backward, update), LLaMA-{size}\n')
  train_cands, batches = cands, [args.tiny_batch, args.train_batch]
  if args.quick:  # every code path, fewer compilations
    train_cands = [c for c in cands if c.key in (ADAMW, 'flora_multisteps')]
    batches = batches[1:]
  train = measure_train_steps(size, batches, train_cands, args.rank,
                              [args.rounds, args.train_rounds])
  emit(train_table(train, train_cands, updates.get(size)))
  emit(f'Steady steps, medians of {args.rounds} (first batch) and'
       f' {args.train_rounds} rounds; `jax.jit(step, donate_argnums=(0,'
       " 1))`. The amortized column adds each optimizer's refresh cost per"
       f' step from the update table of {size} when there is one.'
       ' Accumulation wrappers: the accumulate-only micro-step.\n')
  return train


def section_torch(args, emit) -> None:
  size = args.sizes[0]
  emit(f'## 8. The official PyTorch GaLore and Fira, LLaMA-{size}\n')
  result, about = measure_torch(size, args.rank, args.rounds,
                                args.slow_rounds)
  emit(about + '\n')
  if result:
    emit(torch_table(result))


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.quick:  # read when the CPU backend starts, at the first operation
    flags = os.environ.get('XLA_FLAGS', '')
    if 'xla_backend_optimization_level' not in flags:
      os.environ['XLA_FLAGS'] = f'{flags} {QUICK_XLA_FLAG}'.strip()
  args.out.mkdir(parents=True, exist_ok=True)
  # At 60M the embedding and head, which no rule projects, hold most values:
  # the tables say what is projected; the warning would only repeat it.
  warnings.filterwarnings('ignore',
                          category=flora_jax.memory.LowCompressionWarning)
  emit = Report()
  emit(f'# Speed benchmark{" (--quick)" if args.quick else ""}\n')
  emit(environment() + '\n')
  flora_opt, flora_opt_note = load_flora_opt(args.rank)
  cands = select(candidates(flora_opt), args.only)
  emit(f'Rank {args.rank}; medians of {args.rounds} interleaved rounds'
       f' ({args.slow_rounds} for the SVD refresh steps) after compilation.'
       + (f' --quick: tiny shapes, compiled with {QUICK_XLA_FLAG}; a smoke'
          ' test of every code path, not a result.' if args.quick else '')
       + '\n')
  warm_up_compiler()

  updates = section_updates(args, cands, emit)
  section_groups(args, cands, emit)
  section_flora_opt(flora_opt_note, updates, cands, emit)
  section_compile(args, cands, updates, emit)
  section_staggered(args, cands, emit)
  if args.mesh_refresh:
    section_mesh(args, emit)
  train = None
  if not args.skip_train_step:
    train = section_train(args, cands, updates, emit)
  if not args.no_torch and any(c.key in ('galore', 'fira') for c in cands):
    section_torch(args, emit)

  emit(plot(updates[args.sizes[0]], train, cands, args.out))
  load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
  emit(f'\nWall time {time.perf_counter() - emit.start:.0f} s; load average'
       f' at the end {load}.')
  emit.write(args.out / 'speed.md')


if __name__ == '__main__':
  main()
