"""layer_dependence: which layers of stacked inputs each output reads."""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import flora_jax
from flora_jax._src import compat
from flora_jax._src.layer_dependence import Dependence
from flora_jax._src.layer_dependence import layer_dependence

L = 4  # Layers in every stack.
KEPT = Dependence(layer_axis=0, mixes_layers=None, reads_rest=False)
CLEAN = Dependence(layer_axis=None, mixes_layers=None, reads_rest=False)


def _abstract(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


STACK = _abstract(L, 6, 3)


def _stacks(fn, *args):
  """The dependence of ``fn(*args)``, every argument a stack."""
  return layer_dependence(fn, ('layers',) * len(args), *args)


def _assert_mixed_by(dependence, operation):
  assert dependence.layer_axis is None
  assert dependence.mixes_layers is not None
  assert dependence.mixes_layers.startswith(operation), dependence


# Hand-written functions.


def test_elementwise_keeps_the_layer_axis():
  assert _stacks(lambda x, y: jnp.tanh(x) * y + 1.0, STACK, STACK) == KEPT
  # The same axis index of two stacks laid out differently: layers paired
  # with other layers' rows.
  square = _abstract(L, L, 3)
  _assert_mixed_by(
      _stacks(lambda x, y: x + jnp.swapaxes(y, 0, 1), square, square),
      'add of stacks with different layer axes')


def test_transpose_moves_the_layer_axis():
  assert _stacks(lambda x: x.transpose(1, 0, 2), STACK).layer_axis == 1
  assert _stacks(lambda x: x.transpose(2, 1, 0), STACK).layer_axis == 2
  assert _stacks(lambda x: x.transpose(1, 2, 0).T, STACK) == KEPT


def test_reduction_over_other_axes_keeps_layers_and_over_layers_mixes():
  assert _stacks(lambda x: jnp.sum(x**2, axis=(1, 2)), STACK) == KEPT
  assert _stacks(lambda x: x.max(axis=1), STACK) == KEPT
  over_layers = _stacks(lambda x: jnp.sum(x, axis=0), STACK)
  _assert_mixed_by(over_layers, 'reduce_sum over the layer axis')
  # Located in the user code that asked for it.
  assert 'test_layer_dependence.py:' in over_layers.mixes_layers
  _assert_mixed_by(_stacks(jnp.max, STACK), 'reduce_max over the layer axis')
  # Inside a jitted library function: located by its caller.
  norm = _stacks(lambda x: jnp.linalg.norm(x), STACK)
  _assert_mixed_by(norm, 'reduce_sum over the layer axis')
  assert 'unknown location' not in norm.mixes_layers


def test_dot_general_batch_over_layers_contraction_mixes():
  y = _abstract(L, 3, 5)
  batched = _stacks(lambda x, y: jnp.einsum('lij,ljk->lik', x, y), STACK, y)
  assert batched == KEPT
  # One stack against unstacked weights: the layer axis is a free axis.
  assert layer_dependence(
      lambda x, w: jnp.einsum('lij,jk->kil', x, w), ('layers', None),
      STACK, _abstract(3, 2)).layer_axis == 2
  _assert_mixed_by(
      _stacks(lambda x, y: jnp.einsum('lij,ljk->ik', x, y), STACK, y),
      'dot_general contracting the layer axis')
  _assert_mixed_by(
      _stacks(lambda x, y: jnp.einsum('lij,mjk->limk', x, y), STACK, y),
      'dot_general pairing every layer')


def test_map_over_layers_keeps_them_and_a_carry_across_layers_mixes():
  normalized = _stacks(
      lambda x: lax.map(lambda s: s / jnp.linalg.norm(s), x), STACK)
  assert normalized == KEPT

  def running_sum(x):
    return lax.scan(lambda c, s: (c + s, c * s), jnp.zeros((6, 3)), x)

  carry, ys = _stacks(running_sum, STACK)
  _assert_mixed_by(carry, 'scan carrying a value across layers')
  _assert_mixed_by(ys, 'scan carrying a value across layers')

  def counted(x):
    return lax.scan(lambda c, s: (c + 1.0, s * c), 0.0, x)

  assert _stacks(counted, STACK) == (CLEAN, KEPT)

  # A scan over another axis: each step sees all layers of one row.
  def over_rows(x):
    _, ys = lax.scan(lambda c, s: (c, s * 2.0), 0.0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)

  assert _stacks(over_rows, STACK) == KEPT


def test_cond_predicate_is_control_but_where_predicate_is_data():
  def skip_if_all_zero(x):
    return lax.cond(jnp.any(x != 0), lambda x: x * 2.0, lambda x: x, x)

  assert _stacks(skip_if_all_zero, STACK) == KEPT

  def where(x):
    return jnp.where(jnp.any(x != 0), x * 2.0, x)

  _assert_mixed_by(_stacks(where, STACK), 'reduce_or over the layer axis')

  # Branches that disagree on the layers are joined into a mix.
  def disagreeing(x):
    return lax.cond(True, lambda x: x, lambda x: x[::-1], x)

  _assert_mixed_by(_stacks(disagreeing, STACK), 'rev of the layer axis')


def test_while_trip_count_over_layers_mixes():
  def doubling(x):
    return lax.while_loop(lambda c: jnp.max(c) < 10.0, lambda c: c * 2.0, x)

  _assert_mixed_by(_stacks(doubling, STACK), 'reduce_max over the layer axis')
  fixed = _stacks(lambda x: lax.fori_loop(0, 3, lambda i, c: c * 2.0, x),
                  STACK)
  assert fixed == KEPT


def test_reads_rest_follows_each_output():
  def fn(x, e):
    both = jax.jit(lambda x, e: (x * 2.0, e + 1.0, x * e.sum()))(x, e)
    return (*both, jnp.zeros(3) + 1.0)

  deps = layer_dependence(fn, ('layers', 'rest'), STACK, _abstract(3))
  assert deps == (
      KEPT,
      Dependence(layer_axis=None, mixes_layers=None, reads_rest=True),
      Dependence(layer_axis=0, mixes_layers=None, reads_rest=True),
      CLEAN,
  )
  # Through a cond's predicate too, although the layers do not count there.
  picked = layer_dependence(
      lambda x, e: lax.cond(e > 0, lambda x: x, lambda x: -x, x),
      ('layers', 'rest'), STACK, _abstract())
  assert picked == Dependence(layer_axis=0, mixes_layers=None,
                              reads_rest=True)


def test_decompositions_and_solves_of_stacked_matrices():
  wide = _abstract(L, 6, 9)
  svd = _stacks(lambda x: jnp.linalg.svd(x, full_matrices=False), wide)
  assert tuple(svd) == (KEPT,) * 3
  assert tuple(_stacks(jnp.linalg.qr, wide)) == (KEPT,) * 2
  assert tuple(_stacks(jnp.linalg.eigh, _abstract(L, 6, 6))) == (KEPT,) * 2
  solve = _stacks(jnp.linalg.solve, _abstract(L, 6, 6), _abstract(L, 6, 2))
  assert solve == KEPT
  # The layer axis inside each matrix.
  _assert_mixed_by(
      _stacks(lambda x: jnp.linalg.qr(jnp.swapaxes(x, 0, 1))[1], wide),
      'qr on matrices that span the layer axis')


def test_take_along_axis_and_indexing():
  values, indices = _abstract(L, 6, 3), _abstract(L, 2, 3, dtype=jnp.int32)
  picked = _stacks(lambda x, i: jnp.take_along_axis(x, i, axis=-2),
                   values, indices)
  assert picked == KEPT
  _assert_mixed_by(
      _stacks(lambda x, i: jnp.take_along_axis(x, i, axis=0), values,
              _abstract(2, 6, 3, dtype=jnp.int32)),
      'gather')
  assert _stacks(lambda x: x[:, 1], STACK) == KEPT
  assert _stacks(lambda x: x[:, ::-1, 1:], STACK) == KEPT
  assert _stacks(lambda x: x.at[:, 0].set(0.0), STACK) == KEPT
  assert _stacks(lambda x: x.reshape(L, -1), STACK) == KEPT
  assert _stacks(lambda x: jnp.concatenate([x, x], axis=2), STACK) == KEPT
  _assert_mixed_by(_stacks(lambda x: x[1], STACK), 'slice of part')
  _assert_mixed_by(_stacks(lambda x: x.reshape(-1, 3), STACK), 'reshape')
  _assert_mixed_by(_stacks(lambda x: jnp.concatenate([x, x]), STACK),
                   'concatenate along the layer axis')
  _assert_mixed_by(_stacks(lambda x: jnp.cumsum(x, axis=0), STACK),
                   'cumsum along the layer axis')


def test_kinds_are_checked():
  with pytest.raises(ValueError, match="'layers', 'rest' or None"):
    layer_dependence(lambda x: x, ('stacked',), STACK)
  with pytest.raises(ValueError, match='axis 0'):
    layer_dependence(lambda x: x, ('layers',), _abstract())


def test_abstract_inputs_are_not_allocated():
  # 64 layers of 65536 x 65536 float32: a terabyte if anything were made.
  huge = _abstract(64, 65536, 65536)
  params = {'w': huge}
  tx = optax.adam(1e-3)
  state = jax.eval_shape(tx.init, params)
  state_kinds = jax.tree.map(
      lambda x: 'layers' if x.shape == huge.shape else None, state)
  updates, new_state = layer_dependence(
      tx.update, ({'w': 'layers'}, state_kinds, {'w': 'layers'}),
      params, state, params)
  assert updates == {'w': KEPT}
  assert {d.layer_axis for d in jax.tree.leaves(new_state)} == {0, None}


# Optimizers, traced on a tree with one scanned block and an embedding.

PARAMS = {
    'layers': {
        'w': _abstract(L, 32, 48),
        'v': _abstract(L, 48, 32),
        'b': _abstract(L, 48),
    },
    'embed': _abstract(64, 32),
}
PARAM_KINDS = {
    'layers': jax.tree.map(lambda _: 'layers', PARAMS['layers']),
    'embed': 'rest',
}


def _under_layers(path):
  return "['layers']" in jax.tree_util.keystr(path)


def _state_kind(path, leaf):
  # A rough classification, enough here: the stacked state of the stacked
  # parameters.
  return 'layers' if _under_layers(path) and leaf.shape[:1] == (L,) else None


def _optimizer_dependences(tx):
  """The dependences of ``tx.update``'s outputs (updates, state)."""
  state = jax.eval_shape(tx.init, PARAMS)
  state_kinds = jax.tree_util.tree_map_with_path(_state_kind, state)
  # The ordering hint reads element [0, ...] of each update: data flow, not
  # a dependence of any value.
  with compat.without_ordering_hints():
    return layer_dependence(tx.update, (PARAM_KINDS, state_kinds, PARAM_KINDS),
                            PARAMS, state, PARAMS)


def _coupled_leaves(dependences):
  """The outputs that break slice independence, with their paths.

  Slice-independent: each stacked output keeps the layers on axis 0 (or
  does not read them), and no other output reads them.
  """
  coupled = []
  for path, dep in jax.tree_util.tree_leaves_with_path(dependences):
    allowed = (0, None) if _under_layers(path) else (None,)
    if dep.mixes_layers is not None or dep.layer_axis not in allowed:
      coupled.append((jax.tree_util.keystr(path), dep))
  return coupled


def _decay_matrices(p):
  return jax.tree.map(lambda x: x.ndim > 1, p)


_RULE = flora_jax.ProjectionRule(4, min_dim=8)


def _galore(projector: Literal['svd', 'randomized', 'random'] = 'svd'):
  return flora_jax.galore(1e-3, rank=4, update_proj_gap=2, min_dim=8,
                          projector=projector)


SLICE_INDEPENDENT = {
    'sgd': lambda: optax.sgd(0.1),
    'nesterov': lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    'adam': lambda: optax.adam(1e-3),
    'adamw_masked': lambda: optax.adamw(1e-3, mask=_decay_matrices),
    'lion': lambda: optax.lion(1e-4),
    'rmsprop': lambda: optax.rmsprop(1e-3),
    'adafactor_unclipped': lambda: optax.adafactor(
        1e-3, clipping_threshold=None, multiply_by_parameter_scale=False),
    'clip_adam': lambda: optax.chain(optax.clip(1.0), optax.adam(1e-3)),
    'inject_adamw': lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-3),
    # Its default clipping_threshold=1.0: see the test of its own below.
    'flora_unclipped': lambda: flora_jax.flora(
        1e-3, rank=4, kappa=2, min_dim=8, clipping_threshold=None),
    'flora_nesterov_decay': lambda: flora_jax.flora(
        1e-3, rank=4, kappa=2, min_dim=8, clipping_threshold=None,
        nesterov=True, weight_decay=0.1),
    'galore': _galore,
    'galore_randomized': lambda: _galore('randomized'),
    'galore_random': lambda: _galore('random'),
    'fira': lambda: flora_jax.fira(1e-3, rank=4, update_proj_gap=2,
                                   min_dim=8),
    'multisteps': lambda: flora_jax.FloraMultiSteps(
        optax.adamw(1e-3), 2, rule=_RULE).gradient_transformation(),
    'flora_compress': lambda: optax.chain(
        flora_jax.flora_compress(_RULE, kappa=2), optax.sgd(0.1)),
}

