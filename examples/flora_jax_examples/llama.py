"""A LLaMA-style decoder in plain JAX, and the memory of its train step.

The model of ``benchmarks/benchmark_memory.py``: LLaMA parameter trees of
the GaLore / Fira paper shapes (abstract: shapes and dtypes, nothing
allocated), the decoder's loss (RMSNorm, RoPE attention, SwiGLU), and the
compiled memory of one donated train step, read from XLA's buffer
assignment without running it.

Two layouts of the same model: one entry per layer (a list, the leaves a
PyTorch LLaMA has, the layers unrolled) or the layers stacked into leaves
with a leading layer axis and run with `jax.lax.scan`, as large JAX models
are written; either optionally with activation checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
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
  dtype: Any = jnp.float32  # parameters and compute
  stacked: bool = False  # layers stacked and scanned, see `llama_params`
  remat: bool = False  # activation checkpointing, see `lm_loss`
  query_chunk: int | None = None  # memory-efficient attention, `attention`

  def params(self) -> dict:
    """The model's abstract parameters."""
    return llama_params(self.d_model, self.ffn, self.layers, self.vocab,
                        self.dtype, self.stacked)


# ------------------------------------------------------------ parameters


def llama_params(d_model: int, ffn: int, layers: int, vocab: int = LLAMA_VOCAB,
                 dtype: Any = jnp.float32, stacked: bool = False) -> dict:
  """Abstract parameters of a LLaMA decoder in Flax ``(in, out)`` layout.

  Per layer: attention q, k, v, o (``d x d``), SwiGLU gate and up
  (``d x ffn``) and down (``ffn x d``), two RMSNorm weights; plus the token
  embedding, the final RMSNorm and an untied output head (``d x vocab``).
  By default one list entry per layer, the leaves a PyTorch LLaMA has; with
  ``stacked`` one dict whose leaves carry a leading layer axis,
  ``(layers, m, n)`` and ``(layers, d)``, for `jax.lax.scan`.
  """
  def shape(*dims):
    return jax.ShapeDtypeStruct(dims, dtype)

  def layer(*lead):
    return {
        'attn': {name: shape(*lead, d_model, d_model) for name in 'qkvo'},
        'mlp': {'gate': shape(*lead, d_model, ffn),
                'up': shape(*lead, d_model, ffn),
                'down': shape(*lead, ffn, d_model)},
        'attn_norm': shape(*lead, d_model),
        'mlp_norm': shape(*lead, d_model),
    }

  return {
      'embed': shape(vocab, d_model),
      'layers': layer(layers) if stacked else [layer() for _ in range(layers)],
      'final_norm': shape(d_model),
      'lm_head': shape(d_model, vocab),
  }


def stack_layers(params: dict) -> dict:
  """The same parameters with the per-layer list stacked along a new axis 0."""
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params['layers'])
  return {**params, 'layers': stacked}


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
  """RoPE on ``(batch, seq, heads, head_dim)``, half-split convention.

  The rotation is computed in float32 and the result cast back to ``x``'s
  dtype.
  """
  seq, dim = x.shape[1], x.shape[-1]
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]
  return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def attention(params, x, query_chunk: int | None = None):
  """Causal multi-head self-attention with RoPE, heads of 64.

  Scores and softmax in float32 whatever the compute dtype. With
  ``query_chunk`` the queries are taken that many at a time, each chunk
  checkpointed (memory-efficient attention, Rabe & Staats 2021): the
  ``(heads, seq, seq)`` scores are never held whole, in the forward or the
  backward pass — the role flash attention plays on accelerators. Same
  result.
  """
  batch, seq, d_model = x.shape
  heads = d_model // HEAD_DIM

  def split(t):
    return t.reshape(batch, seq, heads, HEAD_DIM)

  q = rotary(split(x @ params['q']))
  k = rotary(split(x @ params['k']))
  v = split(x @ params['v'])

  def attend(q, first):
    """Queries ``first, first + 1, ...`` against every key."""
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(HEAD_DIM)
    causal = (first + jnp.arange(q.shape[1]))[:, None] >= jnp.arange(seq)
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v)

  if query_chunk is None or query_chunk >= seq:
    out = attend(q, 0)
  else:
    if seq % query_chunk:
      raise ValueError(f'query_chunk {query_chunk} must divide the sequence'
                       f' length {seq}')
    chunks = seq // query_chunk
    q_chunks = jnp.moveaxis(
        q.reshape(batch, chunks, query_chunk, heads, HEAD_DIM), 1, 0)
    out = jax.lax.map(jax.checkpoint(lambda args: attend(*args)),
                      (q_chunks, jnp.arange(chunks) * query_chunk))
    out = jnp.moveaxis(out, 0, 1)
  return out.reshape(batch, seq, d_model) @ params['o']


def swiglu(params, x):
  """LLaMA's gated MLP: ``(silu(x W_gate) * x W_up) W_down``."""
  return (jax.nn.silu(x @ params['gate']) * (x @ params['up'])) @ params['down']


def decoder_layer(layer, x, query_chunk: int | None = None):
  """One pre-norm block: attention then SwiGLU, each added to ``x``."""
  x = x + attention(layer['attn'], rms_norm(x, layer['attn_norm']),
                    query_chunk)
  return x + swiglu(layer['mlp'], rms_norm(x, layer['mlp_norm']))


