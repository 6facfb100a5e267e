"""Optimizer in the backward pass: per-layer updates for scanned models.

An ordinary train step of a scanned model holds the whole gradient tree at
the optimizer update: for the stacked layers that is a full copy of their
weights, because a reverse scan writes every layer's gradient into one
stacked buffer. The fused step writes its own backward pass over the stack:
at each layer it recomputes the layer's forward from its saved input
(activation checkpointing per layer), takes the layer's gradient with
`jax.vjp`, and applies the optimizer to that layer's slice of parameters
and state at once. Only the activation cotangent is carried to the next
layer, so the stacked gradient never exists. Parameters and state are
donated and updated in place.

This equals the ordinary step exactly when the optimizer treats each layer
slice on its own; `fused_train_step` checks that by analysing the traced
update (see `layer_dependence`) and refuses transforms that read a global
statistic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import compat
from flora_jax._src import keys
from flora_jax._src import projection
from flora_jax._src import settings
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.layer_dependence import layer_dependence


Batch = Any
Metrics = dict[str, jax.Array]
TrainStep = Callable[[optax.Params, optax.OptState, Batch],
                     tuple[optax.Params, optax.OptState, Metrics]]

# Where a leaf of a state made for part of the tree comes from in the full
# state: a layer slice of a stacked leaf, a leaf of the stack's leaves
# without a layer axis, a leaf shared by all parameters (counters, keys), a
# leaf of the parameters outside the stack, or the part's own `settings`
# record.
Source = tuple[
    Literal['layers', 'layer_shared', 'shared', 'rest', 'settings'], Any]


def fused_train_step(
    tx: optax.GradientTransformation,
    params: optax.Params,
    *,
    stack: str | Sequence[str | int],
    embed: Callable[[optax.Params, Batch], Any],
    layer: Callable[[optax.Params, Any, Batch], Any],
    head: Callable[[optax.Params, Any, Batch], Any],
    has_aux: bool = False,
    jit: bool = True,
) -> TrainStep:
  r"""A train step that updates each stacked layer inside the backward pass.

  For a model ``head(embed(x) -> layer_0 -> ... -> layer_{L-1})`` whose
  layers share a structure and are stored stacked (every leaf under
  ``stack`` has a leading axis of size L, as for `jax.lax.scan` or
  `flax.nnx.scan`), the returned ``train_step(params, opt_state, batch)``
  computes the same new parameters and state as

  .. code-block:: python

    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

  but never holds the stacked gradient: the backward pass over the stack is
  a reverse scan that, at layer ``l``, recomputes the layer from its saved
  input, takes its gradient ``g_l`` with `jax.vjp`, applies ``tx`` to
  ``(g_l, state_l, params_l)`` (the layer's slices) and writes the result
  into the donated parameter and state buffers. Parameters outside the
  stack get one ordinary ``tx.update`` at the end, which also advances the
  counters and keys once per step. The peak memory drops by about the
  stack's gradient, ``(L-1)/L`` of it (one layer's gradient exists at a
  time); activations are checkpointed per layer, as with `jax.checkpoint`
  around a scanned layer.

  Stacked vectors (leaves with one axis after the layer axis: norm scales,
  biases) are small; their gradients are collected during the reverse scan
  and they are updated with the rest, so that a per-leaf statistic of theirs
  stays exactly the ordinary step's.

  ``tx`` must treat each layer slice on its own, as `optax.sgd`,
  `optax.adam(w)`, `optax.lion`, `flora_jax.flora`,
  `flora_jax.scale_by_flora_momentum`, `flora_jax.galore`,
  `flora_jax.fira` and `flora_jax.FloraMultiSteps` do. This is checked by
  analysing the traced ``tx.update``; one that combines layers, e.g. through
  `optax.clip_by_global_norm`, `optax.adafactor`'s default block-RMS
  clipping or a trust ratio (`optax.lamb`), raises a ``ValueError`` naming
  the state or update leaf and the operation. So does `optax.MultiSteps`:
  its full-size accumulator is the gradient this step avoids;
  `flora_jax.FloraMultiSteps` accumulates each layer's compressed gradient
  inside the backward pass instead (its cycle semantics unchanged).

  Args:
    tx: the optimizer; its state is ``tx.init(params)``, the same as for the
      ordinary step (checkpoints are interchangeable).
    params: the parameters, or their shapes (`jax.eval_shape`): fixes the
      tree the step is built for.
    stack: the path of the stacked layers in ``params``, e.g. ``'layers'``
      or ``('decoder', 'layers')`` (``'decoder/layers'`` also works).
    embed: ``embed(params, batch) -> h``, the part before the stack. Gets
      the parameters with the stack's leaves replaced by `optax.MaskedNode`.
    layer: ``layer(layer_params, h, batch) -> h``, one layer; gets one
      slice of the subtree at ``stack`` (no layer axis). ``h`` may be any
      pytree of floating arrays.
    head: ``head(params, h, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), the part after the stack and the loss; gets the same
      parameters as ``embed``.
    has_aux: whether ``head`` returns ``(loss, aux)``; ``aux`` is added
      to the metrics (a dict is merged into them, anything else is
      ``metrics['aux']``).
    jit: return the step compiled with `jax.jit`, parameters and state
      donated. With False, the plain function, e.g. to give `jax.jit`
      shardings; donate ``(0, 1)`` to update in place.

  Returns:
    ``train_step(params, opt_state, batch) -> (params, opt_state,
    metrics)``, with ``metrics['loss']`` the loss before the update.

  Raises:
    ValueError: ``stack`` names no leaves, its leaves disagree on the
      number of layers, or ``tx`` is not slice by slice (see above).

  Example:
    >>> import jax, jax.numpy as jnp, optax, flora_jax
    >>> params = {'w_in': jnp.ones((4, 8)) / 4,
    ...           'layers': {'w': jnp.ones((3, 8, 8)) / 8},
    ...           'w_out': jnp.ones((8, 1)) / 8}
    >>> step = flora_jax.fused_train_step(
    ...     optax.adam(1e-2), params, stack='layers',
    ...     embed=lambda p, x: x @ p['w_in'],
    ...     layer=lambda lp, h, x: jnp.tanh(h @ lp['w']),
    ...     head=lambda p, h, x: jnp.mean((h @ p['w_out']) ** 2))
    >>> opt_state = optax.adam(1e-2).init(params)
    >>> params, opt_state, metrics = step(params, opt_state, jnp.ones((2, 4)))
    >>> float(metrics['loss']) > 0
    True
  """
  if not (callable(getattr(tx, 'init', None))
          and callable(getattr(tx, 'update', None))):
    raise TypeError('tx must be an optax.GradientTransformation (or have'
                    f' init and update), got {type(tx).__name__}.')
  for name, fn in (('embed', embed), ('layer', layer), ('head', head)):
    if not callable(fn):
      raise TypeError(f'{name} must be a function, got {type(fn).__name__}.')
  validation.check_bool('has_aux', has_aux)
  validation.check_bool('jit', jit)
  layout = Layout.build(tx, params, stack)
  check_per_layer(tx, layout)

  def train_step(params, opt_state, batch):
    return fused_step(tx, layout, embed, layer, head, has_aux,
                      params, opt_state, batch)

  if jit:
    return jax.jit(train_step, donate_argnums=(0, 1))
  return train_step


# ------------------------------------------------------------ the layout


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the stack is in the parameters and in the optimizer state.

  Three masks over the parameters' leaves: ``in_stack`` (under the stack
  path: the layer function's parameters), ``per_layer`` (stacked matrices,
  at least two axes after the layer axis: updated inside the backward pass)
  and their complements. Stacked vectors (norm scales, biases) are in the
  stack but updated with the rest from their collected gradient: they are
  small, and a per-leaf statistic of theirs (e.g. `optax.clip_by_block_rms`)
  then stays exactly the ordinary step's.

  The optimizer state of a part of the tree is ``tx.init`` of the
  parameters with the other leaves replaced by `optax.MaskedNode` (as
  `optax.masked` does): a per-layer state (``layer_sources``: made for one
  layer, a stack of size 1) and a state of the rest (``rest_sources``).
  Each of their leaves is found in the full state by its path.
  """

  treedef: Any  # the parameters' structure
  param_shapes: tuple[jax.ShapeDtypeStruct, ...]
  in_stack: tuple[bool, ...]
  per_layer: tuple[bool, ...]
  stack_def: Any  # the structure of the subtree at the stack path
  layers: int  # L
  state_def: Any  # the full state's structure, settings records as leaves
  state_shapes: Any  # the full state, abstract
  state_paths: tuple[str, ...]  # per full-state leaf: its key path
  state_kinds: tuple[str, ...]  # per full-state leaf: its Source kind
  layer_def: Any
  layer_sources: tuple[Source, ...]
  rest_def: Any
  rest_sources: tuple[Source, ...]
  rest_index: tuple[int, ...]  # full-state leaf -> index in the rest state

  @classmethod
  def build(cls, tx, params, stack) -> Layout:
    params = tree_util.unwrap_variables(params)
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
        params)
    prefix = stack_prefix(stack)
    flat, treedef = jax.tree.flatten_with_path(shapes)
    in_stack = tuple(tree_util.path_parts(path)[:len(prefix)] == prefix
                     for path, _ in flat)
    leaves = [leaf for _, leaf in flat]
    layers = _layer_count(prefix, flat, in_stack)
    per_layer = tuple(s and leaf.ndim >= 3
                      for s, leaf in zip(in_stack, leaves, strict=True))

    def part(keep, one_layer=False):
      return jax.tree.unflatten(treedef, [
          optax.MaskedNode() if not kept else
          jax.ShapeDtypeStruct((1,) + leaf.shape[1:], leaf.dtype)
          if one_layer else leaf
          for leaf, kept in zip(leaves, keep, strict=True)])

    with projection.recording_plans():  # no warnings for the parts' inits
      full_state = jax.eval_shape(tx.init, shapes)
      full = _state_paths(full_state)
      one_layer = _state_paths(
          jax.eval_shape(tx.init, part(per_layer, one_layer=True)))
      rest = _state_paths(
          jax.eval_shape(tx.init, part([not s for s in per_layer])))
    _refuse_accumulating_state(full_state)
    kinds = _state_kinds(full, one_layer, rest, layers)
    full_index = {path: i for i, path in enumerate(full.paths)}

    def sources(part_state):
      found = []
      for path, leaf in zip(part_state.paths, part_state.leaves, strict=True):
        if path not in full_index:
          raise ValueError(
              f'The optimizer state of a part of the parameters has a leaf'
              f' {path} that the whole state lacks: made for one layer (or'
              ' for the rest) the state has another structure, so this'
              ' transform cannot be applied one layer at a time.')
        i = full_index[path]
        kind = 'settings' if settings.is_settings(leaf) else kinds[i]
        found.append((kind, leaf if kind == 'settings' else i))
      return tuple(found)

    rest_position = {path: j for j, path in enumerate(rest.paths)}
    return cls(
        treedef=treedef, param_shapes=tuple(leaves), in_stack=in_stack,
        per_layer=per_layer,
        stack_def=jax.tree.structure(_subtree(shapes, prefix)),
        layers=layers, state_def=full.treedef, state_shapes=full_state,
        state_paths=full.paths, state_kinds=kinds,
        layer_def=one_layer.treedef, layer_sources=sources(one_layer),
        rest_def=rest.treedef, rest_sources=sources(rest),
        rest_index=tuple(rest_position.get(path, -1) for path in full.paths),
    )

  def masked(self, leaves: Sequence[Any], keep: Sequence[bool]) -> Any:
    """The parameter tree of ``leaves`` where ``keep``, MaskedNode elsewhere.

    ``leaves`` holds the kept leaves only, in tree order.
    """
    kept = iter(leaves)
    return jax.tree.unflatten(self.treedef, [
        next(kept) if k else optax.MaskedNode() for k in keep])

  @property
  def outside(self) -> tuple[bool, ...]:
    return tuple(not s for s in self.in_stack)

  @property
  def not_per_layer(self) -> tuple[bool, ...]:
    return tuple(not s for s in self.per_layer)

  def part_state(self, part_def, sources, full_leaves, layer_slice=None):
    """A part's state: its own settings record, the rest from the full state.

    ``layer_slice(i)`` gives the layer's slice of full-state leaf ``i``.
    """
    leaves = []
    for kind, origin in sources:
      if kind == 'settings':
        leaves.append(jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype), origin))
      elif kind == 'layers':
        assert layer_slice is not None
        leaves.append(layer_slice(origin))
      else:
        leaves.append(full_leaves[origin])
    return part_def.unflatten(leaves)


