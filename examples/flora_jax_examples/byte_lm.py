"""A tiny byte-level language model: the model of the LM examples.

The decoder-only transformer (its blocks unrolled, or stacked and scanned
for the fused step), its loss, the batching of a byte corpus and the
jitted train and eval steps that ``examples/quickstart.py``,
``examples/train_lm.py``, ``examples/train_sharded.py`` and
``benchmarks/benchmark_lm_quality.py`` share.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import numpy as np
import optax

import flora_jax
import flora_jax.nnx  # noqa: F401  (flora_jax.nnx.fused_train_step)

# ------------------------------------------------------------------- data


def train_batches(data: np.ndarray, steps: int, batch_size: int,
                  seq_len: int, seed: int):
  """Yields ``steps`` batches of random windows, ``int32[batch, seq_len + 1]``.

  The stream is a function of ``seed`` alone, so a run resumed at step ``s``
  that skips the first ``s`` batches sees what the uninterrupted run saw.
  """
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  for _ in range(steps):
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    yield data[starts[:, None] + offsets].astype(np.int32)


def eval_batches(data: np.ndarray, num_batches: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """Fixed, evenly spaced windows of the held-out bytes."""
  count = num_batches * batch_size
  starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
  windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return windows.reshape(num_batches, batch_size, seq_len + 1)


def held_out_split(corpus: np.ndarray, train_fraction: float = 0.95
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) bytes: the end of the corpus is held out.

  Not random windows: with the files in sorted order, the held-out text is
  never seen in training.
  """
  split = int(len(corpus) * train_fraction)
  return corpus[:split], corpus[split:]


# ------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256  # bytes
  seq_len: int = 64
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  d_mlp: int = 512


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with four ``(d, d)`` kernels."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # Four (d, d) kernels rather than nnx.MultiHeadAttention's
    # (d, heads, head_dim) ones: Flora compresses the last two axes of a
    # leaf, and (heads, head_dim) = (4, 32) is too small to be worth it.
    def linear():
      return nnx.Linear(cfg.d_model, cfg.d_model, use_bias=False, rngs=rngs)

    self.query, self.key, self.value, self.out = (
        linear(), linear(), linear(), linear()
    )
    self.num_heads = cfg.num_heads

  def __call__(self, x):
    batch, length, features = x.shape

    def heads(y):
      return y.reshape(batch, length, self.num_heads, -1)

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


class ScannedByteTransformer(nnx.Module):
  """`ByteTransformer` with its blocks stacked and scanned.

  The same model, its blocks stored as one `Block` whose parameters carry
  a leading layer axis (made with `nnx.vmap`) and run with `nnx.scan`: how
  large JAX models are written, and what `flora_jax.nnx.fused_train_step`
  trains (see `fused_train_step`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs
    )
    self.position = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d_model)))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = blocks(rngs)
    self.final_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def embed_tokens(self, tokens):
    """The blocks' input."""
    return self.embed(tokens) + self.position[: tokens.shape[1]]

  def logits(self, x):
    """The blocks' output to next-byte logits (tied embeddings)."""
    return self.embed.attend(self.final_norm(x))

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.logits(run(self.embed_tokens(tokens), self.blocks))


def in_blocks(path: str, leaf) -> bool:
  """Whether a parameter belongs to a transformer block.

  For `flora_jax.path_mask`: the examples project only the blocks'
  matrices, not the byte embedding or the position table.
  """
  del leaf
  return path.startswith('blocks/')


# ----------------------------------------------------------- train / eval


def loss_fn(model: ByteTransformer, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy, in nats."""
  return next_byte_loss(model(batch[:, :-1]), batch)


def next_byte_loss(logits: jax.Array, batch: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``logits`` against the batch's next bytes."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]
  ).mean()


# One function for every optimizer; nnx.jit compiles it once per optimizer.
@nnx.jit
def train_step(model, optimizer, batch):
  """One optimizer step on ``batch``, in place; returns the loss."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, batch):
  """The loss of ``batch``, without gradients."""
  return loss_fn(model, batch)


def fused_train_step(model: ScannedByteTransformer,
                     optimizer: nnx.Optimizer):
  """`train_step` for a `ScannedByteTransformer`, with fused updates.

  `flora_jax.nnx.fused_train_step`: the optimizer updates each block inside
  the backward pass, so the blocks' stacked gradient is never held.
  Returns ``step(model, optimizer, batch) -> loss``, in place.
  """
  step = flora_jax.nnx.fused_train_step(
      model, optimizer, stack='blocks',
      embed=lambda model, batch: model.embed_tokens(batch[:, :-1]),
      layer=lambda block, x, batch: block(x),
      head=lambda model, x, batch: next_byte_loss(model.logits(x), batch))
  return lambda model, optimizer, batch: step(model, optimizer, batch)['loss']
