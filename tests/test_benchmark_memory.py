"""The memory benchmark's measurements, on sizes that take seconds.

``benchmarks/benchmark_memory.py`` measures with `flora_jax_examples.llama`
(the LLaMA model and its compiled step) and
`flora_jax_examples.memory_tables` (the optimizers and tables), tested here
directly; the script itself is run as a subprocess. These tests pin what its
tables rely on: the state bytes of the baselines follow from the parameter
bytes, the LLaMA model it compiles is a working language model, and the
compiled step's sizes add up.
"""

import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import flora_jax
from flora_jax_examples import llama
from flora_jax_examples import memory_tables

BENCHMARK = (pathlib.Path(__file__).parents[1] / 'benchmarks'
             / 'benchmark_memory.py')

# One layer, every matrix side >= 128 so that rank 32 projects all of them.
MICRO = llama.StepModel('micro', 128, 256, 1, 512, 1, 16, 32)


def test_llama_60m_shapes_and_baseline_state_bytes():
  params = llama.llama_params(*llama.LLAMA_SHAPES['60M'])
  count = llama.parameter_count(params)
  # 2 * vocab * d (embed + untied head) + per layer 4 d^2 + 3 d ffn + 2 d, + d.
  assert count == 2 * 32000 * 512 + 8 * (4 * 512**2 + 3 * 512 * 1376
                                         + 2 * 512) + 512
  sizes = memory_tables.measure_states(['60M'], [128])
  adamw = sizes['optax.adamw', None, '60M']
  assert adamw == 2 * 4 * count + 4  # two float32 moments and a counter
  assert sizes['optax.MultiSteps(adamw, 4)', None, '60M'] > 1.49 * adamw
  # The compressor in front of AdamW saves nothing: only its counter and key.
  compress = sizes['chain(flora_compress, adamw)', 128, '60M']
  assert adamw < compress <= adamw + 16
  assert sizes['flora_jax.flora', 128, '60M'] < 0.4 * adamw
  # optax.contrib.galore's choices, reproduced: the same arrays, plus a key
  # and a counter.
  ours = sizes["flora_jax.galore, side='larger', max_aspect_ratio=None",
               128, '60M']
  assert 0 < ours - sizes['optax.contrib.galore', 128, '60M'] <= 16


def test_state_table_has_a_row_per_optimizer_and_rank():
  sizes = memory_tables.measure_states(['60M'], [128, 256])
  table = memory_tables.state_table(sizes, ['60M'], [128, 256])
  rows = table.splitlines()[2:]
  optimizers = memory_tables.state_optimizers()
  ranked = sum(spec.uses_rank for spec in optimizers)
  assert len(rows) == len(optimizers) + ranked
  assert rows[0].startswith('| optax.adamw | – |') and '(100.0%)' in rows[0]


def test_llama_loss_is_near_uniform_at_small_init_and_differentiable():
  abstract = llama.llama_params(MICRO.d_model, MICRO.ffn, MICRO.layers,
                                MICRO.vocab)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(treedef, [
      jnp.ones(a.shape) if a.ndim == 1
      else 0.02 * jax.random.normal(k, a.shape)
      for a, k in zip(leaves, keys, strict=True)])
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, MICRO.vocab)
  loss, grads = jax.jit(jax.value_and_grad(llama.lm_loss))(params, tokens)
  assert abs(float(loss) - math.log(MICRO.vocab)) < 0.1
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['layers'][0]['attn']['q']).max()) > 0


def test_causal_attention_ignores_the_future():
  abstract = llama.llama_params(MICRO.d_model, MICRO.ffn, MICRO.layers,
                                MICRO.vocab)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      0.1 * jax.random.normal(k, a.shape)
      for a, k in zip(leaves, keys, strict=True)])
  x = jax.random.normal(jax.random.key(3), (1, 8, MICRO.d_model))
  changed = x.at[:, 5:].set(0.0)
  attn = params['layers'][0]['attn']
  attention = jax.jit(llama.attention)
  out, out_changed = attention(attn, x), attention(attn, changed)
  assert jnp.allclose(out[:, :5], out_changed[:, :5], atol=1e-5)
  assert not jnp.allclose(out[:, 5:], out_changed[:, 5:], atol=1e-3)


@pytest.mark.parametrize('name', ['adamw', 'flora'])
def test_compiled_step_sizes_add_up(name):
  tx = {'adamw': optax.adamw(1e-3),
        'flora': flora_jax.flora(1e-3, rank=MICRO.rank)}[name]
  m = llama.compile_step_memory(MICRO, tx)
  params = llama.llama_params(MICRO.d_model, MICRO.ffn, MICRO.layers,
                              MICRO.vocab)
  assert m.params == 4 * llama.parameter_count(params)
  tokens = 4 * MICRO.batch * (MICRO.seq_len + 1)
  # Within a few bytes: XLA leaves out Adafactor's (1,)-shaped placeholders,
  # which pass through the step untouched.
  assert abs(m.argument - (m.persistent + tokens)) <= 128
  # Donated: every new parameter and state buffer reuses an input's.
  assert abs(m.alias - m.persistent) <= 128
  assert m.peak == m.argument + m.output - m.alias + m.temp
  assert m.temp > 0
  if name == 'adamw':
    assert m.opt_state == 2 * m.params + 4


def test_script_writes_the_state_plots_and_report(tmp_path):
  pytest.importorskip('matplotlib')
  run = subprocess.run(
      [sys.executable, str(BENCHMARK), '--models', '60M', '--ranks', '128',
       '256', '--skip-step', '--out', str(tmp_path)],
      capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  written = sorted(p.name for p in tmp_path.iterdir())
  assert written == ['memory.md', 'state_vs_model_size_rank256.png',
                     'state_vs_rank_60M.png']
  printed = run.stdout
  assert f'jax {jax.__version__}' in printed and 'backend' in printed
  assert (tmp_path / 'memory.md').read_text().startswith('# Memory benchmark')
