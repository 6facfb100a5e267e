"""The memory benchmark's measurements, on sizes that take seconds.

``benchmarks/benchmark_memory.py`` measures with `flora_jax_examples.llama`
(the LLaMA model and its compiled step) and
`flora_jax_examples.memory_tables` (the optimizers and tables), tested here
directly; the script itself is run as a subprocess. These tests pin what its
tables rely on: the state bytes of the baselines follow from the parameter
bytes, the LLaMA model it compiles is a working language model (unrolled or
stacked and scanned, with or without checkpointing, the same model), and the
compiled step's sizes add up.
"""

import dataclasses
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
# Two layers, stacked, scanned and checkpointed, as section 3's models.
STACKED = dataclasses.replace(MICRO, name='stacked micro', layers=2,
                              stacked=True, remat=True)
# Sixteen layers, stacked: their gradient (40 MiB) is most of the ordinary
# step's temporaries (vocab 512, 64 tokens). Rank 32 projects every matrix.
FUSED = llama.StepModel('fused micro', 256, 512, 16, 512, 1, 64, 32,
                        stacked=True, remat=True)


def random_params(abstract, seed, scale=0.02):
  """Real weights for an abstract tree: norms 1 + N(0, scale), matrices
  N(0, scale)."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (a.ndim == 1) + scale * jax.random.normal(k, a.shape, a.dtype)
      for a, k in zip(leaves, keys, strict=True)])


def unrolled_and_stacked_params(seed):
  """STACKED's weights, as a per-layer list and stacked."""
  unrolled = random_params(
      dataclasses.replace(STACKED, stacked=False).params(), seed, scale=0.1)
  return unrolled, llama.stack_layers(unrolled)


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
  params = random_params(MICRO.params(), 0)
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


def test_scanned_and_checkpointed_model_is_the_unrolled_model():
  unrolled, stacked = unrolled_and_stacked_params(4)
  assert (jax.tree.map(jnp.shape, stacked)
          == jax.tree.map(jnp.shape, STACKED.params()))
  tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, STACKED.vocab)
  value_and_grad = jax.jit(jax.value_and_grad(llama.lm_loss),
                           static_argnums=2)
  loss, grads = value_and_grad(unrolled, tokens, False)
  scanned_loss, scanned_grads = value_and_grad(stacked, tokens, False)
  remat_loss, remat_grads = value_and_grad(stacked, tokens, True)
  # Scanning the stacked layers computes what the unrolled list does.
  assert jnp.allclose(scanned_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5),
               scanned_grads, llama.stack_layers(grads))
  # Checkpointing recomputes the same activations: the same gradients.
  assert jnp.allclose(remat_loss, scanned_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-6),
               remat_grads, scanned_grads)


def assert_close(actual, expected, rtol):
  """``actual`` within ``rtol`` of ``expected``'s largest magnitude."""
  scale = float(jnp.abs(expected).max())
  assert float(jnp.abs(actual - expected).max()) <= rtol * scale


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_stacked_step_sizes_add_up(dtype):
  model = dataclasses.replace(STACKED, dtype=dtype)
  m = llama.compile_step_memory(model, optax.adamw(1e-3))
  itemsize = jnp.dtype(dtype).itemsize
  assert m.params == m.gradients == (
      itemsize * llama.parameter_count(STACKED.params()))
  assert m.opt_state == 2 * m.params + 4  # moments in the params' dtype
  assert m.state_dtypes == (jnp.dtype(dtype).name,)
  tokens = 4 * model.batch * (model.seq_len + 1)
  assert abs(m.argument - (m.params + m.opt_state + tokens)) <= 128
  assert abs(m.alias - m.persistent) <= 128
  assert m.activations_and_other == m.temp - m.gradients > 0


def test_peak_table_columns_and_fits():
  def memory(params, opt_state, temp):
    return llama.StepMemory(params, opt_state, params + opt_state + 8,
                            params + opt_state + 4, params + opt_state, temp,
                            0.0, ('float32',))
  gib = memory_tables.GIB
  results = {'optax.adamw': memory(6 * gib, 12 * gib, 12 * gib),
             'small': memory(6 * gib, 1 * gib, 12 * gib)}
  rows = memory_tables.peak_table(results).splitlines()
  assert 'peak estimate (GiB)' in rows[0] and len(rows) == 4
  # AdamW: 30 GiB; 'small': 19 GiB.
  assert rows[2].endswith('| 30.00 | 100.0% | no | yes | yes |')
  assert rows[3].startswith('| small | float32 | 6.00 | 6.00 | 1.00 | 12.00 '
                            '| 6.00 | 19.00 | 63.3% | yes | yes | yes |')
  assert memory_tables.fits(int(0.95 * 24 * gib), 24)
  assert not memory_tables.fits(int(0.95 * 24 * gib) + 1, 24)


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


def test_fused_step_saves_most_of_the_stacked_gradient():
  """Section 4: the fused step's peak is lower by about (L-1)/L of the
  stack's gradient (one layer's gradient remains)."""
  stack = llama.stack_bytes(FUSED)
  assert stack == 4 * FUSED.layers * (4 * 256**2 + 3 * 256 * 512 + 2 * 256)
  # AdamW only: a Flora step takes 5 s to compile at any size; the
  # benchmark's section 4 measures Flora, GaLore and Fira at 60M to 7B.
  for tx in (optax.adamw(1e-3),):
    row = memory_tables.FusedComparison(
        FUSED, 'tx', llama.compile_step_memory(FUSED, tx),
        llama.compile_step_memory(FUSED, tx, fused=True))
    # The same donated parameters and state: only temporaries differ.
    assert row.fused.persistent == row.ordinary.persistent
    assert row.expected == 15 * stack // 16
    assert row.saving >= 0.8 * row.expected, (tx, row.ratio)


def test_script_writes_the_state_plots_and_report(tmp_path):
  pytest.importorskip('matplotlib')
  run = subprocess.run(
      [sys.executable, str(BENCHMARK), '--models', '60M', '--ranks', '128',
       '256', '--skip-step', '--skip-peak', '--skip-fused', '--skip-recipe',
       '--out', str(tmp_path)],
      capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  written = sorted(p.name for p in tmp_path.iterdir())
  assert written == ['memory.md', 'state_vs_model_size_rank256.png',
                     'state_vs_rank_60M.png']
  printed = run.stdout
  assert f'jax {jax.__version__}' in printed and 'backend' in printed
  assert (tmp_path / 'memory.md').read_text().startswith('# Memory benchmark')


def test_memory_report_on_llama_1b_names_every_leaf_and_sums_to_the_table():
  """The report's totals are the state table's bytes, leaf by leaf named."""
  params = llama.llama_params(*llama.LLAMA_SHAPES['1B'])
  count = len(jax.tree.leaves(params))
  for spec in memory_tables.state_optimizers():
    tx = spec.build(256)
    report = flora_jax.memory_report(tx, params)
    assert report.state_bytes == memory_tables.state_size(tx, params), (
        spec.label)
    assert len(report.leaves) == count
    for leaf in report.leaves:
      # Projected with a side and rank, or kept full-size with a reason.
      assert leaf.projected != bool(leaf.reason), (spec.label, leaf.path)
      if leaf.projected:
        assert leaf.plan is not None and leaf.plan.rank == 256
    table = str(report)
    assert f'({report.state_bytes:,} bytes)' in table
