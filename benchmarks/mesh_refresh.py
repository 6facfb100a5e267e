"""GaLore's refresh step: spread over a mesh, and staggered.

A GaLore refresh refits every projector with an SVD of its gradient. Two
ways to make that step cheaper, both options of `flora_jax.scale_by_galore`
(and of `galore` / `fira`), are timed here on the projected matrices of
LLaMA-60M (8 layers of q, k, v, o ``512 x 512``, gate and up ``512 x
1376``, down ``1376 x 512``: 56 matrices; rank 128, T = 200, inner Adam):

1. ``distribute_refresh`` (the default): under a mesh of several devices
   the SVDs of a refresh are split among the devices, each fitting
   ``1 / D`` of them, instead of every device repeating all of them. Timed
   on 8 simulated CPU devices with and without it, and on one device.
2. ``refresh_schedule='staggered'``: each matrix is refitted every T steps
   at its own phase, so a step refits about ``1/T`` of the SVD cost
   instead of one step in T refitting all of it. Timed on one device: the
   worst and the median step that refits something, against a step that
   refits nothing and the synchronous refresh step.

Simulated devices share this machine's cores: without distribution the 8
devices run 8 copies of every SVD on them, so that row is slower than one
device; with it they run one copy, split. On 8 real devices the first
takes one device's time and the second 1/8 of it.

Run::

  python benchmarks/mesh_refresh.py             # ~5 min on 2 CPU cores
  python benchmarks/mesh_refresh.py --size 130M

It starts itself again with 8 simulated devices when it has fewer
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` plus the
sequential CPU scheduler that keeps a refresh a real branch there, see
`flora_jax._src.compat.cond`; one OpenBLAS thread, since spinning threads
on few cores make an SVD ten times slower). It prints two markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flora_jax
from flora_jax_examples import llama

DEVICES = 8
FLAGS = ('--xla_force_host_platform_device_count=8',
         '--xla_cpu_enable_concurrency_optimized_scheduler=false')
RANK, GAP = 128, 200


def layer_gradients(size: str = '60M', seed: int = 0) -> dict[str, Any]:
  """Random gradients of LLaMA's per-layer matrices (the projected ones)."""
  d_model, ffn, layers = llama.LLAMA_SHAPES[size]
  shapes = llama.llama_params(d_model, ffn, layers)['layers']
  shapes = [{'attn': layer['attn'], 'mlp': layer['mlp']} for layer in shapes]
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return {'layers': jax.tree.unflatten(treedef, [
      rng.standard_normal(leaf.shape, np.float32) for leaf in leaves])}


def transform(**kwargs) -> optax.GradientTransformation:
  return flora_jax.scale_by_galore(
      optax.scale_by_adam(), flora_jax.ProjectionRule(RANK),
      update_proj_gap=GAP, **kwargs)


def _timed(fn, *args, repeats: int) -> float:
  """The fastest of ``repeats`` runs, seconds (compiled beforehand)."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def step_times(tx, grads, counts, *, mesh=None, repeats: int = 2):
  """Seconds of ``tx.update`` at each of ``counts``, from fitted projectors.

  With ``mesh``, traced and run under it, the gradients sharded ``(data,
  model)`` over its two axes.
  """
  def run():
    g = grads
    if mesh is not None:
      g = jax.device_put(grads, NamedSharding(mesh, P('data', 'model')))
    state = jax.jit(tx.init)(g)
    update = jax.jit(tx.update)
    _, state = update(g, state)  # the first fit of every projector
    return [_timed(update, g, state._replace(count=jnp.int32(count)),
                   repeats=repeats) for count in counts]

  if mesh is None:
    return run()
  with jax.set_mesh(mesh):
    return run()


def mesh_rows(grads) -> list[tuple[str, float, float]]:
  """(setup, refresh step s, steady step s) with and without a mesh."""
  mesh = jax.make_mesh((2, DEVICES // 2), ('data', 'model'))
  rows = []
  for name, tx, on in (
      ('1 device', transform(), None),
      (f'{DEVICES} devices, every device all SVDs',
       transform(distribute_refresh=False), mesh),
      (f'{DEVICES} devices, SVDs spread (distribute_refresh)', transform(),
       mesh)):
    refresh, steady = step_times(tx, grads, [GAP, GAP + 1], mesh=on)
    rows.append((name, refresh, steady))
  return rows


def staggered_rows(grads, synchronous=None) -> dict[str, float | int]:
  """Step times of the two schedules on one device.

  ``synchronous``: the (refresh, other) step times of the synchronous
  schedule if measured already.
  """
  tx = transform(refresh_schedule='staggered')
  state: Any = tx.init(grads)
  phases = sorted({int(p) for p in jax.tree.leaves(state.projectors.phases)})
  idle = next(p for p in range(GAP) if p not in phases)
  times = step_times(tx, grads, [GAP + p for p in [idle, *phases]])
  sync_refresh, sync_steady = synchronous or step_times(
      transform(), grads, [GAP, GAP + 1])
  return {
      'synchronous: refresh step': sync_refresh,
      'synchronous: other steps': sync_steady,
      'staggered: worst step': max(times[1:]),
      'staggered: median refitting step': statistics.median(times[1:]),
      'staggered: step refitting nothing': times[0],
      'staggered: steps refitting something, of T': len(phases),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n')[0])
  parser.add_argument('--size', default='60M', choices=list(llama.LLAMA_SHAPES))
  args = parser.parse_args(argv)
  grads = layer_gradients(args.size)
  count = len(jax.tree.leaves(grads))
  print(f'LLaMA-{args.size}: {count} projected matrices, rank {RANK},'
        f' T = {GAP}, {os.cpu_count()} CPU cores\n')
  print('| refresh on a mesh | refresh step (s) | other steps (s) |')
  print('|---|---:|---:|')
  rows = mesh_rows(grads)
  for name, refresh, steady in rows:
    print(f'| {name} | {refresh:.3f} | {steady:.3f} |')
  print('\n| one device, step | seconds |')
  print('|---|---:|')
  for name, value in staggered_rows(grads, rows[0][1:]).items():
    print(f'| {name} | {value:.3f} |' if isinstance(value, float)
          else f'| {name} | {value} |')


def _relaunch_with_devices() -> None:
  """Starts this script again with 8 simulated CPU devices."""
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
  env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', ''), *FLAGS]).strip()
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == '__main__':
  if FLAGS[0] not in os.environ.get('XLA_FLAGS', ''):
    _relaunch_with_devices()
  main()