def pick(leaves: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
  """The leaves where ``mask`` is True, in order."""
  return [x for x, m in zip(leaves, mask, strict=True) if m]


def merge(mask: Sequence[bool], chosen: Sequence[Any],
          others: Sequence[Any]) -> list[Any]:
  """Interleaves: ``chosen`` where ``mask``, ``others`` elsewhere."""
  chosen_it, others_it = iter(chosen), iter(others)
  return [next(chosen_it) if m else next(others_it) for m in mask]


@dataclasses.dataclass(frozen=True)
class _StatePaths:
  """A state's leaves (settings records as leaves) and their paths."""

  treedef: Any
  paths: tuple[str, ...]
  leaves: tuple[Any, ...]


def _state_paths(state) -> _StatePaths:
  flat, treedef = jax.tree.flatten_with_path(state,
                                             is_leaf=settings.is_settings)
  return _StatePaths(treedef,
                     tuple(jax.tree_util.keystr(p) for p, _ in flat),
                     tuple(leaf for _, leaf in flat))


def stack_prefix(stack) -> tuple[str, ...]:
  """``'decoder/layers'`` or ``('decoder', 'layers')`` as path parts."""
  if isinstance(stack, str):
    parts = tuple(part for part in stack.split('/') if part)
  elif isinstance(stack, Sequence):
    parts = tuple(str(part) for part in stack)
  else:
    raise TypeError(
        f'stack must be a path: a str like "layers" or "decoder/layers", or'
        f' a sequence of keys, got {type(stack).__name__}.')
  if not parts:
    raise ValueError('stack must name a subtree of the parameters, got an'
                     ' empty path.')
  return parts


def _layer_count(prefix, flat, stacked) -> int:
  """L, the common leading axis of the stack's leaves."""
  where = '/'.join(prefix)
  counts = {tree_util.path_string(path): leaf.shape[0] if leaf.shape else None
            for (path, leaf), s in zip(flat, stacked, strict=True) if s}
  if not counts:
    raise ValueError(
        f'stack={where!r} names no leaves of the parameters; their paths'
        f' start with: {sorted({tree_util.path_parts(p)[0] for p, _ in flat})}.'
    )
  sizes = set(counts.values())
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f'The leaves under stack={where!r} must share their leading (layer)'
        f' axis; found leading sizes {counts}.')
  (size,) = sizes
  assert size is not None
  return size


