# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # flora_jax quick start: optimizer memory before and after
#
# Adam keeps two full-size float32 moments per weight. `flora_jax`
# offers optax optimizers whose state is much smaller:
#
# * `flora_jax.flora`: Adafactor's factored second moment plus a
#   momentum stored as a random low-rank sketch (the projection is
#   regenerated from a PRNG key, never stored);
# * `flora_jax.galore` / `flora_jax.fira`: Adam inside the top-r
#   gradient subspace of each weight matrix.
#
# This notebook (1) measures the optimizer state of LLaMA-shaped models
# without allocating anything, then (2) trains a tiny byte-level
# transformer with `optax.adamw` and with `flora_jax.flora`. It runs on
# a CPU runtime in a few minutes.

# %% [markdown]
# ## Setup
#
# In Colab, the next cell installs `flora_jax` with its Flax extra
# (`flora_jax[nnx]`) unless it is already installed; anywhere else it does
# nothing and the installed package is used (from a checkout:
# `pip install -e ".[nnx]"`). In Colab it installs the first it finds of:
#
# 1. **a wheel uploaded to `/content`**: build it in a checkout with
#    `pip wheel --no-deps -w dist .` and upload
#    `dist/flora_jax-<version>-py3-none-any.whl` with the Files pane (left);
# 2. **a clone in `/content/flora_jax`**: first run
#    `!git clone <the repository's URL> /content/flora_jax` in a new cell;
# 3. **the release on PyPI**, `flora_jax[nnx]`: nothing to do.
#
# Until `flora_jax` is published on PyPI, do 1 or 2 before running the next
# cell. (A checkout elsewhere: `!pip install -q "<checkout>[nnx]"` in a new
# cell. Not `pip install -e`: Colab imports an editable install only after a
# runtime restart.)

# %%
import importlib.util
import os
import subprocess
import sys

IN_COLAB = 'google.colab' in sys.modules


def colab_install_target():
  """What pip installs in Colab: an uploaded wheel, a clone, or PyPI."""
  wheels = [os.path.join('/content', name) for name in os.listdir('/content')
            if name.startswith('flora_jax-') and name.endswith('.whl')]
  if wheels:  # the newest upload
    return max(wheels, key=os.path.getmtime) + '[nnx]'
  if os.path.isfile('/content/flora_jax/pyproject.toml'):
    return '/content/flora_jax[nnx]'
  return 'flora_jax[nnx]'


# (A clone in /content is importable from there as an empty namespace
# package, whose spec has no origin: that is not an installation.)
spec = importlib.util.find_spec('flora_jax')
if not IN_COLAB:
  print('Not running in Colab: nothing installed, using this environment.')
elif spec is not None and spec.origin is not None:
  print('flora_jax is already installed.')
else:
  target = colab_install_target()
  print(f'pip install {target}')
  pip = [sys.executable, '-m', 'pip', 'install', '-q', target]
  if subprocess.run(pip).returncode:
    raise RuntimeError(
        f'Could not install {target}. Upload a wheel of flora_jax to'
        ' /content or clone the repository to /content/flora_jax (see the'
        ' cell above), then run this cell again.')
  importlib.invalidate_caches()

# %%
# FLORA_NOTEBOOK_QUICK=1 (set by notebooks/run_notebooks.py for CI)
# shrinks every run to a smoke test of a few seconds.
QUICK = os.environ.get('FLORA_NOTEBOOK_QUICK', '') not in ('', '0')
print('quick mode' if QUICK else 'full mode')

# %% [markdown]
# ## 1. State memory of LLaMA-shaped models, without allocating
#
# `jax.eval_shape(tx.init, params)` gives the optimizer state's shapes
# and dtypes from a tree of `jax.ShapeDtypeStruct`s, so even a 7B tree
# costs nothing. `flora_jax.memory.state_bytes` adds up its bytes.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import flora_jax

# name: (d_model, ffn, layers); vocab 32000, as in the GaLore paper.
LLAMA_SHAPES = {
    '60M': (512, 1376, 8),
    '350M': (1024, 2736, 24),
    '1B': (2048, 5461, 24),
    '7B': (4096, 11008, 32),
}
MODELS = ['60M', '350M'] if QUICK else list(LLAMA_SHAPES)
VOCAB = 32000