# Each reduces over a whole stacked leaf (or over all leaves).
REFUSED = {
    'clip_by_global_norm': lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    # clipping_threshold=1.0: a block RMS over the whole leaf.
    'adafactor': lambda: optax.adafactor(1e-3),
    'adafactor_parameter_scale': lambda: optax.adafactor(
        1e-3, clipping_threshold=None, multiply_by_parameter_scale=True),
    'lamb': lambda: optax.lamb(1e-3),
    'lars': lambda: optax.lars(1e-3),
    'trust_ratio': lambda: optax.chain(
        optax.scale_by_adam(), optax.scale_by_trust_ratio()),
    'clip_by_block_rms': lambda: optax.clip_by_block_rms(1.0),
}


@pytest.mark.parametrize('name', SLICE_INDEPENDENT)
def test_per_layer_optimizers_are_slice_independent(name):
  dependences = _optimizer_dependences(SLICE_INDEPENDENT[name]())
  assert _coupled_leaves(dependences) == []
  updates, _ = dependences
  assert updates['layers']['w'] == KEPT
  assert updates['embed'] == Dependence(None, None, reads_rest=True)


@pytest.mark.parametrize('name', REFUSED)
def test_optimizers_that_combine_layers_are_refused(name):
  updates, _ = _optimizer_dependences(REFUSED[name]())
  for dep in jax.tree.leaves(updates['layers']):
    _assert_mixed_by(dep, 'reduce_sum over the layer axis (optax/')