def _subtree(tree, prefix):
  for part in prefix:
    if isinstance(tree, (list, tuple)) and not hasattr(tree, '_fields'):
      tree = tree[int(part)]
    elif hasattr(tree, '__getitem__') and not hasattr(tree, '_fields'):
      tree = tree[part]
    else:
      tree = getattr(tree, part)
  return tree


def _state_kinds(full, one_layer, rest, layers) -> tuple[str, ...]:
  """Each full-state leaf's kind, from the states made for the parts.

  A leaf that only the per-layer state has is per layer: it must be the
  layer's slice of the full leaf (axis 0 of size 1 there, L here). One that
  both parts have is shared and must be the same in all three.
  """
  in_layer = dict(zip(one_layer.paths, one_layer.leaves, strict=True))
  in_rest = dict(zip(rest.paths, rest.leaves, strict=True))
  kinds = []
  for path, leaf in zip(full.paths, full.leaves, strict=True):
    if settings.is_settings(leaf):
      kinds.append('settings')
      continue
    shape = jnp.shape(leaf)
    if path in in_layer and path in in_rest:
      kind = 'shared'
      ok = jnp.shape(in_layer[path]) == shape == jnp.shape(in_rest[path])
    elif path in in_layer:
      kind = 'layers'
      ok = (shape[:1] == (layers,)
            and jnp.shape(in_layer[path]) == (1,) + shape[1:])
      if not ok and jnp.shape(in_layer[path]) == shape:
        # Belongs to the stack's leaves but has no layer axis (e.g. the
        # placeholder of a factored moment that is not factored): every
        # layer must then compute the same new value, checked by the
        # analysis.
        kind, ok = 'layer_shared', True
    elif path in in_rest:
      kind = 'rest'
      ok = jnp.shape(in_rest[path]) == shape
    else:
      raise ValueError(
          f'The optimizer state leaf {path} belongs neither to the stacked'
          ' layers nor to the other parameters (the state of the parts,'
          ' made as optax.masked does, has no such leaf): this transform'
          ' cannot be applied one layer at a time.')
    if not ok:
      part = in_layer[path] if path in in_layer else in_rest[path]
      raise ValueError(
          f'The optimizer state leaf {path} (shape {shape}) is not kept per'
          f' layer: made for one layer its shape is {jnp.shape(part)}. This'
          ' transform cannot be applied one layer at a time.')
    kinds.append(kind)
  return tuple(kinds)


