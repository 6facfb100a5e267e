"""Optimizer-state memory on LLaMA-shaped parameter trees, without allocating.

Every figure comes from ``jax.eval_shape(tx.init, params)``: shapes and dtypes
only, so even the 7B tree costs nothing to evaluate.

  python examples/state_memory.py            # 60M, 350M, 1B, 7B at rank 256
  python examples/state_memory.py --rank 128 --models 60M 7B
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import flora_jax

# name: (d_model, ffn, layers), vocab 32000 (GaLore / Fira paper shapes).
LLAMA_SHAPES = {
    '60M': (512, 1376, 8),
    '130M': (768, 2048, 12),
    '350M': (1024, 2736, 24),
    '1B': (2048, 5461, 24),
    '7B': (4096, 11008, 32),
}
VOCAB = 32000


def llama_params(d_model: int, ffn: int, layers: int):
  """Abstract parameters of a LLaMA decoder, Flax (in, out) layout."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = lambda: {
      'attn': {name: f32(d_model, d_model) for name in 'qkvo'},
      'mlp': {'gate': f32(d_model, ffn), 'up': f32(d_model, ffn),
              'down': f32(ffn, d_model)},
      'norm1': f32(d_model), 'norm2': f32(d_model),
  }
  return {
      'embed': f32(VOCAB, d_model),
      'layers': [layer() for _ in range(layers)],
      'final_norm': f32(d_model),
      'lm_head': f32(d_model, VOCAB),
  }


def optimizers(rank: int):
  return {
      'optax.adamw': optax.adamw(1e-3),
      'optax.adafactor': optax.adafactor(1e-3),
      'optax.MultiSteps(adamw, 4)': optax.MultiSteps(optax.adamw(1e-3), 4),
      f'flora_jax.flora r={rank}': flora_jax.flora(1e-3, rank=rank),
      f'flora_jax.flora r={rank} bf16 momentum': flora_jax.flora(
          1e-3, rank=rank, momentum_dtype=jnp.bfloat16),
      f'flora_compress r={rank} + adamw': optax.chain(
          flora_jax.flora_compress(rank), optax.adamw(1e-3)),
      f'FloraMultiSteps(adamw, 4) r={rank}': flora_jax.FloraMultiSteps(
          optax.adamw(1e-3), 4, rank=rank),
      f'flora_jax.galore r={rank}': flora_jax.galore(1e-3, rank=rank),
      f'flora_jax.galore r={rank} random projector': flora_jax.galore(
          1e-3, rank=rank, projector='random'),
      f"flora_jax.galore r={rank} side='larger', max_aspect_ratio=None":
          flora_jax.galore(1e-3, rank=rank, side='larger',
                           max_aspect_ratio=None),
      f'flora_jax.fira r={rank}': flora_jax.fira(1e-3, rank=rank),
      f'optax.contrib.galore r={rank}': optax.contrib.galore(1e-3, rank=rank),
  }

# Printed under the table: the GaLore rows differ in WHAT they project.
GALORE_FOOTNOTE = """
GaLore rows: by default flora_jax.galore / fira compress the smaller axis of
each matrix, as the reference GaLore does (its moments live on the larger
axis), and leave embed and lm_head (aspect ratio > max_aspect_ratio=4)
unprojected, with full-size Adam moments. optax.contrib.galore compresses the
larger axis of every 2-D leaf, embeddings included: side='larger' with
max_aspect_ratio=None makes the same choices and the same state, plus an
8-byte key."""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rank', type=int, default=256)
  parser.add_argument('--models', nargs='+', default=['60M', '350M', '1B', '7B'],
                      choices=sorted(LLAMA_SHAPES))
  args = parser.parse_args()

  txs = optimizers(args.rank)
  header = '| optimizer | ' + ' | '.join(args.models) + ' |'
  print('Optimizer-state bytes relative to optax.adamw (fp32 parameters)\n')
  print(header)
  print('|' + '---|' * (len(args.models) + 1))
  adamw_bytes = {}
  rows = {name: [] for name in txs}
  for model in args.models:
    params = llama_params(*LLAMA_SHAPES[model])
    for name, tx in txs.items():
      init = tx.init if hasattr(tx, 'init') else tx.gradient_transformation().init
      size = flora_jax.state_bytes(jax.eval_shape(init, params))
      if name == 'optax.adamw':
        adamw_bytes[model] = size
      rows[name].append(size)
  for name, sizes in rows.items():
    cells = [
        f'{size / adamw_bytes[m]:.1%} ({size / 2**30:.2f} GiB)'
        for size, m in zip(sizes, args.models)
    ]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  print(GALORE_FOOTNOTE)


if __name__ == '__main__':
  main()
