"""Quickstart: Flora vs. AdamW on a tiny byte-level transformer.

Trains the same small decoder-only language model (same initialisation, same
batches) twice on CPU:

* ``adamw``: `optax.adamw`, which keeps two full-size moments per parameter;
* ``flora``: `flora_jax.flora`, i.e. Adafactor's factored second moment plus a
  momentum that, for each transformer weight matrix, is stored as a random
  ``rank x max(m, n)`` sketch and re-projected every ``kappa`` steps.

The corpus is the Python standard library's own ``.py`` sources, read from the
local installation, so nothing is downloaded. At the end a table compares the
training and held-out losses with the size of each optimizer's state. The
model, its loss, the batching and the jitted train step are in
``examples/flora_jax_examples/byte_lm.py``; the training loop is below.

Run::

  pip install -e . -e ./examples         # once: the library and the
                                         # examples' support package
  python examples/quickstart.py          # about 1-2 minutes on 2 CPU cores
  python examples/quickstart.py --quick  # smoke test (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flora_jax

try:
  # The model, its loss, the batching and the jitted train step.
  from flora_jax_examples import byte_lm
  from flora_jax_examples import datasets
  from tqdm.auto import tqdm  # a dependency of flora_jax_examples
except ImportError as err:  # the examples' own package, not the library's
  raise SystemExit(
      'The examples need their support package, flora_jax_examples:'
      ' pip install -e . -e ./examples'
  ) from err


# ----------------------------------------------------------- optimizers


def make_optimizers(args: argparse.Namespace):
  """The optimizers compared, and the rule of the leaves Flora projects."""
  # Only the transformer blocks' matrices get a compressed momentum: in a
  # model this small, sketching the byte embedding and the position table
  # as well costs almost 0.2 nats of loss to save another ~140 KiB.
  in_blocks = flora_jax.path_mask(byte_lm.in_blocks)
  rule = flora_jax.ProjectionRule(
      rank=args.rank, min_dim=args.min_dim, projection_mask=in_blocks
  )
  optimizers = {
      'adamw': optax.adamw(args.adamw_lr),
      'flora': flora_jax.flora(
          learning_rate=args.flora_lr,
          rank=args.rank,
          kappa=args.kappa,
          min_dim=args.min_dim,
          projection_mask=in_blocks,
          # Factor the second moment of every matrix, as Adafactor does for
          # large ones; the default threshold of 128 happens to match here.
          min_dim_size_to_factor=args.min_dim,
      ),
  }
  return optimizers, rule


# -------------------------------------------------------------- training


@dataclasses.dataclass
class Result:
  name: str
  train_loss: float
  val_loss: float
  state_bytes: int
  projected_state_bytes: int
  compile_seconds: float
  step_seconds: float


def abstract_params(cfg: byte_lm.ModelConfig):
  model = nnx.eval_shape(
      lambda: byte_lm.ByteTransformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.as_pure(nnx.state(model, nnx.Param))


def only_projected(rule: flora_jax.ProjectionRule, params):
  """``params`` with every leaf that Flora does not project removed."""
  return jax.tree.map(
      lambda plan, x: x if plan.projected else None, rule.plan(params), params
  )


def train(name: str, tx: optax.GradientTransformation,
          cfg: byte_lm.ModelConfig,
          rule: flora_jax.ProjectionRule, train_data: np.ndarray,
          val_batches: np.ndarray, args: argparse.Namespace) -> Result:
  # Same seed for every optimizer: identical initial weights and batches.
  model = byte_lm.ByteTransformer(cfg, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  losses = []
  batches = byte_lm.train_batches(
      train_data, args.steps, args.batch_size, cfg.seq_len, args.seed
  )
  start = time.perf_counter()
  with tqdm(batches, total=args.steps, desc=f'{name:>6}', unit='step',
            dynamic_ncols=True) as bar:
    for step, batch in enumerate(bar):
      losses.append(byte_lm.train_step(model, optimizer, jnp.asarray(batch)))
      # Reading a loss waits for the device; doing it only every few steps
      # lets JAX dispatch the next steps meanwhile.
      if step % 10 == 0 or step == args.steps - 1:
        bar.set_postfix(loss=f'{float(losses[-1]):.3f}')
      if step == 0:
        compiled = time.perf_counter()
  end = time.perf_counter()

  val_loss = np.mean(
      [float(byte_lm.eval_step(model, b)) for b in val_batches])
  projected = only_projected(rule, nnx.as_pure(nnx.state(model, nnx.Param)))
  return Result(
      name=name,
      train_loss=float(np.mean(jax.device_get(losses[-20:]))),
      val_loss=float(val_loss),
      state_bytes=flora_jax.memory.state_bytes(
          nnx.as_pure(optimizer.opt_state)),
      # The share of the state that belongs to the leaves Flora compresses,
      # sized from the state of an optimizer over those leaves alone.
      projected_state_bytes=flora_jax.memory.state_bytes(
          jax.eval_shape(tx.init, projected)
      ) if jax.tree.leaves(projected) else 0,
      compile_seconds=compiled - start,
      step_seconds=(end - compiled) / max(args.steps - 1, 1),
  )


# -------------------------------------------------------------- reporting


def kib(n: int) -> str:
  return f'{n / 1024:,.1f} KiB'


def ratio(n: int, base: int) -> str:
  return f'{n / base:.1%}' if base else 'n/a'  # n/a: nothing is projected


def describe_projection(rule: flora_jax.ProjectionRule, params) -> str:
  """One line per weight matrix: how Flora stores its momentum."""
  lines = []
  for (key_path, leaf), plan in zip(
      jax.tree.leaves_with_path(params), jax.tree.leaves(rule.plan(params))
  ):
    if leaf.ndim < 2:
      continue
    path = jax.tree_util.keystr(key_path, simple=True, separator='/')
    how = (f'sketch {plan.low_rank_shape}' if plan.projected
           else 'full momentum')
    lines.append(f'  {path:<28} {str(leaf.shape):<11} {how}')
  return '\n'.join(lines)


def print_report(results: list[Result], params, rule) -> None:
  base = results[0]
  header = (f'{"optimizer":<9} {"train loss":>10} {"val loss":>8}'
            f' {"val bits/B":>10} {"opt state":>12} {"vs adamw":>8}'
            f' {"projected":>11} {"vs adamw":>8} {"ms/step":>7}')
  print('\n' + header)
  print('-' * len(header))
  for r in results:
    print(f'{r.name:<9} {r.train_loss:>10.4f} {r.val_loss:>8.4f}'
          f' {r.val_loss / np.log(2):>10.3f} {kib(r.state_bytes):>12}'
          f' {ratio(r.state_bytes, base.state_bytes):>8}'
          f' {kib(r.projected_state_bytes):>11}'
          f' {ratio(r.projected_state_bytes, base.projected_state_bytes):>8}'
          f' {1000 * r.step_seconds:>7.0f}')

  param_bytes = flora_jax.memory.state_bytes(params)
  projected = only_projected(rule, params)
  projected_bytes = flora_jax.memory.state_bytes(projected)
  flora = results[-1]
  rest = flora.state_bytes - flora.projected_state_bytes
  print(
      f'\nParameters: {kib(param_bytes)}, {projected_bytes / param_bytes:.0%}'
      f' of them in the {len(jax.tree.leaves(projected))} block matrices that'
      ' Flora compresses; "projected" is the optimizer state of those alone.\n'
      'Losses in nats per byte. train: mean of the last 20 steps; val:'
      ' held-out files. ms/step excludes the first step (compilation: '
      + ', '.join(f'{r.name} {r.compile_seconds:.0f}s' for r in results)
      + ').'
  )
  print(
      'Note: the other leaves (byte embedding, position table, biases,'
      f' norms) keep full-size state and take {kib(rest)}'
      f' ({rest / flora.state_bytes:.0%}) of Flora\'s state here. In a'
      ' larger model the weight matrices dominate and the overall ratio'
      ' approaches the "projected" one.'
  )


# ------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--steps', type=int, default=300,
                      help='training steps per optimizer')
  parser.add_argument('--batch-size', type=int, default=16,
                      help='sequences per step')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the initial weights and the batches')
  parser.add_argument('--adamw-lr', type=float, default=2e-3,
                      help='learning rate of optax.adamw')
  parser.add_argument('--flora-lr', type=float, default=2e-3,
                      help='learning rate of flora_jax.flora')
  parser.add_argument('--rank', type=int, default=16,
                      help='rank of the compressed momentum')
  parser.add_argument('--kappa', type=int, default=100,
                      help='steps between re-drawn projections')
  parser.add_argument('--min-dim', type=int, default=64,
                      help='smallest matrix side that Flora compresses')
  parser.add_argument('--corpus-mb', type=float, default=4.0,
                      help='how much stdlib source to read')
  parser.add_argument('--quick', action='store_true',
                      help='a short smoke run, for CI')
  args = parser.parse_args()
  if args.quick:
    args.steps = min(args.steps, 30)
    args.batch_size = min(args.batch_size, 8)
    args.corpus_mb = min(args.corpus_mb, 1.0)
  if args.steps < 1 or args.batch_size < 1:
    parser.error('--steps and --batch-size must be positive.')
  return args


def main():
  args = parse_args()
  cfg = byte_lm.ModelConfig()

  corpus = datasets.stdlib_corpus(int(args.corpus_mb * 2**20))
  # The last files in sorted order are held out, not random windows: the
  # validation text is never seen in training.
  train_data, val_data = byte_lm.held_out_split(corpus)
  val_batches = byte_lm.eval_batches(
      val_data, 2 if args.quick else 8, 64, cfg.seq_len
  )
  print(f'Corpus: {len(corpus):,} bytes of Python stdlib source'
        f' ({len(train_data):,} train, {len(val_data):,} held out).')
  print(f'Training {args.steps} steps of {args.batch_size} x {cfg.seq_len}'
        ' bytes with each optimizer.\n')

  optimizers, rule = make_optimizers(args)
  params = abstract_params(cfg)
  print(f'adamw: learning rate {args.adamw_lr:g}. flora: learning rate'
        f' {args.flora_lr:g}, rank {args.rank}, kappa {args.kappa}; it stores'
        ' the momentum of the weight matrices as:')
  print(describe_projection(rule, params) + '\n')

  results = [
      train(name, tx, cfg, rule, train_data, val_batches, args)
      for name, tx in optimizers.items()
  ]
  print_report(results, params, rule)


if __name__ == '__main__':
  main()