def _refuse_accumulating_state(state) -> None:
  def visit(node):
    if isinstance(node, optax.MultiStepsState):
      raise ValueError(
          'fused_train_step cannot take optax.MultiSteps: its accumulator'
          ' is a full-size copy of the gradient, which the fused step exists'
          ' to avoid. Use flora_jax.FloraMultiSteps(opt, every_k, rule=r):'
          ' each layer adds its compressed gradient inside the backward'
          ' pass.')
    return node
  jax.tree.map(visit, state,
               is_leaf=lambda x: isinstance(x, optax.MultiStepsState))


def check_per_layer(tx, layout: Layout) -> None:
  """Refuses a ``tx`` whose update combines layers (see `layer_dependence`).

  Traces the ordinary ``tx.update`` on the whole tree and follows each
  output back to the inputs: slice ``l`` of a per-layer output may depend
  on slice ``l`` of the per-layer inputs only, never on other layers or on
  the other parameters; every other output (their updates, counters, keys)
  must not depend on the per-layer leaves at all.
  """
  params = layout.treedef.unflatten(layout.param_shapes)
  kind_by_path = dict(zip(layout.state_paths, layout.state_kinds,
                          strict=True))
  state_kinds = jax.tree_util.tree_map_with_path(
      lambda path, _: _INPUT_KIND.get(
          kind_by_path.get(jax.tree_util.keystr(path), '')),
      layout.state_shapes)
  param_kinds = layout.treedef.unflatten(
      ['layers' if s else 'rest' for s in layout.per_layer])
  with compat.without_ordering_hints():
    updates, state = layer_dependence(
        tx.update, (param_kinds, state_kinds, param_kinds),
        params, layout.state_shapes, params)
  for (path, dep), per_layer in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0], layout.per_layer,
      strict=True):
    _check_output('update of ' + tree_util.path_string(path), dep, per_layer)
  for path, dep in jax.tree_util.tree_flatten_with_path(state)[0]:
    kind = kind_by_path.get(jax.tree_util.keystr(path))
    _check_output('state leaf ' + jax.tree_util.keystr(path), dep,
                  kind == 'layers',
                  may_read_rest=kind not in ('layers', 'layer_shared'))


