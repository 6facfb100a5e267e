"""Flora and Fira sharded across 2 processes x 4 CPU devices, as one job.

Starts two `multiprocess_worker.py` processes joined by `jax.distributed`
on localhost (CPU collectives: gloo), which train on a (2, 4) mesh whose
'data' axis spans them, check the state layout, and save and restore an
orbax checkpoint from both processes (see the worker's docstring for what
each checks, bit for bit). Here their gathered results are compared with
each other (identical) and with the same training in this process on one
device.

It starts processes of its own, so it runs only when asked; `.ci/run` runs
it in a step of its own:

  FLORA_JAX_MULTIPROCESS=1 python -m pytest -p no:xdist -p no:cacheprovider \
      -q tests/test_multiprocess.py
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multiprocess_worker as worker

ENV = 'FLORA_JAX_MULTIPROCESS'
TIMEOUT_S = 240


def _gloo_available():
  try:
    from jax._src.lib import _jax
  except ImportError:
    return False
  return hasattr(_jax, 'make_gloo_tcp_collectives')


pytestmark = [
    pytest.mark.skipif(
        os.environ.get(ENV) != '1',
        reason=f'starts 2 processes: set {ENV}=1 (CI runs it on its own)'),
    pytest.mark.skipif(not _gloo_available(),
                       reason='this jaxlib has no gloo CPU collectives'),
]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_workers(out_dir):
  port = _free_port()
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=(f'--xla_force_host_platform_device_count='
                 f'{worker.LOCAL_DEVICES} '
                 '--xla_cpu_enable_concurrency_optimized_scheduler=false'),
  )
  script = pathlib.Path(worker.__file__)
  procs, logs = [], []
  for i in range(worker.NUM_PROCESSES):
    log = out_dir / f'process_{i}.log'
    with open(log, 'wb') as f:
      procs.append(subprocess.Popen(
          [sys.executable, str(script), str(i), str(worker.NUM_PROCESSES),
           str(port), str(out_dir)],
          env=env, stdout=f, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _wait(procs, logs, deadline):
  """Waits for every worker; the first failure or the deadline ends all.

  Returns an error message with the workers' output, or None."""
  error = None
  while error is None and any(p.poll() is None for p in procs):
    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    if failed:
      error = f'process {failed[0]} exited with {procs[failed[0]].poll()}'
    elif time.monotonic() > deadline:
      error = f'timed out after {TIMEOUT_S} s'
    else:
      time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if error is None and any(p.returncode for p in procs):
    error = f'exit codes {[p.returncode for p in procs]}'
  if error is None:
    return None
  outputs = '\n'.join(f'----- process {i} -----\n{log.read_text()}'
                      for i, log in enumerate(logs))
  print(outputs)
  return f'{error}\n{outputs}'


def _one_process_reference():
  """The workers' training, in this process on one device."""
  results = {}
  batches = [tuple(map(jnp.asarray, xy)) for xy in worker.batches_np()]
  params = jax.tree.map(jnp.asarray, worker.params_np())
  for name, make in worker.OPTIMIZERS.items():
    tx = make()
    step = jax.jit(worker.make_step(tx))
    p, s = params, jax.jit(tx.init)(params)
    losses = []
    for x, y in batches:
      p, s, loss = step(p, s, x, y)
      losses.append(loss)
    results[name] = {'losses': jnp.stack(losses),
                     **worker.host_tree({'params': p, 'opt_state': s})}
  return results


def test_two_processes_train_checkpoint_and_match_one_process(tmp_path):
  deadline = time.monotonic() + TIMEOUT_S
  procs, logs = _start_workers(tmp_path)
  try:
    reference = _one_process_reference()  # while the workers run
  finally:
    error = _wait(procs, logs, deadline)
  assert error is None, error

  names = worker.flat_names(reference)
  want = jax.tree.leaves(reference)
  got = []
  for i in range(worker.NUM_PROCESSES):
    with np.load(tmp_path / f'process_{i}.npz') as npz:
      got.append([npz[f'arr_{j}'] for j in range(len(npz.files))])
    assert len(got[i]) == len(want), (len(got[i]), names)
  # Both processes gathered the same global values.
  for name, a, b in zip(names, *got, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=name)
  # And they equal one process on one device. Not bit for bit: the sharded
  # step sums across devices (and processes, through gloo) in another order
  # than one device does, so float32 rounding differs in the last bits and
  # a few steps of an adaptive optimizer carry that along. The keys and
  # counts are exact.
  for name, a, b in zip(names, got[0], want, strict=True):
    b = np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.dtype, b.dtype)
    if not np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < 1e-5, (name, err)
