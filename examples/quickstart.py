"""Quickstart: Flora vs. AdamW on a tiny byte-level transformer.

Trains the same small decoder-only language model (same initialisation, same
batches) twice on CPU:

* ``adamw``: `optax.adamw`, which keeps two full-size moments per parameter;
* ``flora``: `flora_jax.flora`, Adafactor's factored second moment plus a
  momentum kept as a random ``rank x max(m, n)`` sketch for every weight
  matrix, re-projected every ``kappa`` steps.

The corpus is the Python standard library's own ``.py`` sources, read from the
local installation, so nothing is downloaded. At the end a table compares the
training and held-out losses with the size of each optimizer's state.

Run::

  python examples/quickstart.py          # about 1-2 minutes on 2 CPU cores
  python examples/quickstart.py --quick  # smoke test, about 15 seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flora_jax

try:
  from tqdm.auto import tqdm
except ImportError as err:  # tqdm is an optional dependency of the library.
  raise SystemExit(
      'This example needs tqdm: pip install "flora_jax[examples]" or tqdm.'
  ) from err


# ------------------------------------------------------------------- data


def load_stdlib_corpus(max_bytes: int) -> np.ndarray:
  """Concatenates the standard library's ``.py`` files as uint8 bytes.

  Files are visited in sorted order so that every run (and every optimizer)
  sees the same corpus. Third-party packages are skipped: they differ from
  one machine to the next.
  """
  root = sysconfig.get_paths()['stdlib']
  skip = {'site-packages', 'dist-packages', '__pycache__'}
  chunks, total = [], 0
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in skip)
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(directory, name), 'rb') as f:
          data = f.read(max_bytes - total)
      except OSError:
        continue
      chunks.append(data)
      total += len(data)
      if total >= max_bytes:
        break
    if total >= max_bytes:
      break
  if total == 0:
    raise FileNotFoundError(
        f'No readable .py files found under the standard library directory'
        f' {root!r}; this example needs a Python installation that ships'
        ' its sources.'
    )
  return np.frombuffer(b''.join(chunks), dtype=np.uint8)


def train_batches(data: np.ndarray, steps: int, batch_size: int,
                  seq_len: int, seed: int):
  """Yields ``steps`` batches of random windows, ``int32[batch, seq_len + 1]``."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  for _ in range(steps):
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    yield data[starts[:, None] + offsets].astype(np.int32)


def eval_batches(data: np.ndarray, num_batches: int, batch_size: int,
                 seq_len: int) -> list[np.ndarray]:
  """Evenly spaced, fixed windows of the held-out bytes."""
  count = num_batches * batch_size
  starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
  windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return list(windows.reshape(num_batches, batch_size, seq_len + 1))


# ------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256  # bytes
  seq_len: int = 128
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  d_mlp: int = 512


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # Separate square projections rather than a fused (d, 3d) or
    # nnx.MultiHeadAttention's (d, heads, head_dim) kernels: Flora projects the
    # last two axes of a leaf, so plain 2-D matrices are what it compresses.
    linear = lambda: nnx.Linear(
        cfg.d_model, cfg.d_model, use_bias=False, rngs=rngs
    )
    self.query, self.key, self.value, self.out = (
        linear(), linear(), linear(), linear()
    )
    self.num_heads = cfg.num_heads

  def __call__(self, x):
    batch, length, features = x.shape
    heads = lambda y: y.reshape(
        batch, length, self.num_heads, features // self.num_heads
    )
    y = jax.nn.dot_product_attention(
        heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
        is_causal=True,
    )
    return self.out(y.reshape(batch, length, features))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(cfg.d_model, cfg.d_mlp, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.d_mlp, cfg.d_model, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nnx.Module):
  """A tiny decoder-only language model over bytes, with tied embeddings."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs
    )
    self.position = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List(
        [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.final_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))


def loss_fn(model: ByteTransformer, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy, in nats."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]
  ).mean()


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, batch):
  return loss_fn(model, batch)


# -------------------------------------------------------------- training


@dataclasses.dataclass
class Result:
  name: str
  train_loss: float
  val_loss: float
  state_bytes: int
  matrix_state_bytes: int
  seconds: float


def is_matrix(leaf) -> bool:
  return getattr(leaf, 'ndim', 0) == 2


def matrix_state_bytes(tx: optax.GradientTransformation, params) -> int:
  """Optimizer-state bytes that belong to the 2-D (matrix) parameters."""
  # Dropping the other leaves (None is an empty subtree) and sizing the state
  # of what remains separates the matrices' share from the vectors'.
  matrices = jax.tree.map(lambda x: x if is_matrix(x) else None, params)
  return flora_jax.state_bytes(jax.eval_shape(tx.init, matrices))


def train(name: str, tx: optax.GradientTransformation, cfg: ModelConfig,
          train_data: np.ndarray, val_batches: list[np.ndarray],
          args: argparse.Namespace) -> Result:
  # Same seed for every optimizer: identical initial weights and batches.
  model = ByteTransformer(cfg, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  start = time.perf_counter()
  losses = []
  batches = train_batches(
      train_data, args.steps, args.batch_size, cfg.seq_len, args.seed
  )
  with tqdm(batches, total=args.steps, desc=f'{name:>6}', unit='step',
            dynamic_ncols=True) as bar:
    for step, batch in enumerate(bar):
      losses.append(train_step(model, optimizer, jnp.asarray(batch)))
      # Reading the loss waits for the device; doing it only every few steps
      # lets JAX queue the next step meanwhile.
      if step % 10 == 0 or step == args.steps - 1:
        bar.set_postfix(loss=f'{float(losses[-1]):.3f}')
  seconds = time.perf_counter() - start

  val_loss = np.mean([float(eval_step(model, b)) for b in val_batches])
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  return Result(
      name=name,
      train_loss=float(np.mean(jax.device_get(losses[-20:]))),
      val_loss=float(val_loss),
      state_bytes=flora_jax.state_bytes(nnx.as_pure(optimizer.opt_state)),
      matrix_state_bytes=matrix_state_bytes(tx, params),
      seconds=seconds,
  )


def describe_projection(cfg: ModelConfig, args: argparse.Namespace) -> str:
  """Which parameters get a compressed momentum, as Flora's rule decides."""
  params = nnx.as_pure(
      nnx.state(nnx.eval_shape(lambda: ByteTransformer(cfg, rngs=nnx.Rngs(0))),
                nnx.Param)
  )
  rule = flora_jax.ProjectionRule(rank=args.rank, min_dim=args.min_dim)
  lines = []
  for plan in jax.tree.leaves(rule.plan(params)):
    if len(plan.shape) < 2:
      continue
    how = (f'momentum {plan.low_rank_shape} (side {plan.side!r})'
           if plan.projected else 'not projected: full momentum')
    lines.append(f'  {plan.path:<40} {str(plan.shape):<11} {how}')
  return '\n'.join(lines)