# What the analysis tracks of each kind of state leaf.
_INPUT_KIND = {'layers': 'layers', 'rest': 'rest'}


def _check_output(what, dep, per_layer, may_read_rest=None) -> None:
  if may_read_rest is None:
    may_read_rest = not per_layer
  problem = None
  if dep.mixes_layers is not None:
    problem = f'it combines layers: {dep.mixes_layers}'
  elif dep.layer_axis is not None and not per_layer:
    problem = 'it depends on the stacked layers but is not one of them'
  elif dep.layer_axis not in (None, 0):
    problem = f'its layer axis moved to axis {dep.layer_axis}'
  elif dep.reads_rest and not may_read_rest:
    problem = 'it depends on parameters outside the stacked matrices'
  if problem is not None:
    raise ValueError(
        f'fused_train_step: the optimizer cannot be applied one layer at a'
        f' time: the {what} is not computed per layer ({problem}). A'
        ' transform that reads a global statistic (e.g.'
        ' optax.clip_by_global_norm, optax.adafactor\'s default'
        ' clipping_threshold, a trust ratio as in optax.lamb) needs the'
        ' whole gradient; use it with the ordinary step, or drop it.')


# ------------------------------------------------------------- the step


def fused_step(tx, layout: Layout, embed, layer, head, has_aux,
               params, opt_state, batch):
  """The step's computation (see `fused_train_step`), not compiled."""
  leaves = layout.treedef.flatten_up_to(tree_util.unwrap_variables(params))
  step = _Step(tx, layout, layout.state_def.flatten_up_to(opt_state),
               lambda layer_leaves, h: layer(
                   layout.stack_def.unflatten(layer_leaves), h, batch))

  def outside_tree(outside):
    return layout.masked(outside, layout.outside)

  # Forward: the stack's input of every layer is all that is saved.
  outside = pick(leaves, layout.outside)
  h, embed_vjp, _ = _vjp_of_read(lambda o: embed(outside_tree(o), batch),
                                 outside)
  stack = pick(leaves, layout.in_stack)

  # The layer inputs go into a carried buffer through compat.write_layer,
  # not into the scan's stacked output, whose slice updates XLA's CPU
  # backend widens to float32 for bfloat16 activations.
  def forward(carry, index):
    h, inputs = carry
    inputs = jax.tree.map(lambda saved, x: compat.write_layer(saved, x, index),
                          inputs, h)
    layer_leaves = [compat.read_layer(x, index) for x in stack]
    return (step.layer_fn(layer_leaves, h), inputs), None

  no_inputs = jax.tree.map(
      lambda x: jnp.zeros((layout.layers,) + x.shape, x.dtype), h)
  (h, inputs), _ = jax.lax.scan(forward, (h, no_inputs),
                                jnp.arange(layout.layers))
  loss, head_vjp, aux = _vjp_of_read(
      lambda o, h: head(outside_tree(o), h, batch), outside, h,
      has_aux=has_aux)
  head_grads, cotangent = head_vjp(jnp.ones_like(loss))

  cotangent, carry = step.backward(leaves, inputs, cotangent)
  embed_grads, = embed_vjp(cotangent)
  outside_grads = [_sum_read(x, a, b) for x, a, b in
                   zip(outside, head_grads, embed_grads, strict=True)]
  new_params, new_state = step.finish(leaves, outside_grads, carry)
  metrics = {'loss': loss}
  metrics.update(aux if isinstance(aux, Mapping) else {'aux': aux})
  return new_params, new_state, metrics