def llama_params(d_model, ffn, layers):
  """Abstract LLaMA parameters in Flax's (in, out) layout, float32."""

  def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)

  def layer():
    return {
        'attn': {name: f32(d_model, d_model) for name in 'qkvo'},
        'mlp': {'gate': f32(d_model, ffn), 'up': f32(d_model, ffn),
                'down': f32(ffn, d_model)},
        'norm1': f32(d_model), 'norm2': f32(d_model),
    }

  return {'embed': f32(VOCAB, d_model),
          'layers': [layer() for _ in range(layers)],
          'final_norm': f32(d_model),
          'lm_head': f32(d_model, VOCAB)}


RANK = 256
optimizers = {
    'optax.adamw': optax.adamw(1e-3),
    f'flora_jax.flora r={RANK}': flora_jax.flora(1e-3, rank=RANK),
    f'flora_jax.flora r={RANK}, bf16 momentum': flora_jax.flora(
        1e-3, rank=RANK, momentum_dtype=jnp.bfloat16),
    f'flora_jax.galore r={RANK}': flora_jax.galore(1e-3, rank=RANK),
}

state = {}  # (optimizer, model) -> bytes
for model_name in MODELS:
  params = llama_params(*LLAMA_SHAPES[model_name])
  for name, tx in optimizers.items():
    state[name, model_name] = flora_jax.memory.state_bytes(
        jax.eval_shape(tx.init, params))

GiB = 2**30
print(f'{"optimizer":<36}' + ''.join(f'{m:>20}' for m in MODELS))
for name in optimizers:
  cells = []
  for m in MODELS:
    size = state[name, m]
    ratio = size / state['optax.adamw', m]
    cells.append(f'{size / GiB:8.2f} GiB ({ratio:6.1%})')
  print(f'{name:<36}' + ''.join(f'{c:>20}' for c in cells))

# %% [markdown]
# The embedding and the output head (aspect ratio above
# `max_aspect_ratio=4`) keep full-size state by default; in the small
# models they are most of what is left. The larger the model, the
# closer the ratio gets to that of the weight matrices alone.

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.8 / len(optimizers)
for i, name in enumerate(optimizers):
  xs = [j + i * width for j in range(len(MODELS))]
  ax.bar(xs, [state[name, m] / GiB for m in MODELS], width, label=name)
ax.set_xticks([j + 0.4 - width / 2 for j in range(len(MODELS))], MODELS)
ax.set_yscale('log')
ax.set_ylabel('optimizer state (GiB)')
ax.set_title(f'Optimizer state, LLaMA shapes, rank {RANK}')
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. Training a tiny transformer with Flora
#
# A small byte-level transformer (two blocks, width 128) learns the
# Python standard library's own source code (`stdlib_corpus` below reads
# it from the local installation: nothing is downloaded). Both optimizers
# start from the same weights and see the same batches.

# %%
import dataclasses
import sysconfig

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 256  # bytes
  seq_len: int = 64
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  d_mlp: int = 512


class Block(nnx.Module):
  """Pre-LayerNorm block: causal self-attention, then a GELU MLP."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
    # Four (d, d) kernels: matrices that Flora / GaLore can project.
    self.query = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.key = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, cfg.d_mlp, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.d_mlp, d, rngs=rngs)
    self.num_heads = cfg.num_heads

  def __call__(self, x):
    batch, length, d = x.shape
    h = self.attn_norm(x)
    q, k, v = (proj(h).reshape(batch, length, self.num_heads, -1)
               for proj in (self.query, self.key, self.value))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.reshape(batch, length, d))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nnx.Module):
  """Byte-level language model with tied input/output embeddings."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=init, rngs=rngs)
    self.position = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))


def loss_fn(model, batch):
  """Mean next-byte cross-entropy in nats; batch is (B, seq_len + 1)."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_loss(model, batch):
  return loss_fn(model, batch)


def random_windows(data, steps, batch_size, seq_len, seed=0):
  """`steps` batches of random (seq_len + 1)-byte windows of `data`."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  for _ in range(steps):
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    yield data[starts[:, None] + offsets].astype(np.int32)


