"""fused_train_step: the ordinary step's result without its stacked gradient.

On a small scanned LLaMA-style decoder (4 layers): one fused step from the
same parameters and state equals one ordinary ``jax.grad`` + ``tx.update`` +
``optax.apply_updates`` step, at each of the first steps (across a Flora
resample and a GaLore / Fira refresh); 50-step loss curves coincide;
compressed accumulation equals the ordinary `FloraMultiSteps` and a
reference computed by hand; transforms that combine layers are refused.
The compiled memory is checked in test_step_memory.py and
test_benchmark_memory.py, the sharded step in test_fused_sharding.py.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import projections
from flora_jax._src import keys
from flora_jax._src import settings
from flora_jax_examples import byte_lm
from flora_jax_examples import llama

D_MODEL, FFN, LAYERS, VOCAB, BATCH, SEQ = 64, 96, 4, 64, 2, 8
RANK, GAP = 4, 2  # a resample / refresh every 2 steps


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = llama.llama_params(D_MODEL, FFN, LAYERS, VOCAB, stacked=True)
  return jax.tree.map(
      lambda s: (np.ones(s.shape, np.float32) if s.shape[-1:] == (D_MODEL,)
                 and len(s.shape) <= 2 and s.shape[0] in (LAYERS, D_MODEL)
                 and s.shape != (VOCAB, D_MODEL)
                 else rng.standard_normal(s.shape).astype(np.float32) * 0.1),
      shapes)


PARAMS = _params()
# Four batches, over and over: the model memorises them, the loss falls.
BATCHES = [np.random.default_rng(100 + t % 4).integers(0, VOCAB,
                                                       (BATCH, SEQ + 1))
           for t in range(50)]
OPTIMIZERS = {
    'adamw': lambda: optax.adamw(1e-2, weight_decay=0.1),
    'flora': lambda: flora_jax.flora(1e-2, rank=RANK, kappa=GAP, min_dim=16,
                                     min_dim_size_to_factor=16),
    # Stored projectors, each stacked slice re-drawn at its own step.
    'flora_staggered': lambda: flora_jax.flora(
        1e-2, rank=RANK, kappa=GAP, min_dim=16, min_dim_size_to_factor=16,
        store_projectors=True, refresh_schedule='staggered'),
    'galore': lambda: flora_jax.galore(1e-2, rank=RANK, update_proj_gap=GAP,
                                       min_dim=16),
    'fira': lambda: flora_jax.fira(1e-2, rank=RANK, update_proj_gap=GAP,
                                   min_dim=16),
}


def _ordinary(tx):
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(llama.lm_loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step)


def _fused(tx, params=PARAMS):
  return jax.jit(llama.fused_train_step_fn(tx, params))


def _relative_errors(a, b):
  """Per floating leaf: |a - b| / |a| (Frobenius), keys and ints skipped."""
  errors = {}
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b), strict=True):
    if jnp.issubdtype(x.dtype, jnp.floating):
      norm = float(jnp.linalg.norm(x))
      errors[jax.tree_util.keystr(path)] = float(
          jnp.linalg.norm(x - y)) / max(norm, 1e-30)
  return errors


@functools.cache
def _runs(name):
  """50 ordinary steps; one fused step from each of the first 5 states."""
  tx = OPTIMIZERS[name]()
  ordinary, fused = _ordinary(tx), _fused(tx)
  params, state = PARAMS, tx.init(PARAMS)
  ordinary_losses, fused_losses, one_step = [], [], []
  for t, tokens in enumerate(BATCHES):
    if t < 5:
      one_step.append((ordinary(params, state, tokens),
                       fused(params, state, tokens)))
    params, state, loss = ordinary(params, state, tokens)
    ordinary_losses.append(float(loss))
  params, state = PARAMS, tx.init(PARAMS)
  for tokens in BATCHES:
    params, state, loss = fused(params, state, tokens)
    fused_losses.append(float(loss))
  return one_step, np.array(ordinary_losses), np.array(fused_losses)


# The suite at the minimum versions (no slow tests) checks AdamW only.
SLOW_BUT_ADAMW = [name if name == 'adamw' else
                  pytest.param(name, marks=pytest.mark.slow)
                  for name in OPTIMIZERS]


@pytest.mark.parametrize('name', SLOW_BUT_ADAMW)
def test_one_fused_step_equals_the_ordinary_step(name):
  one_step, _, _ = _runs(name)
  for t, ((p1, s1, l1), (p2, s2, l2)) in enumerate(one_step):
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    worst = max(_relative_errors(p1, p2).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, (t, worst)
    # The state too: the same counters, keys and settings, moments within
    # float noise (GaLore's projectors: an SVD of float-noisy gradients).
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
      if not jnp.issubdtype(a.dtype, jnp.floating):
        assert bool(jnp.all(jax.random.key_data(a) == jax.random.key_data(b))
                    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                    else jnp.all(a == b))
    worst = max(_relative_errors(s1, s2).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-4, (t, worst)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_fifty_step_loss_curves_coincide(name):
  _, ordinary, fused = _runs(name)
  assert ordinary[-1] < ordinary[0] - 0.5  # it trains
  np.testing.assert_allclose(fused, ordinary, rtol=1e-4)


@pytest.mark.slow
def test_the_step_counter_advances_once_per_step():
  _, (_, state, _) = _runs('galore')[0][0]
  assert int(state[0].count) == 1


# ------------------------------------------------------------- 8-bit state


@pytest.mark.slow
def test_8bit_state_fused_step_equals_the_ordinary_step():
  """AdamW with its moments in 8 bits: each layer decodes, updates and
  codes its own slices. Codes equal but for the rare value at a threshold,
  where float noise tips it to the neighbouring code."""
  tx = flora_jax.quantize_state(OPTIMIZERS['adamw'](), min_size=128,
                                block_size=32, recompute=False)
  ordinary, fused = _ordinary(tx), _fused(tx)
  state = tx.init(PARAMS)
  codes = [x for x in jax.tree.leaves(state.inner_state)
           if x.dtype == jnp.uint8]
  assert any(x.ndim == 3 for x in codes)  # stacked slices are coded
  params = PARAMS
  for tokens in BATCHES[:3]:
    p1, s1, _ = ordinary(params, state, tokens)
    p2, s2, _ = fused(params, state, tokens)
    assert max(_relative_errors(p1, p2).values()) <= 1e-5
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
      if a.dtype == jnp.uint8:
        differ = np.asarray(a) != np.asarray(b)
        assert differ.mean() < 1e-3
        assert (np.abs(np.asarray(a, int) - np.asarray(b, int))[differ]
                == 1).all()
    assert max(_relative_errors(s1.scales, s2.scales).values()) <= 1e-4
    params, state = p1, s1


# ------------------------------------------------------------ accumulation


ACCUMULATE = 4
ACC_RULE = flora_jax.ProjectionRule(RANK, min_dim=16)


def _accumulating():
  return flora_jax.FloraMultiSteps(optax.adamw(1e-2), ACCUMULATE,
                                   rule=ACC_RULE, key=3)


@functools.cache
def _accumulated_runs():
  tx = _accumulating()
  ordinary, fused = _ordinary(tx), _fused(tx)
  runs = []
  for step in (ordinary, fused):
    params, state = PARAMS, tx.init(PARAMS)
    trajectory = []
    for tokens in BATCHES[:2 * ACCUMULATE]:
      params, state, _ = step(params, state, tokens)
      trajectory.append((params, state))
    runs.append(trajectory)
  return runs


@pytest.mark.slow
def test_compressed_accumulation_equals_the_ordinary_flora_multisteps():
  ordinary, fused = _accumulated_runs()
  for t, ((p1, s1), (p2, s2)) in enumerate(zip(ordinary, fused,
                                                strict=True)):
    assert int(s1.mini_step) == int(s2.mini_step) == (t + 1) % ACCUMULATE
    assert max(_relative_errors(p1, p2).values()) <= 1e-5, t
    assert max(_relative_errors(s1.acc_sketch, s2.acc_sketch).values()
               ) <= 1e-5, t


@pytest.mark.slow
def test_compressed_accumulation_equals_the_formula():
  """After 4 micro-batches: AdamW on up(sum_i down(G_i)) / 4, by hand."""
  _, fused = _accumulated_runs()
  grad = jax.jit(jax.grad(llama.lm_loss))
  grads = [grad(PARAMS, tokens) for tokens in BATCHES[:ACCUMULATE]]
  plans = ACC_RULE.plan(PARAMS)
  key = jax.random.key(3)

  def mean(plan, *leaves):
    if not plan.projected:
      return sum(leaves) / ACCUMULATE
    q = projections.random_projector(key, plan, 0)  # the first cycle's
    sketch = sum(projections.project_down(q, g, plan.side) for g in leaves)
    return projections.project_up(q, sketch, plan.side) / ACCUMULATE

  mean_grad = jax.jit(lambda *g: jax.tree.map(mean, plans, *g))(*grads)
  adamw = optax.adamw(1e-2)
  updates, _ = adamw.update(mean_grad, adamw.init(PARAMS), PARAMS)
  expected = optax.apply_updates(PARAMS, updates)
  params, _ = fused[ACCUMULATE - 1]
  assert any(p.projected for p in jax.tree.leaves(plans))
  assert max(_relative_errors(expected, params).values()) <= 1e-5
  for params, _ in fused[:ACCUMULATE - 1]:  # nothing moves mid-cycle
    assert max(_relative_errors(PARAMS, params).values()) == 0.0


# ---------------------------------------------------------------- refusals


def _build(tx, params=PARAMS, **kwargs):
  kwargs = {'stack': 'layers', 'embed': llama.embed_tokens,
            'layer': lambda layer, x, tokens: llama.decoder_layer(layer, x),
            'head': llama.head_loss, **kwargs}
  return flora_jax.fused_train_step(tx, params, **kwargs)


@pytest.mark.parametrize('tx, leaf, operation', [
    (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
     'update of embed', 'combines layers'),
    (optax.adafactor(1e-3), 'layers/attn/k', 'over the layer axis'),
    (optax.lamb(1e-3), 'layers/attn/k', 'over the layer axis'),
], ids=['clip_by_global_norm', 'adafactor', 'lamb'])
def test_a_transform_that_combines_layers_is_refused_at_build(tx, leaf,
                                                              operation):
  with pytest.raises(ValueError, match='cannot be applied one layer') as err:
    _build(tx)
  assert leaf in str(err.value) and operation in str(err.value)


def test_optax_multisteps_is_refused_with_the_alternative():
  with pytest.raises(ValueError, match='FloraMultiSteps'):
    _build(optax.MultiSteps(optax.adam(1e-3), 4))


def test_stacked_vectors_keep_their_whole_leaf_statistics():
  """Norm scales are updated with the rest: a per-leaf clip stays exact."""
  tx = optax.chain(
      optax.masked(optax.clip_by_block_rms(1e-3),
                   lambda p: jax.tree.map(lambda x: x.ndim < 3, p)),
      optax.sgd(1.0))
  step = _fused(tx)
  p1, _, _ = _ordinary(tx)(PARAMS, tx.init(PARAMS), BATCHES[0])
  p2, _, _ = step(PARAMS, tx.init(PARAMS), BATCHES[0])
  assert max(_relative_errors(p1, p2).values()) <= 1e-5


def test_aux_outputs_are_metrics_and_the_step_is_still_exact():
  rng = np.random.default_rng(0)
  params = {'w_in': rng.standard_normal((4, 8), np.float32),
            'layers': {'w': rng.standard_normal((3, 8, 8), np.float32) / 3},
            'w_out': rng.standard_normal((8, 1), np.float32)}
  x = rng.standard_normal((5, 4), np.float32)

  def head(p, h, x):
    out = h @ p['w_out']
    return jnp.mean(out ** 2), {'max': jnp.max(out)}

  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None),
                        x @ p['w_in'], p['layers']['w'])
    return head(p, h, x)[0]

  tx = optax.sgd(0.1, momentum=0.9)
  step = flora_jax.fused_train_step(
      tx, params, stack='layers', embed=lambda p, x: x @ p['w_in'],
      layer=lambda lp, h, x: jnp.tanh(h @ lp['w']), head=head, has_aux=True)
  new, _, metrics = step(params, tx.init(params), x)
  grads = jax.grad(loss)(params, x)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  assert max(_relative_errors(expected, new).values()) <= 1e-6
  assert set(metrics) == {'loss', 'max'}
  assert float(metrics['loss']) == pytest.approx(float(loss(params, x)))


def test_bad_arguments_are_refused_at_build():
  with pytest.raises(TypeError, match='tx must be'):
    _build(object())
  with pytest.raises(TypeError, match='layer must be a function'):
    _build(optax.sgd(0.1), layer=None)


def test_bad_stack_paths_are_refused():
  with pytest.raises(ValueError, match='names no leaves'):
    _build(optax.sgd(0.1), stack='blocks')
  uneven = {**PARAMS, 'layers': {**PARAMS['layers'],
                                 'attn_norm': np.ones((3, D_MODEL))}}
  with pytest.raises(ValueError, match='leading'):
    _build(optax.sgd(0.1), params=uneven)


# ------------------------------------------------------- per-slice draws


def test_a_stacked_projection_is_drawn_slice_by_slice():
  plan = flora_jax.ProjectionRule(2, min_dim=4).leaf_plan('w', (3, 6, 8))
  key = jax.random.key(7)
  stack = projections.gaussian_projector(key, plan)
  assert stack.shape == (3, 6, 2)
  for s in range(3):
    alone = jax.random.normal(jax.random.fold_in(key, s), (6, 2)) / np.sqrt(2)
    np.testing.assert_allclose(stack[s], alone, rtol=1e-6)
  one_layer = flora_jax.ProjectionRule(2, min_dim=4).leaf_plan('w', (1, 6, 8))
  with keys.drawing_layer(jnp.int32(2)):
    np.testing.assert_array_equal(
        projections.gaussian_projector(key, one_layer)[0], stack[2])


def test_states_of_regenerated_stacked_projections_record_it():
  """A 0.4 checkpoint (one draw per stack) is refused, not misread."""
  tx = flora_jax.flora(1e-2, rank=RANK, kappa=GAP, min_dim=16)
  state = tx.init(PARAMS)
  momentum_state = state[1]
  (recorded,) = momentum_state.settings
  assert 'stacked_draws=per_slice' in recorded
  old = momentum_state._replace(settings={
      recorded.replace(' stacked_draws=per_slice', ''): jnp.int8(0)})
  with pytest.raises(ValueError, match='stacked_draws'):
    tx.update(PARAMS, (state[0], old, *state[2:]), PARAMS)
  unstacked = {'w': np.ones((32, 32), np.float32)}
  (plain,) = flora_jax.flora(1e-2, rank=RANK, min_dim=16).init(
      unstacked)[1].settings
  assert 'stacked_draws' not in plain and settings.is_settings(
      {plain: jnp.int8(0)})


# --------------------------------------------------------------------- NNX


class _ScannedLM(nnx.Module):
  """The byte-level LM's blocks, stacked with nnx.vmap, run with nnx.scan."""

  def __init__(self, cfg, rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                           rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return byte_lm.Block(cfg, rngs=rngs)

    self.blocks = blocks(rngs)
    self.final_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def head(self, x, tokens):
    logits = self.embed.attend(self.final_norm(x))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(self.embed(tokens[:, :-1]), self.blocks), tokens)