class _Carry(NamedTuple):
  """What the backward scan carries from layer to layer."""

  matrices: list[jax.Array]  # the per-layer parameters, (L, ...), updated
  vector_grads: list[jax.Array]  # gradients of the stacked vectors, (L, ...)
  layer_state: list[jax.Array]  # the state's 'layers' leaves, (L, ...)
  same_for_all: dict[int, Any]  # the state's 'layer_shared' leaves


@dataclasses.dataclass(frozen=True)
class _Step:
  """The backward pass over the stack, and the update of everything else."""

  tx: Any
  layout: Layout
  state_leaves: list[Any]  # the optimizer state at the start of the step
  layer_fn: Callable[[list[jax.Array], Any], Any]

  @property
  def per_layer(self) -> list[bool]:
    """Among the stack's leaves: which are updated per layer."""
    return pick(self.layout.per_layer, self.layout.in_stack)

  @property
  def vectors(self) -> list[bool]:
    """Among the stack's leaves: the stacked vectors, updated with the rest."""
    return [not m for m in self.per_layer]

  @property
  def layer_leaves(self) -> list[int]:
    """The full state's 'layers' leaves, in the per-layer state's order."""
    return [i for kind, i in self.layout.layer_sources if kind == 'layers']

  def backward(self, leaves, inputs, cotangent):
    """Runs the reverse scan; returns the cotangent of its input, the carry."""
    stack = pick(leaves, self.layout.in_stack)
    vectors = pick(stack, self.vectors)
    carry = _Carry(
        matrices=pick(stack, self.per_layer),
        vector_grads=[jnp.zeros_like(v) for v in vectors],
        layer_state=[self.state_leaves[i] for i in self.layer_leaves],
        same_for_all={i: self.state_leaves[i] for i, kind in
                      enumerate(self.layout.state_kinds)
                      if kind == 'layer_shared'})

    def body(carry, index):
      cotangent, carry = carry
      layer_params = merge(self.per_layer,
                           [_take(x, index) for x in carry.matrices],
                           [compat.read_layer(x, index) for x in vectors])
      layer_input = jax.tree.map(lambda x: compat.read_layer(x, index),
                                 inputs)
      layer_state = [_take(x, index, keepdims=True)
                     for x in carry.layer_state]
      # Inside a branch (always taken): XLA cannot fuse a read of a stacked
      # buffer into the write of another. A read of the old momentum fused
      # into the parameters' write, after the momentum's own write, makes
      # XLA copy the whole stack at every layer. Here every slice is read,
      # the layer computed, then written: all buffers updated in place. The
      # predicate is true, but derived from data so that XLA cannot fold the
      # branch away.
      always = compat.after(jnp.zeros([], jnp.int32),
                            jax.tree.leaves(cotangent)[0]) == 0
      cotangent, new_params, grads, layer_state, same_for_all = compat.cond(
          always, self.layer_update, self.skip, index, cotangent,
          layer_params, layer_input, layer_state, carry.same_for_all)
      return (cotangent, _Carry(
          matrices=_put_all(carry.matrices, new_params, index, expand=True),
          vector_grads=_put_all(carry.vector_grads, grads, index,
                                expand=True),
          layer_state=_put_all(carry.layer_state, layer_state, index),
          same_for_all=same_for_all)), None

    (cotangent, carry), _ = jax.lax.scan(
        body, (cotangent, carry), jnp.arange(self.layout.layers),
        reverse=True)
    return cotangent, carry

  def layer_update(self, index, cotangent, layer_params, layer_input,
                   layer_state, same_for_all):
    """One layer's gradient and update: new slices, cotangent of its input."""
    layout = self.layout
    _, layer_vjp = jax.vjp(self.layer_fn, layer_params, layer_input)
    grads, cotangent = layer_vjp(cotangent)
    # The update sees a stack of one layer, shapes (1, ...), the rest masked.
    slices = iter(layer_state)
    state = layout.part_state(layout.layer_def, layout.layer_sources,
                              self.state_leaves, lambda i: next(slices))
    one_layer = layout.masked(
        [p[None] for p in pick(layer_params, self.per_layer)],
        layout.per_layer)
    with keys.drawing_layer(index):
      updates, state = self.tx.update(
          layout.masked([g[None] for g in pick(grads, self.per_layer)],
                        layout.per_layer), state, one_layer)
    new_params = [p[0] for p in jax.tree.leaves(
        optax.apply_updates(one_layer, updates))]
    layer_state, same_for_all = [], dict(same_for_all)
    for (kind, i), leaf in zip(layout.layer_sources,
                               layout.layer_def.flatten_up_to(state),
                               strict=True):
      if kind == 'layers':
        layer_state.append(leaf)
      elif kind == 'layer_shared':
        same_for_all[i] = leaf
    vector_grads = pick(grads, self.vectors)
    return cotangent, new_params, vector_grads, layer_state, same_for_all

  def skip(self, index, cotangent, layer_params, layer_input, layer_state,
           same_for_all):
    """The branch never taken: the same outputs, unchanged."""
    del index, layer_input
    vectors = pick(layer_params, self.vectors)
    return (jax.tree.map(jnp.zeros_like, cotangent),
            pick(layer_params, self.per_layer),
            [jnp.zeros_like(v) for v in vectors], layer_state, same_for_all)

  def finish(self, leaves, outside_grads, carry: _Carry):
    """Updates the rest in one ``tx.update``; the new parameters and state.

    The rest: everything but the stacked matrices, i.e. the parameters
    outside the stack and the stacked vectors. This update also advances
    the state's counters and keys, once per step.
    """
    layout = self.layout
    rest = layout.not_per_layer
    stack_grads = merge(self.per_layer, [None] * len(carry.matrices),
                        carry.vector_grads)
    grads = pick(merge(layout.in_stack, stack_grads, outside_grads), rest)
    params = layout.masked(pick(leaves, rest), rest)
    state = layout.part_state(layout.rest_def, layout.rest_sources,
                              self.state_leaves)
    updates, state = self.tx.update(layout.masked(grads, rest), state, params)
    new_params = layout.treedef.unflatten(merge(
        layout.per_layer, carry.matrices,
        jax.tree.leaves(optax.apply_updates(params, updates))))
    return new_params, self.new_state(layout.rest_def.flatten_up_to(state),
                                      carry)

  def new_state(self, rest_state, carry: _Carry):
    """The full state from the scan's carry and the rest's update."""
    layers = dict(zip(self.layer_leaves, carry.layer_state, strict=True))
    new = []
    for i, kind in enumerate(self.layout.state_kinds):
      if kind == 'layers':
        new.append(layers[i])
      elif kind == 'layer_shared':
        new.append(carry.same_for_all[i])
      elif kind == 'settings':
        new.append(self.state_leaves[i])
      else:
        new.append(rest_state[self.layout.rest_index[i]])
    return self.layout.state_def.unflatten(new)