def fixed_windows(data, count, seq_len):
  """`count` evenly spaced windows of `data`, as one evaluation batch."""
  starts = np.linspace(0, len(data) - seq_len - 2, count).astype(np.int64)
  return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def stdlib_corpus(max_bytes):
  """Up to `max_bytes` of the standard library's .py files, as uint8.

  Files in sorted order, third-party packages skipped: the same corpus on
  every run of one Python version.
  """
  root = sysconfig.get_paths()['stdlib']
  skip = {'site-packages', 'dist-packages', '__pycache__'}
  chunks, total = [], 0
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in skip)
    for name in sorted(f for f in files if f.endswith('.py')):
      if total >= max_bytes:
        break
      try:
        with open(os.path.join(directory, name), 'rb') as f:
          chunks.append(f.read(max_bytes - total))
      except OSError:
        continue
      total += len(chunks[-1])
    if total >= max_bytes:
      break
  return np.frombuffer(b''.join(chunks), dtype=np.uint8)


# %%
cfg = Config()
STEPS = 20 if QUICK else 300
BATCH = 8 if QUICK else 16
corpus = stdlib_corpus((1 if QUICK else 4) * 2**20)
split = int(len(corpus) * 0.95)  # the last files are held out
train_data, val_data = corpus[:split], corpus[split:]
val_batch = jnp.asarray(
    fixed_windows(val_data, 64 if QUICK else 256, cfg.seq_len))
print(f'{len(train_data):,} training bytes, {len(val_data):,} held out;'
      f' {STEPS} steps of {BATCH} x {cfg.seq_len} bytes.')

# %% [markdown]
# Which leaves does Flora compress? `flora_jax.ProjectionRule` decides
# (the same rule for every transform). Here only the matrices of the
# transformer blocks get a compressed momentum (`projection_mask`), of
# rank 16; `min_dim=64` lets the 128 x 128 kernels qualify.

# %%
RANK, MIN_DIM = 16, 64
in_blocks = flora_jax.path_mask(
    lambda path, leaf: path.startswith('blocks/'))
rule = flora_jax.ProjectionRule(
    rank=RANK, min_dim=MIN_DIM, projection_mask=in_blocks)

abstract = nnx.eval_shape(lambda: ByteTransformer(cfg, rngs=nnx.Rngs(0)))
params = nnx.as_pure(nnx.state(abstract, nnx.Param))
for (path, leaf), plan in zip(jax.tree.leaves_with_path(params),
                              jax.tree.leaves(rule.plan(params)), strict=True):
  if leaf.ndim >= 2:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    how = f'sketch {plan.low_rank_shape}' if plan.projected else 'full-size'
    print(f'{name:<28} {str(leaf.shape):<11} momentum: {how}')

# %%
LR = 2e-3
optimizers = {
    'adamw': optax.adamw(LR),
    'flora': flora_jax.flora(
        learning_rate=LR, rank=RANK, kappa=100, min_dim=MIN_DIM,
        projection_mask=in_blocks, min_dim_size_to_factor=MIN_DIM),
}

curves, results = {}, {}
for name, tx in optimizers.items():
  model = ByteTransformer(cfg, rngs=nnx.Rngs(0))  # same weights for both
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  start = time.perf_counter()
  losses = [train_step(model, optimizer, jnp.asarray(batch))
            for batch in random_windows(train_data, STEPS, BATCH, cfg.seq_len)]
  curves[name] = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - start
  results[name] = (float(eval_loss(model, val_batch)),
                   flora_jax.memory.state_bytes(
                       nnx.as_pure(optimizer.opt_state)))
  print(f'{name}: {seconds:.1f} s (compilation included)')

base = results['adamw'][1]
print(f'\n{"optimizer":<10}{"val loss":>10}{"opt state":>14}{"vs adamw":>10}')
for name, (val, size) in results.items():
  print(f'{name:<10}{val:>10.3f}{size / 1024:>10.1f} KiB{size / base:>10.1%}')

# %%
def smooth(x, k=10):
  return np.convolve(x, np.ones(k) / k, mode='valid') if len(x) > k else x


fig, ax = plt.subplots(figsize=(7, 3.5))
for name, curve in curves.items():
  ax.plot(smooth(curve), label=name)
ax.set_xlabel('step')
ax.set_ylabel('training loss (nats / byte, smoothed)')
ax.legend()
plt.show()

# %% [markdown]
# About half of what remains of Flora's state here is the full-size
# momentum of the byte embedding and the position table, which the
# projection mask leaves uncompressed (compressing them too saves a little
# more memory but, in a model this small, costs loss). In a large model the
# weight matrices dominate and the ratio approaches the table of part 1.
#
# Next: `02_optimizer_comparison.ipynb` compares AdamW, Adafactor,
# Flora, GaLore and Fira on the same model.