def test_global_norm_clipping_reads_the_rest():
  updates, state = _optimizer_dependences(REFUSED['clip_by_global_norm']())
  assert all(dep.reads_rest for dep in jax.tree.leaves(updates))
  # Adam's moments see the clipped gradients.
  assert all(dep.mixes_layers for dep in jax.tree.leaves(state[1][0].mu))


def test_flora_clips_each_stacked_matrix_on_its_own():
  tx = flora_jax.flora(1e-3, rank=4, kappa=2, min_dim=8,
                       multiply_by_parameter_scale=True)
  updates, _ = _optimizer_dependences(tx)
  assert updates['layers']['w'] == updates['layers']['v'] == KEPT
  # A leaf of fewer than 3 axes is one block, as in optax: a stack of
  # vectors is clipped as a whole.
  _assert_mixed_by(updates['layers']['b'],
                   'reduce_sum over the layer axis (flora_jax/_src/alias.py:')


def test_ordering_hints_read_one_layer():
  # `compat.after` adds 0 from element [0, ...] of its anchor.
  hinted = lambda x: compat.after(jnp.ones(3), x)
  _assert_mixed_by(_stacks(hinted, STACK), 'slice of part of the layer axis')
  with compat.without_ordering_hints():
    assert _stacks(hinted, STACK) == CLEAN