def _vjp_of_read(fn, rest, *args, has_aux=False):
  """`jax.vjp` of ``fn(rest, *args)`` for the leaves of ``rest`` it reads.

  Returns ``(output, vjp_fn, aux)``; ``aux`` is {} without ``has_aux``.

  The gradient of a leaf ``fn`` does not read is None rather than zeros:
  the embedding and the head each read a few leaves, and zeros of the
  others (the other's embedding table) would be held through the backward
  pass for nothing.
  """
  jaxpr = jax.make_jaxpr(fn, return_shape=False)(rest, *args).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  is_read = [id(v) in read for v in jaxpr.invars[:len(rest)]]

  def of_read(read_leaves, *args):
    it = iter(read_leaves)
    return fn([next(it) if r else x
               for x, r in zip(rest, is_read, strict=True)], *args)

  read_leaves = pick(rest, is_read)
  if has_aux:
    output, vjp_fn, aux = jax.vjp(of_read, read_leaves, *args, has_aux=True)
  else:
    (output, vjp_fn), aux = jax.vjp(of_read, read_leaves, *args), {}

  def grads(cotangent):
    read_grads, *arg_grads = vjp_fn(cotangent)
    it = iter(read_grads)
    return [next(it) if r else None for r in is_read], *arg_grads

  return output, grads, aux


def _sum_read(x, a, b):
  if a is None and b is None:
    return jnp.zeros_like(x)
  return b if a is None else a if b is None else a + b


def _put_all(stacks, slices, index, expand=False):
  """Writes slice ``index`` of each stack (``expand``: slices lack axis 0)."""
  return [compat.write_layer(x, s if expand else s[0], index)
          for x, s in zip(stacks, slices, strict=True)]


def _take(x, index, keepdims=False):
  return jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=keepdims)