def lm_loss(params, tokens, remat: bool = False,
            query_chunk: int | None = None):
  """Mean next-token cross-entropy of a pre-norm LLaMA decoder.

  The layers are unrolled if ``params['layers']`` is a list and scanned if
  it is stacked (see `llama_params`). With ``remat`` each layer is
  checkpointed, saving nothing: the backward pass keeps only each layer's
  input (the residual stream) and recomputes the rest. ``query_chunk``:
  see `attention`.
  """
  layer_fn = functools.partial(decoder_layer, query_chunk=query_chunk)
  if remat:
    layer_fn = jax.checkpoint(
        layer_fn, policy=jax.checkpoint_policies.nothing_saveable)
  x = embed_tokens(params, tokens)
  if isinstance(params['layers'], list):
    for layer in params['layers']:
      x = layer_fn(layer, x)
  else:
    x, _ = jax.lax.scan(lambda h, layer: (layer_fn(layer, h), None), x,
                        params['layers'])
  return head_loss(params, x, tokens)


def embed_tokens(params, tokens):
  """The decoder's input: the embeddings of all tokens but the last."""
  return jnp.take(params['embed'], tokens[:, :-1], axis=0)


def head_loss(params, x, tokens):
  """The final norm, the output head and the next-token cross-entropy."""
  logits = rms_norm(x, params['final_norm']) @ params['lm_head']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]).mean()


def fused_train_step_fn(optimizer, params,
                        query_chunk: int | None = None) -> Callable:
  """`flora_jax.fused_train_step` of the stacked decoder, not compiled.

  The same model and loss as `lm_loss` with stacked layers, the optimizer
  applied to each layer inside the backward pass (`train_step_fn`'s
  signature; jit it with ``donate_argnums=(0, 1)``).
  """
  step = flora_jax.fused_train_step(
      optimizer, params, stack='layers', embed=embed_tokens,
      layer=lambda layer, x, tokens: decoder_layer(layer, x, query_chunk),
      head=head_loss, jit=False)

  def train_step(params, opt_state, tokens):
    params, opt_state, metrics = step(params, opt_state, tokens)
    return params, opt_state, metrics['loss']

  return train_step


def train_step_fn(optimizer, remat: bool = False,
                  query_chunk: int | None = None) -> Callable:
  """Forward, backward, optimizer update and parameter update, one call."""
  def step(params, opt_state, tokens):
    loss_fn = functools.partial(lm_loss, remat=remat, query_chunk=query_chunk)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
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
    state_dtypes: the floating dtypes of the optimizer state, e.g.
      ``('bfloat16', 'float32')``.
  """

  params: int
  opt_state: int
  argument: int
  output: int
  alias: int
  temp: int
  compile_seconds: float
  state_dtypes: tuple[str, ...] = ()

  @property
  def gradients(self) -> int:
    """Bytes of the gradient tree (the parameters' shapes and dtypes).

    XLA does not report it apart: it is part of ``temp``, since the whole
    tree is alive at the optimizer update of an unfused step.
    """
    return self.params

  @property
  def activations_and_other(self) -> int:
    """The temporaries other than the gradients."""
    return self.temp - self.gradients

  @property
  def persistent(self) -> int:
    """What stays allocated between steps: parameters + optimizer state."""
    return self.params + self.opt_state

  @property
  def peak(self) -> int:
    """Arguments live for the whole call, outputs that could not reuse a
    donated buffer are fresh allocations, and temporaries come on top."""
    return self.argument + self.output - self.alias + self.temp


def compile_step_memory(model: StepModel, optimizer,
                        fused: bool = False) -> StepMemory:
  """Compiles (never runs) one donated train step and reads XLA's sizes.

  The inputs are abstract (`jax.ShapeDtypeStruct`): nothing is allocated,
  so any model size compiles on a laptop.

  With ``fused`` the step is `fused_train_step_fn`'s (the optimizer applied
  to each stacked layer inside the backward pass, each layer recomputed
  from its saved input): only for ``model.stacked``, and ``model.remat`` is
  then irrelevant (the fused step always checkpoints each layer).
  """
  params = model.params()
  opt_state = jax.eval_shape(optimizer.init, params)
  tokens = jax.ShapeDtypeStruct((model.batch, model.seq_len + 1), jnp.int32)
  if fused:
    if not model.stacked:
      raise ValueError(f'{model.name}: the fused step needs stacked layers'
                       ' (StepModel(..., stacked=True)).')
    step_fn = fused_train_step_fn(optimizer, params, model.query_chunk)
  else:
    step_fn = train_step_fn(optimizer, model.remat, model.query_chunk)
  step = jax.jit(step_fn, donate_argnums=(0, 1))
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
      state_dtypes=floating_dtypes(opt_state),
  )


def stack_bytes(model: StepModel) -> int:
  """Bytes of the stacked layers' parameters (``params['layers']``), i.e.
  of their gradient in the parameters' dtype."""
  return flora_jax.memory.state_bytes(model.params()['layers'])


def floating_dtypes(tree) -> tuple[str, ...]:
  """The names of the floating dtypes among a tree's leaves, sorted."""
  return tuple(sorted({
      leaf.dtype.name for leaf in jax.tree.leaves(tree)
      if jnp.issubdtype(leaf.dtype, jnp.floating)}))


