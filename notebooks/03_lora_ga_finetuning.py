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
# # LoRA, LoRA-GA and LoRA+ for Flax NNX
#
# A small, real fine-tuning task: an MLP pretrained on scikit-learn's
# 8x8 handwritten digits (bundled with scikit-learn, nothing is
# downloaded) is adapted to the same digits **rotated by 90 degrees**,
# on which it starts at chance. Only rank-4 adapters on its three
# linear layers are trained; the base weights stay frozen.
#
# * **LoRA** (`flora_jax.nnx.add_lora`): `A` random, `B` zero, AdamW;
# * **LoRA-GA** (`flora_jax.nnx.lora_ga_init`): the adapters initialised
#   from the SVD of the full gradient averaged over a few batches, the
#   base weights offset so that the model's output is unchanged;
# * **LoRA+** (`flora_jax.lora_plus`): usual initialisation, the `B`
#   factors at 16x the learning rate of the `A` factors.
#
# Finally `flora_jax.nnx.merge_lora` folds the adapters into the weights.
# (`examples/lora_digits.py` is the longer, multi-seed version.)

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
import time

from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn import datasets as sk_datasets
from sklearn import model_selection

import flora_jax

PRETRAIN_STEPS = 300 if QUICK else 1000
FINETUNE_STEPS = 100 if QUICK else 600
EVAL_EVERY = 10
BATCH = 64
RANK = 4
LR = 5e-3

digits = sk_datasets.load_digits()
images = (digits.data / 16.0).astype(np.float32)  # 1797 x 64 pixels in [0, 1]
labels = digits.target.astype(np.int32)
x_train, x_test, y_train, y_test = model_selection.train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels)


def rotate(x):
  """Each 8x8 image (a row of 64 pixels) rotated by 90 degrees."""
  return np.ascontiguousarray(
      np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2))).reshape(-1, 64)


xr_train, xr_test = rotate(x_train), rotate(x_test)

fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for i in range(8):
  axes[0, i].imshow(x_train[i].reshape(8, 8), cmap='gray_r')
  axes[1, i].imshow(xr_train[i].reshape(8, 8), cmap='gray_r')
  axes[0, i].set_title(int(y_train[i]))
for ax in axes.flat:
  ax.axis('off')
plt.suptitle('upright (pretraining) and rotated (fine-tuning)')
plt.show()


# %% [markdown]
# ## Pretraining on the upright digits
#
# A 64-128-128-10 GELU MLP, trained in full with AdamW.

# %%
class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
    self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.hidden1(x))
    x = jax.nn.gelu(self.hidden2(x))
    return self.head(x)


def loss_fn(model, batch):
  """Cross-entropy of an (images, labels) batch; also LoRA-GA's loss."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit(static_argnames='wrt')
def train_step(model, optimizer, batch, wrt):
  # Differentiate only what the optimizer trains (all Params, or the
  # LoRAParam factors).
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
  optimizer.update(model, grads)


@nnx.jit
def evaluate(model, x, y):
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def train(model, tx, wrt, x, y, steps, seed):
  """Trains in place; the whole training set's loss every EVAL_EVERY steps."""
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  rng = np.random.default_rng(seed)  # same seed: same batches
  curve = [float(evaluate(model, x, y)[0])]
  for step in range(1, steps + 1):
    rows = rng.integers(0, len(y), BATCH)
    batch = jnp.asarray(x[rows]), jnp.asarray(y[rows])
    train_step(model, optimizer, batch, wrt)
    if step % EVAL_EVERY == 0:
      curve.append(float(evaluate(model, x, y)[0]))
  return np.asarray(curve), optimizer


base = MLP(nnx.Rngs(0))
start = time.perf_counter()
train(base, optax.adamw(optax.cosine_decay_schedule(1e-3, PRETRAIN_STEPS)),
      nnx.Param, x_train, y_train, PRETRAIN_STEPS, seed=1)
print(f'pretraining: {time.perf_counter() - start:.1f} s')
for name, x in (('upright', x_test), ('rotated', xr_test)):
  loss, acc = evaluate(base, x, y_test)
  print(f'{name:>8} test images: accuracy {float(acc):.3f},'
        f' loss {float(loss):.2f}')

# %% [markdown]
# ## Adding adapters
#
# `add_lora(model, targets, rank, ...)` wraps every `nnx.Linear` whose
# path matches the regular expression in a `ScaledLoRA`:
# `y = x W + b + s x A B` with `s = alpha / rank` (here `alpha = rank`,
# `s = 1`). `A` (`in x r`) is random, `B` (`r x out`) zero, so the
# output is unchanged. The factors are `nnx.LoRAParam`s, so
# `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only them.

# %%
TARGETS = 'hidden1|hidden2|head'


