"""Exact SVD vs randomized range finder as GaLore/Fira projectors.

For each matrix size ``m x n`` and rank ``r`` this script fits the projector
``Q`` (``dim x r``, orthonormal columns, ``dim`` the smaller of ``m``, ``n``
as ``side='auto'`` picks it) with

* ``flora_jax.projections.svd_projector`` (one exact float32 SVD, the
  reference), and
* ``flora_jax.projections.randomized_projector`` with ``power_iterations``
  0, 1 and 2 (oversampling 8, the library default),

each wrapped in `jax.jit`, and reports

* time: the median wall-clock time of ``repeats`` calls after compilation,
  each ended by `jax.block_until_ready` (the projectors take turns, so load
  from other processes hits them alike), and its ratio to the SVD's time
  (below 1 is faster);
* energy: the gradient energy the projector keeps,
  ``||down(G)||_F^2 / ||down_svd(G)||_F^2`` with ``down(G) = Qᵀ G`` (or
  ``G Q`` when the columns are compressed). The SVD keeps the most energy any
  rank-``r`` projector can, so 1.0 is the best possible value.

Two kinds of float32 matrices are measured:

* noise: i.i.d. N(0, 1) entries, a flat spectrum, the hardest case for a
  range finder;
* low-rank: a rank-64 signal ``U diag(s) Vᵀ`` with random orthonormal ``U``,
  ``V`` and singular values decaying geometrically from 1 to 0.01, plus
  Gaussian noise of 1% of the signal's Frobenius norm, closer to what
  gradients look like.

Run it with

  python benchmarks/benchmark_projectors.py          # 512² to 2048², 1024x4096
  python benchmarks/benchmark_projectors.py --quick  # small sizes, seconds
  python benchmarks/benchmark_projectors.py --rank 64 \\
      --sizes 1024x1024 4096x4096

Timings are of whatever backend JAX picks (CPU, GPU, TPU); the table header
names it.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from flora_jax import projections

FULL_SIZES = ('512x512', '1024x1024', '2048x2048', '1024x4096')
QUICK_SIZES = ('256x256', '512x512', '256x1024')
POWER_ITERATIONS = (0, 1, 2)
SIGNAL_RANK = 64
NOISE_LEVEL = 0.01


def parse_size(text: str) -> tuple[int, int]:
  try:
    m, n = (int(x) for x in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected MxN, got {text!r}') from None
  return m, n


def noise_matrix(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """I.i.d. standard normal entries."""
  return jax.random.normal(key, shape, jnp.float32)


def low_rank_matrix(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A rank-64 signal with a geometrically decaying spectrum, plus 1% noise."""
  m, n = shape
  k = min(SIGNAL_RANK, m, n)
  key_u, key_v, key_noise = jax.random.split(key, 3)
  u, _ = jnp.linalg.qr(jax.random.normal(key_u, (m, k), jnp.float32))
  v, _ = jnp.linalg.qr(jax.random.normal(key_v, (n, k), jnp.float32))
  s = jnp.logspace(0.0, -2.0, k, dtype=jnp.float32)
  signal = (u * s) @ v.T
  noise = jax.random.normal(key_noise, shape, jnp.float32)
  noise *= NOISE_LEVEL * jnp.linalg.norm(signal) / jnp.linalg.norm(noise)
  return signal + noise


MATRIX_KINDS = {'noise': noise_matrix, 'low-rank': low_rank_matrix}


def median_seconds(fns: dict, args, repeats: int) -> dict:
  """Median wall-clock seconds of each ``fn(*args)``, compilation excluded.

  The functions take turns within each round, so that a change in machine
  load hits all of them alike.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = {label: [] for label in fns}
  for _ in range(repeats):
    for label, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[label].append(time.perf_counter() - start)
  return {label: statistics.median(t) for label, t in times.items()}


def captured_energy(q: jax.Array, g: jax.Array, side: str) -> float:
  """``||down(G)||_F^2`` for the projector ``q``."""
  return float(jnp.sum(jnp.square(projections.project_down(q, g, side))))


def projectors(plan: projections.LeafPlan) -> dict:
  """Jitted projector functions ``fn(key, g) -> Q``, by table label."""
  fns = {'svd': jax.jit(lambda key, g: projections.svd_projector(g, plan))}
  for q in POWER_ITERATIONS:
    fns[f'randomized, q={q}'] = jax.jit(
        lambda key, g, q=q: projections.randomized_projector(
            key, g, plan, power_iterations=q
        )
    )
  return fns


def benchmark_size(shape, rank: int, repeats: int, key: jax.Array) -> list:
  """Table rows (cells as strings) for one matrix size."""
  m, n = shape
  side = 'left' if m <= n else 'right'  # What side='auto' picks.
  plan = projections.LeafPlan(path='w', shape=shape, side=side, rank=rank)
  fns = projectors(plan)
  key_data, key_sketch = jax.random.split(key)
  results = {label: [] for label in fns}  # label -> [(seconds, energy)...]
  for kind_key, make in zip(
      jax.random.split(key_data, len(MATRIX_KINDS)), MATRIX_KINDS.values()
  ):
    g = jax.block_until_ready(make(kind_key, shape))
    seconds = median_seconds(fns, (key_sketch, g), repeats)
    for label, fn in fns.items():
      energy = captured_energy(fn(key_sketch, g), g, side)
      results[label].append((seconds[label], energy))

  rows = []
  svd = results['svd']
  for label, per_kind in results.items():
    cells = [f'{m}x{n}', label]
    for (seconds, energy), (svd_seconds, svd_energy) in zip(per_kind, svd):
      cells += [
          f'{seconds * 1e3:.1f}',
          f'{seconds / svd_seconds:.3f}',
          f'{energy / svd_energy:.4f}',
      ]
    rows.append(cells)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rank', type=int, default=128)
  parser.add_argument(
      '--sizes', type=parse_size, nargs='+', metavar='MxN',
      help=f'matrix sizes (default {" ".join(FULL_SIZES)})',
  )
  parser.add_argument(
      '--repeats', type=int,
      help='timed calls per measurement (default 5, 3 with --quick)',
  )
  parser.add_argument(
      '--quick', action='store_true',
      help=f'sizes {" ".join(QUICK_SIZES)} and 3 repeats unless given',
  )
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  sizes = args.sizes or [
      parse_size(s) for s in (QUICK_SIZES if args.quick else FULL_SIZES)
  ]
  repeats = args.repeats or (3 if args.quick else 5)
  for m, n in sizes:
    if args.rank >= min(m, n):
      parser.error(f'--rank {args.rank} must be below min(m, n) for {m}x{n}')

  device = jax.devices()[0]
  print(
      f'Projector fit, rank {args.rank}, float32, median of {repeats} calls on'
      f' {device.platform} ({device.device_kind}), jax {jax.__version__}.'
  )
  print(
      'time in ms; "/ svd": time relative to the exact SVD; energy:'
      ' ||down(G)||² / ||down_svd(G)||² (1 = as good as the SVD).\n'
  )
  kinds = list(MATRIX_KINDS)
  header = ['size', 'projector']
  for kind in kinds:
    header += [f'{kind} ms', f'{kind} / svd', f'{kind} energy']
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  key = jax.random.key(args.seed)
  for shape, size_key in zip(sizes, jax.random.split(key, len(sizes))):
    for cells in benchmark_size(shape, args.rank, repeats, size_key):
      print('| ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
