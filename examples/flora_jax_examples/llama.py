"""A LLaMA-style decoder in plain JAX, and the memory of its train step.

The model of ``benchmarks/benchmark_memory.py``: LLaMA parameter trees of
the GaLore / Fira paper shapes (abstract: shapes and dtypes, nothing
allocated), the decoder's loss (RMSNorm, RoPE attention, SwiGLU), and the
compiled memory of one donated train step, read from XLA's buffer
assignment without running it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import flora_jax

# name: (d_model, ffn, layers); vocab 32000 (GaLore / Fira paper shapes).
LLAMA_SHAPES = {
    '60M': (512, 1376, 8),
    '130M': (768, 2048, 12),
    '350M': (1024, 2736, 24),
    '1B': (2048, 5461, 24),
    '7B': (4096, 11008, 32),
}
LLAMA_VOCAB = 32000
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class StepModel:
  """A LLaMA-style decoder and the batch of the compiled train step."""

  name: str
  d_model: int
  ffn: int
  layers: int
  vocab: int
  batch: int
  seq_len: int
  rank: int


# ------------------------------------------------------------ parameters


def llama_params(d_model: int, ffn: int, layers: int, vocab: int = LLAMA_VOCAB,
                 dtype: Any = jnp.float32) -> dict:
  """Abstract parameters of a LLaMA decoder in Flax ``(in, out)`` layout.

  Per layer: attention q, k, v, o (``d x d``), SwiGLU gate and up
  (``d x ffn``) and down (``ffn x d``), two RMSNorm weights; plus the token
  embedding, the final RMSNorm and an untied output head (``d x vocab``).
  One list entry per layer rather than a stacked ``(L, m, n)`` array, so
  the optimizers see the leaves a PyTorch LLaMA has.
  """
  def shape(*dims):
    return jax.ShapeDtypeStruct(dims, dtype)

  def layer():
    return {
        'attn': {name: shape(d_model, d_model) for name in 'qkvo'},
        'mlp': {'gate': shape(d_model, ffn), 'up': shape(d_model, ffn),
                'down': shape(ffn, d_model)},
        'attn_norm': shape(d_model),
        'mlp_norm': shape(d_model),
    }

  return {
      'embed': shape(vocab, d_model),
      'layers': [layer() for _ in range(layers)],
      'final_norm': shape(d_model),
      'lm_head': shape(d_model, vocab),
  }


def parameter_count(params) -> int:
  """The number of scalars in a (possibly abstract) parameter tree."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


# ------------------------------------------------------------- the model


def rms_norm(x, weight, eps=1e-6):
  """LLaMA's RMSNorm, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  normed = x32 * jax.lax.rsqrt(mean_square + eps)
  return (normed * weight).astype(x.dtype)


def rotary(x):
  """RoPE on ``(batch, seq, heads, head_dim)``, half-split convention."""
  seq, dim = x.shape[1], x.shape[-1]
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention(params, x):
  """Causal multi-head self-attention with RoPE, heads of 64."""
  batch, seq, d_model = x.shape
  heads = d_model // HEAD_DIM

  def split(t):
    return t.reshape(batch, seq, heads, HEAD_DIM)

  q = rotary(split(x @ params['q']))
  k = rotary(split(x @ params['k']))
  v = split(x @ params['v'])
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(HEAD_DIM)
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, seq, d_model)
  return out @ params['o']


def swiglu(params, x):
  """LLaMA's gated MLP: ``(silu(x W_gate) * x W_up) W_down``."""
  return (jax.nn.silu(x @ params['gate']) * (x @ params['up'])) @ params['down']


def lm_loss(params, tokens):
  """Mean next-token cross-entropy of a pre-norm LLaMA decoder."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = jnp.take(params['embed'], inputs, axis=0)
  for layer in params['layers']:
    x = x + attention(layer['attn'], rms_norm(x, layer['attn_norm']))
    x = x + swiglu(layer['mlp'], rms_norm(x, layer['mlp_norm']))
  logits = rms_norm(x, params['final_norm']) @ params['lm_head']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def train_step_fn(optimizer) -> Callable:
  """Forward, backward, optimizer update and parameter update, one call."""
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lm_loss)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes of one compiled train step, as XLA's buffer assignment gives them.

  Attributes:
    params: the parameters.
    opt_state: the optimizer state.
    argument: the inputs, i.e. parameters + optimizer state + tokens.
    output: new parameters + new optimizer state + the loss.
    alias: outputs written into donated inputs' buffers (counted in both of
      the above, but allocated once).
    temp: the packed peak of every intermediate buffer (activations kept for
      the backward pass, gradients, optimizer temporaries).
    compile_seconds: how long the compilation took.
  """

  params: int
  opt_state: int
  argument: int
  output: int
  alias: int
  temp: int
  compile_seconds: float

  @property
  def persistent(self) -> int:
    """What stays allocated between steps: parameters + optimizer state."""
    return self.params + self.opt_state

  @property
  def peak(self) -> int:
    """Arguments live for the whole call, outputs that could not reuse a
    donated buffer are fresh allocations, and temporaries come on top."""
    return self.argument + self.output - self.alias + self.temp


def compile_step_memory(model: StepModel, optimizer) -> StepMemory:
  """Compiles (never runs) one donated train step and reads XLA's sizes."""
  params = llama_params(model.d_model, model.ffn, model.layers, model.vocab)
  opt_state = jax.eval_shape(optimizer.init, params)
  tokens = jax.ShapeDtypeStruct((model.batch, model.seq_len + 1), jnp.int32)
  step = jax.jit(train_step_fn(optimizer), donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, tokens).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f'{jax.default_backend()} gives no memory_analysis()'
                       ' for compiled code.')
  return StepMemory(
      params=flora_jax.memory.state_bytes(params),
      opt_state=flora_jax.memory.state_bytes(opt_state),
      argument=stats.argument_size_in_bytes,
      output=stats.output_size_in_bytes,
      alias=stats.alias_size_in_bytes,
      temp=stats.temp_size_in_bytes,
      compile_seconds=seconds,
  )