# The analysis against the numbers: an update it keeps per layer ignores a
# change in another layer's gradient; one it refuses here does not.


@pytest.mark.slow
@pytest.mark.parametrize('name, coupled', [
    # (galore's per-layer numbers are checked end to end in test_fused.py.)
    ('flora_unclipped', False),
    # Factored, clipped per matrix below its first updates' RMS (0.1).
    ('flora_clipped', False),
    ('clip_by_global_norm', True), ('clip_by_block_rms', True),
])
def test_perturbing_one_layer_agrees_with_the_analysis(name, coupled):
  tx = (SLICE_INDEPENDENT | REFUSED | {
      'flora_clipped': lambda: flora_jax.flora(
          1e-3, rank=4, kappa=2, min_dim=8, min_dim_size_to_factor=8,
          clipping_threshold=0.01),
  })[name]()
  dependences = _optimizer_dependences(tx)[0]['layers']
  keys = iter(jax.random.split(jax.random.key(0), 16))
  params = jax.tree.map(
      lambda s: jax.random.normal(next(keys), s.shape), PARAMS)
  grads = jax.tree.map(lambda p: 10.0 * jnp.cos(p), params)
  # The last layer's gradient, heavy-tailed: changes its norm and its RMS
  # even after Adafactor's normalisation.
  perturbed = {**grads, 'layers': jax.tree.map(
      lambda g: g.at[-1].multiply(
          jnp.exp(3.0 * jax.random.normal(next(keys), g.shape[1:]))),
      grads['layers'])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  before = update(grads, state, params)[0]['layers']
  after = update(perturbed, state, params)[0]['layers']
  changed = []
  for dep, b, a in zip(jax.tree.leaves(dependences), jax.tree.leaves(before),
                       jax.tree.leaves(after), strict=True):
    changed.append(not np.array_equal(b[:-1], a[:-1]))
    assert not changed[-1] or dep.mixes_layers is not None
  assert any(changed) == coupled


# The analysis against the numbers, for functions it keeps per layer:
# changing layer 2 of every input changes nothing outside slice 2 of the
# outputs.

PER_LAYER = {
    'scatter_set': lambda x: x.at[:, 1].set(x[:, 2]),
    'scatter_add': lambda x: x.at[:, jnp.array([0, 0, 2])].add(1.0),
    'dynamic_update_slice': lambda x: lax.dynamic_update_slice(
        x, x[:, :2] * 2.0, (0, 1, 0)),
    'gather_rows': lambda x: x[:, jnp.array([4, 0, 1])],
    'argsort': lambda x: jnp.argsort(x, axis=1),
    'roll': lambda x: jnp.roll(x, 1, axis=1),
    'vmap_normalize': jax.vmap(lambda s: s / jnp.linalg.norm(s)),
    'stack_transposed': lambda x: jnp.stack([x, 2.0 * x], axis=-1).T,
    'cond_in_map': lambda x: lax.map(
        lambda s: lax.cond(s.sum() > 0, lambda s: s * 2.0, lambda s: -s, s),
        x),
    'while_in_map': lambda x: lax.map(
        lambda s: lax.while_loop(lambda c: jnp.abs(c).max() < 10.0,
                                 lambda c: c * 2.0, s), x),
    'scan_in_map': lambda x: lax.map(
        lambda s: lax.scan(lambda c, r: (c + r, c), jnp.zeros(3), s), x),
}


@pytest.mark.parametrize('name', PER_LAYER)
def test_kept_layers_are_independent_in_the_numbers(name):
  fn = PER_LAYER[name]
  x = jax.random.normal(jax.random.key(0), (L, 5, 3))
  changed = x.at[2].multiply(jnp.exp(jax.random.normal(jax.random.key(1),
                                                       (5, 3))))
  deps = jax.tree.leaves(layer_dependence(fn, ('layers',), x))
  assert all(dep.layer_axis is not None for dep in deps), deps
  for dep, before, after in zip(deps, jax.tree.leaves(fn(x)),
                                jax.tree.leaves(fn(changed)), strict=True):
    np.testing.assert_array_equal(
        np.delete(np.asarray(before), 2, axis=dep.layer_axis),
        np.delete(np.asarray(after), 2, axis=dep.layer_axis))