def count(tree):
  """The number of scalars in a tree of arrays."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


demo = nnx.clone(base)
adapted = flora_jax.nnx.add_lora(demo, TARGETS, rank=RANK, rngs=nnx.Rngs(1))
print('adapted:', adapted)
print('output unchanged:', bool(jnp.allclose(demo(xr_test), base(xr_test))))
print(f'trainable adapter parameters: {count(nnx.state(demo, nnx.LoRAParam)):,}'
      f' of {count(nnx.state(base, nnx.Param)):,} base parameters')

# %% [markdown]
# ## Fine-tuning: LoRA, LoRA-GA, LoRA+ (and full fine-tuning)
#
# Every method starts from a copy of the pretrained model and sees the
# same batches at the same peak learning rate (cosine decay to 0).
#
# `lora_ga_init(model, loss_fn, batches)` streams the batches (one
# jitted gradient step each), averages the gradient of every adapted
# kernel, and sets `A` from its top-r left singular vectors and `B`
# from the right singular vectors r+1..2r, with the paper's "stable"
# scale. It returns the leading singular values. Note the 2r <= 10
# limit from the 128 x 10 head: rank 4 is fine.

# %%
schedule = optax.cosine_decay_schedule(LR, FINETUNE_STEPS)


def ga_batches(seed, n=4):
  """n disjoint batches of the (rotated) training set for LoRA-GA."""
  order = np.random.default_rng(seed).permutation(len(y_train))
  for rows in order[: n * BATCH].reshape(n, BATCH):
    yield jnp.asarray(xr_train[rows]), jnp.asarray(y_train[rows])


curves, models = {}, {}
for method in ('full fine-tuning', 'LoRA', 'LoRA-GA', 'LoRA+'):
  model = nnx.clone(base)
  start = time.perf_counter()
  if method == 'full fine-tuning':
    wrt, tx = nnx.Param, optax.adamw(schedule, weight_decay=0.0)
  else:
    flora_jax.nnx.add_lora(model, TARGETS, rank=RANK, rngs=nnx.Rngs(1))
    wrt = nnx.LoRAParam
    if method == 'LoRA+':
      tx = flora_jax.lora_plus(schedule, ratio=16)
    else:
      tx = optax.adamw(schedule, weight_decay=0.0)
    if method == 'LoRA-GA':
      before = model(xr_test)
      singular_values = flora_jax.nnx.lora_ga_init(
          model, loss_fn, ga_batches(seed=2))
      print('LoRA-GA: output unchanged by the initialisation:',
            bool(jnp.allclose(model(xr_test), before, atol=1e-4)))
      for path, s in singular_values.items():
        print(f'  {path}: leading singular values of the gradient',
              np.round(np.asarray(s[:4]), 3))
  curves[method], _ = train(model, tx, wrt, xr_train, y_train,
                            FINETUNE_STEPS, seed=3)
  models[method] = model
  loss, acc = evaluate(model, xr_test, y_test)
  print(f'{method:<17} final train loss {curves[method][-1]:.4f},'
        f' rotated test accuracy {float(acc):.3f}'
        f' ({time.perf_counter() - start:.1f} s)')

# %%
steps = np.arange(len(curves['LoRA'])) * EVAL_EVERY
fig, ax = plt.subplots(figsize=(7, 4))
for method, curve in curves.items():
  ax.plot(steps, curve, label=method,
          ls='--' if method == 'full fine-tuning' else '-')
ax.set_yscale('log')
ax.set(xlabel='step', ylabel='loss on the whole rotated training set',
       title=f'Rank-{RANK} adapters, peak learning rate {LR:g}')
ax.legend()
plt.show()

target = curves['LoRA'][-1]
for method in ('LoRA-GA', 'LoRA+'):
  reached = np.flatnonzero(curves[method] <= target)
  when = f'step {reached[0] * EVAL_EVERY}' if reached.size else 'never'
  print(f"{method} reaches LoRA's final loss ({target:.4f}) at {when}"
        f' of {FINETUNE_STEPS}.')

# %% [markdown]
# ## Merging and exporting the adapters
#
# `merge_lora` folds `s A B` into each base weight (`unmerge_lora`
# undoes it): the merged model computes the same function with one
# matmul per layer. `lora_delta` exports every adapter as a low-rank
# delta relative to the **original** weights (for LoRA-GA it accounts
# for the base-weight offset), which `apply_lora_delta` adds to an
# untouched copy of the pretrained model.

# %%
model = models['LoRA-GA']
logits = model(xr_test)
deltas = flora_jax.nnx.lora_delta(model)
for path, delta in deltas.items():
  print(f'{path}: delta factors {delta.a.shape} x {delta.b.shape},'
        f' scale {delta.scale:g}')

flora_jax.nnx.merge_lora(model)
print('merged output matches:',
      bool(jnp.allclose(model(xr_test), logits, atol=1e-4)))

fresh = nnx.clone(base)  # the pretrained model, no adapters
flora_jax.nnx.apply_lora_delta(fresh, deltas)
loss, acc = evaluate(fresh, xr_test, y_test)
print('pretrained + exported delta matches:',
      bool(jnp.allclose(fresh(xr_test), logits, atol=1e-4)),
      f'(rotated test accuracy {float(acc):.3f})')

# %% [markdown]
# With one seed and a short run the ranking can vary;
# `python examples/lora_digits.py` runs 3 seeds, 1000 steps and a
# learning-rate sweep (measured there: LoRA 0.087, LoRA-GA 0.037, LoRA+
# 0.003 final training loss at learning rate 5e-3).