NNX_CONFIG = byte_lm.ModelConfig(vocab_size=64, seq_len=SEQ, d_model=32,
                                 num_heads=2, num_layers=LAYERS, d_mlp=64)


def _nnx_fused(model, optimizer):
  return flora_jax.nnx.fused_train_step(
      model, optimizer, stack='blocks',
      embed=lambda model, tokens: model.embed(tokens[:, :-1]),
      layer=lambda block, x, tokens: block(x),
      head=lambda model, x, tokens: model.head(x, tokens))


@pytest.mark.slow
def test_nnx_fused_step_equals_the_nnx_optimizer_step():
  tx = flora_jax.flora(1e-2, rank=RANK, kappa=GAP, min_dim=16)
  ordinary_model = _ScannedLM(NNX_CONFIG, nnx.Rngs(0))
  fused_model = _ScannedLM(NNX_CONFIG, nnx.Rngs(0))
  ordinary_opt = nnx.Optimizer(ordinary_model, tx, wrt=nnx.Param)
  fused_opt = nnx.Optimizer(fused_model, tx, wrt=nnx.Param)

  @nnx.jit
  def ordinary(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lambda m: m(tokens))(model)
    optimizer.update(model, grads)
    return loss

  fused = _nnx_fused(fused_model, fused_opt)
  for tokens in BATCHES[:4]:
    loss = ordinary(ordinary_model, ordinary_opt, tokens)
    metrics = fused(fused_model, fused_opt, tokens)
    assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-6)
  errors = _relative_errors(nnx.state(ordinary_model, nnx.Param),
                            nnx.state(fused_model, nnx.Param))
  assert max(errors.values()) <= 1e-5
  assert int(fused_opt.step[...]) == int(ordinary_opt.step[...]) == 4


def test_nnx_stack_with_untrained_variables_is_refused():
  model = _ScannedLM(NNX_CONFIG, nnx.Rngs(0))
  model.blocks.counter = nnx.BatchStat(jnp.zeros((LAYERS,)))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match='not trained'):
    _nnx_fused(model, optimizer)


@pytest.mark.slow
def test_apollo_fused_steps_equal_the_ordinary_steps():
  """APOLLO's per-slice scales and limiter norms split by layer exactly."""
  tx = flora_jax.apollo(1e-2, rank=RANK, update_proj_gap=2, min_dim=16)
  ordinary, fused = _ordinary(tx), _fused(tx)
  p1 = p2 = PARAMS
  s1 = s2 = tx.init(PARAMS)
  for tokens in BATCHES[:3]:  # a new projection at the third step
    p1, s1, l1 = ordinary(p1, s1, tokens)
    p2, s2, l2 = fused(p2, s2, tokens)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  worst = max(_relative_errors(p1, p2).items(), key=lambda kv: kv[1])
  assert worst[1] <= 1e-5, worst
  worst = max(_relative_errors(s1, s2).items(), key=lambda kv: kv[1])
  assert worst[1] <= 1e-4, worst