def kib(n: int) -> str:
  return f'{n / 1024:,.1f} KiB'


def print_report(results: list[Result], param_bytes: int,
                 matrix_param_bytes: int) -> None:
  base = results[0]
  header = (f'{"optimizer":<10} {"train loss":>10} {"val loss":>9}'
            f' {"val bits/B":>10} {"opt state":>13} {"vs adamw":>8}'
            f' {"matrix state":>13} {"vs adamw":>8} {"time":>6}')
  print('\n' + header)
  print('-' * len(header))
  for r in results:
    print(f'{r.name:<10} {r.train_loss:>10.4f} {r.val_loss:>9.4f}'
          f' {r.val_loss / np.log(2):>10.3f} {kib(r.state_bytes):>13}'
          f' {r.state_bytes / base.state_bytes:>8.1%}'
          f' {kib(r.matrix_state_bytes):>13}'
          f' {r.matrix_state_bytes / base.matrix_state_bytes:>8.1%}'
          f' {r.seconds:>5.0f}s')
  print(f'\nParameters: {kib(param_bytes)}, of which 2-D matrices'
        f' {kib(matrix_param_bytes)} ({matrix_param_bytes / param_bytes:.0%}).')


# ------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--adamw-lr', type=float, default=3e-3)
  parser.add_argument('--flora-lr', type=float, default=2e-2)
  parser.add_argument('--rank', type=int, default=16,
                      help='rank of the compressed momentum')
  parser.add_argument('--kappa', type=int, default=100,
                      help='steps between re-drawn projections')
  parser.add_argument('--min-dim', type=int, default=64,
                      help='smallest matrix side that Flora compresses')
  parser.add_argument('--corpus-bytes', type=int, default=4 * 2**20)
  parser.add_argument('--quick', action='store_true',
                      help='a short smoke run (for CI)')
  args = parser.parse_args()
  if args.quick:
    args.steps = min(args.steps, 40)
    args.batch_size = min(args.batch_size, 16)
    args.corpus_bytes = min(args.corpus_bytes, 2**20)
  return args


def main():
  args = parse_args()
  cfg = ModelConfig()

  corpus = load_stdlib_corpus(args.corpus_bytes)
  split = int(len(corpus) * 0.95)  # the last files are held out
  train_data, val_data = corpus[:split], corpus[split:]
  val_batches = eval_batches(
      val_data, 2 if args.quick else 8, args.batch_size, cfg.seq_len
  )
  print(f'Corpus: {len(corpus):,} bytes of Python stdlib source'
        f' ({len(train_data):,} train / {len(val_data):,} validation).')
  print(f'Training {args.steps} steps of {args.batch_size} x {cfg.seq_len}'
        f' bytes with each optimizer.\n')
  print(f'Flora (rank {args.rank}, kappa {args.kappa},'
        f' min_dim {args.min_dim}) treats the weight matrices as:')
  print(describe_projection(cfg, args) + '\n')

  optimizers = {
      'adamw': optax.adamw(args.adamw_lr),
      'flora': flora_jax.flora(
          learning_rate=args.flora_lr,
          rank=args.rank,
          kappa=args.kappa,
          min_dim=args.min_dim,
          # Factor the second moment of every matrix here, as Adafactor does
          # for the large ones (the default 128 would also do for this model).
          min_dim_size_to_factor=args.min_dim,
      ),
  }
  results = [
      train(name, tx, cfg, train_data, val_batches, args)
      for name, tx in optimizers.items()
  ]

  params = nnx.as_pure(
      nnx.state(ByteTransformer(cfg, rngs=nnx.Rngs(args.seed)), nnx.Param)
  )
  param_bytes = flora_jax.state_bytes(params)
  matrix_param_bytes = flora_jax.state_bytes(
      [x for x in jax.tree.leaves(params) if is_matrix(x)]
  )
  print_report(results, param_bytes, matrix_param_bytes)


if __name__ == '__main__':
  main()
