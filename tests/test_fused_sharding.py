"""The fused step on a (data, model) mesh of 8 devices equals one device.

Needs 8 devices (``--xla_force_host_platform_device_count=8``, in a process
of its own; skipped otherwise): `.ci/run` runs it with test_sharding.py.
Data parallel over ``data`` (the batch), tensor parallel over ``model`` (the
kernels' output or input axis), the optimizer state laid out by
`flora_jax.state_shardings`, parameters and state donated.
"""

import functools

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import flora_jax
from flora_jax_examples import llama

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason='needs 8 (simulated) devices'
)

D_MODEL, FFN, LAYERS, VOCAB, BATCH, SEQ = 64, 96, 4, 64, 4, 8
STEPS = 3  # a resample / refresh at the third
OPTIMIZERS = {
    # Factored second moments: unfactored, Adafactor's first step is
    # sign(g), which turns a rounding of a near-zero gradient into a jump.
    'flora': lambda: flora_jax.flora(1e-2, rank=4, kappa=2, min_dim=16,
                                     min_dim_size_to_factor=16),
    'galore': lambda: flora_jax.galore(1e-2, rank=4, update_proj_gap=2,
                                       min_dim=16),
}
COLUMNS, ROWS = P(None, None, 'model'), P(None, 'model', None)
SPECS = {
    'embed': P(None, 'model'),
    'layers': {
        'attn': {'q': COLUMNS, 'k': COLUMNS, 'v': COLUMNS, 'o': ROWS},
        'mlp': {'gate': COLUMNS, 'up': COLUMNS, 'down': ROWS},
        'attn_norm': P(), 'mlp_norm': P(),
    },
    'final_norm': P(),
    'lm_head': P(None, 'model'),
}


def _params():
  rng = np.random.default_rng(0)
  shapes = llama.llama_params(D_MODEL, FFN, LAYERS, VOCAB, stacked=True)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1 + (
          1.0 if len(s.shape) <= 2 and s.shape[-1] == D_MODEL
          and s.shape[0] in (LAYERS, D_MODEL) else 0.0), shapes)


PARAMS = _params()
BATCHES = [np.random.default_rng(1 + t).integers(0, VOCAB, (BATCH, SEQ + 1))
           for t in range(STEPS)]


def _mesh():
  return jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(AxisType.Auto,) * 2)


def _run(step, params, state):
  losses = []
  for tokens in BATCHES:
    params, state, loss = step(params, state, tokens)
    losses.append(float(loss))
  return jax.device_get(params), losses, (params, state)


@functools.cache
def _runs(name):
  tx = OPTIMIZERS[name]()
  single = _run(jax.jit(llama.fused_train_step_fn(tx, PARAMS)), PARAMS,
                tx.init(PARAMS))
  mesh = _mesh()
  param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                 SPECS)
  state_shardings = flora_jax.state_shardings(tx, PARAMS, param_shardings)
  params = jax.device_put(PARAMS, param_shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  step = jax.jit(
      llama.fused_train_step_fn(tx, PARAMS),
      in_shardings=(param_shardings, state_shardings,
                    NamedSharding(mesh, P('data'))),
      out_shardings=(param_shardings, state_shardings, None),
      donate_argnums=(0, 1))
  single_params, single_losses, _ = single
  sharded_params, sharded_losses, last = _run(step, params, state)
  return ((single_params, single_losses), (sharded_params, sharded_losses),
          last)


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_sharded_fused_step_equals_one_device(name):
  (params, losses), (sharded_params, sharded_losses), _ = _runs(name)
  np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded_params),
                  strict=True):
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_sharded_fused_step_keeps_the_layout():
  *_, (params, state) = _runs('flora')
  mesh = _mesh()
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      SPECS, is_leaf=lambda x: isinstance(x, P)), strict=True):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                          leaf.ndim)
  tx = OPTIMIZERS['flora']()
  for leaf, sharding in zip(
      jax.tree.leaves(state),
      jax.tree.leaves(flora_jax.state_shardings(
          tx, PARAMS, jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                   SPECS))), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
