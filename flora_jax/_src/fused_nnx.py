"""The fused train step for Flax NNX models with scanned blocks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from flora_jax._src import fused


def fused_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *,
    stack: str,
    embed: Callable[[Any, Any], Any],
    layer: Callable[[Any, Any, Any], Any],
    head: Callable[[Any, Any, Any], Any],
    has_aux: bool = False,
) -> Callable[[nnx.Module, nnx.Optimizer, Any], dict[str, jax.Array]]:
  """`flora_jax.fused_train_step` for an NNX model and its `nnx.Optimizer`.

  The model keeps its layers as one stacked module at the attribute
  ``stack``, created with `flax.nnx.vmap` (every parameter with a leading
  layer axis) and run with `flax.nnx.scan`. The returned
  ``step(model, optimizer, batch)`` trains in place like the usual
  ``optimizer.update(model, grads)`` step, and returns the metrics, but
  applies the optimizer to each layer inside the backward pass: the stacked
  gradient never exists (see `flora_jax.fused_train_step` for what is
  computed and which optimizers qualify).

  Args:
    model: the model; fixes the structure the step is built for.
    optimizer: its `nnx.Optimizer` (``optimizer.tx`` is the transform,
      ``optimizer.wrt`` what is trained).
    stack: the attribute path of the stacked blocks, e.g. ``'blocks'`` or
      ``'decoder/layers'``.
    embed: ``embed(model, batch) -> h``, the part before the stack.
    layer: ``layer(block, h, batch) -> h``; ``block`` is one layer of the
      stack as a module (its parameters without the layer axis).
    head: ``head(model, h, batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), the part after the stack and the loss. ``embed`` and
      ``head`` must not use the stack's parameters: their gradient there
      would be lost.
    has_aux: whether ``head`` returns ``(loss, aux)``, ``aux`` a dict.

  Returns:
    ``step(model, optimizer, batch) -> metrics``, compiled, updating
    ``model`` and ``optimizer`` in place (their arrays are donated).

  Raises:
    ValueError: the stack holds variables other than the trained ones (they
      would not be updated), or the optimizer cannot be applied per layer.

  Example:
    >>> import jax.numpy as jnp, optax, flora_jax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.inp = nnx.Linear(4, 8, rngs=rngs)
    ...     @nnx.split_rngs(splits=3)
    ...     @nnx.vmap(in_axes=(0,), out_axes=0)
    ...     def blocks(rngs):
    ...       return nnx.Linear(8, 8, rngs=rngs)
    ...     self.blocks = blocks(rngs)
    ...     self.out = nnx.Linear(8, 1, rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    >>> step = flora_jax.nnx.fused_train_step(
    ...     model, optimizer, stack='blocks',
    ...     embed=lambda model, x: model.inp(x),
    ...     layer=lambda block, h, x: jnp.tanh(block(h)),
    ...     head=lambda model, h, x: jnp.mean(model.out(h) ** 2))
    >>> metrics = step(model, optimizer, jnp.ones((2, 4)))
    >>> int(optimizer.step[...])
    1
  """
  tx, wrt = optimizer.tx, optimizer.wrt
  graphdef, params, others = nnx.split(model, wrt, ...)
  params = _pure(params)
  layout = fused.Layout.build(tx, params, stack)
  fused.check_per_layer(tx, layout)
  prefix = fused.stack_prefix(stack)
  block = functools.reduce(getattr, prefix, model)
  block_def, _, block_others = nnx.split(block, wrt, ...)
  if jax.tree.leaves(block_others):
    raise ValueError(
        f'The stacked blocks at {stack!r} hold variables that are not'
        f' trained ({_names(block_others)}): the fused step reads them but'
        ' would not write them back. Keep only trained parameters in the'
        ' stack (e.g. no dropout RNG state or batch statistics there).')

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def pure_step(params, opt_state, others, batch):
    stack = fused.pick(layout.treedef.flatten_up_to(params), layout.in_stack)

    def model_of(outside):  # the stack's parameters as constants
      outside = fused.pick(layout.treedef.flatten_up_to(outside),
                           layout.outside)
      leaves = fused.merge(layout.in_stack, stack, outside)
      return nnx.merge(graphdef, layout.treedef.unflatten(leaves), others)

    return fused.fused_step(
        tx, layout,
        lambda outside, batch: embed(model_of(outside), batch),
        lambda layer_params, h, batch: layer(
            nnx.merge(block_def, layer_params, block_others), h, batch),
        lambda outside, h, batch: head(model_of(outside), h, batch),
        has_aux, params, opt_state, batch)

  def step(model, optimizer, batch):
    params = _pure(nnx.state(model, wrt))
    opt_state = _pure(optimizer.opt_state)
    others = nnx.state(model, nnx.Not(wrt))
    params, opt_state, metrics = pure_step(params, opt_state, others, batch)
    nnx.update(model, params)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    optimizer.step[...] += 1
    return metrics

  return step


def _pure(tree):
  """The arrays of a tree of Variables (``nnx.as_pure``; flax 0.12.2 has
  only its older name, ``nnx.pure``)."""
  as_pure = nnx.as_pure if hasattr(nnx, 'as_pure') else nnx.pure
  return as_pure(tree)


def _names(state) -> str:
  paths = [jax.tree_util.keystr(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  return ', '.join(paths[:3]) + (' ...' if len(paths) > 3 else '')
