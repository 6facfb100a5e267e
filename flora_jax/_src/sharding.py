"""Shardings of optimizer states on device meshes.

`state_shardings` answers "how should the state of ``tx`` be laid out, given
how the parameters are?", for `jax.jit(tx.init, out_shardings=...)` and for
the state half of a train step's ``in_shardings`` / ``out_shardings``:

* a state leaf with the parameter's shape (Adam moments, full momentum of an
  unprojected leaf) is sharded like the parameter;
* a low-rank leaf, ``(..., r, n)`` or ``(..., m, r)`` (compressed momentum,
  accumulator sketch, GaLore's inner state), keeps the parameter's sharding
  on its full-size axis and is replicated along ``r``;
* a projector ``(..., m, r)`` or ``(..., n, r)`` is sharded along the
  parameter axis it spans;
* factored second moments and per-slice norms keep the sharding of the axes
  they keep;
* counters, keys and anything else are replicated;
* 8-bit codes (`quantize_state`) have their leaf's shape and are laid out
  as it would be; their block scales are sharded like their codes, the
  block axis included where the mesh axis divides the number of blocks.

A mesh axis that does not divide the size of the axis it would shard (a rank
of 6 on 4 devices, say) is dropped from that axis: JAX needs even shards.

State leaves are matched to parameters by their key paths: every state of
this library and of optax stores per-parameter trees under the parameter's
own path, so the longest parameter path that ends a state leaf's path is its
parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from flora_jax._src import projection
from flora_jax._src import quantization
from flora_jax._src import tree_util


def _mesh_axis_size(mesh, names) -> int:
  if names is None:
    return 1
  names = names if isinstance(names, tuple) else (names,)
  return int(np.prod([mesh.shape[name] for name in names]))


def _fit(spec: Sequence[Any], shape: tuple[int, ...], mesh) -> PartitionSpec:
  """``spec`` padded to ``shape`` with each axis kept only if it divides."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  kept = [
      names if size % _mesh_axis_size(mesh, names) == 0 else None
      for names, size in zip(spec, shape, strict=True)
  ]
  while kept and kept[-1] is None:  # the canonical form JAX reports
    kept.pop()
  return PartitionSpec(*kept)


def _state_spec(
    shape: tuple[int, ...],
    param_shape: tuple[int, ...],
    param_spec: tuple[Any, ...],
) -> tuple[Any, ...]:
  """The spec of a state leaf derived from its parameter's (see module doc)."""
  param_spec = tuple(param_spec) + (None,) * (
      len(param_shape) - len(param_spec)
  )
  if shape == param_shape:
    return param_spec
  ndim, param_ndim = len(shape), len(param_shape)
  if ndim == param_ndim >= 2 and shape[:-2] == param_shape[:-2]:
    lead = param_spec[:-2]
    (a, b), (m, n) = shape[-2:], param_shape[-2:]
    spec_m, spec_n = param_spec[-2:]
    if b == n and a != m:  # (r, n): rows compressed
      return lead + (None, spec_n)
    if a == m:  # (m, r): columns compressed, or a row projector
      return lead + (spec_m, None)
    if a == n:  # (n, r): a column projector
      return lead + (spec_n, None)
    return lead + (None, None)
  if ndim == param_ndim - 1 >= 1:
    # Factored second moments: which axis a statistic keeps is read off its
    # shape (optax names them by size, not by axis); a square matrix's two
    # statistics both take the rows' sharding.
    if shape == param_shape[:-1]:
      return param_spec[:-1]
    if shape == param_shape[:-2] + param_shape[-1:]:
      return param_spec[:-2] + param_spec[-1:]
  if ndim == param_ndim - 2 and shape == param_shape[:-2]:
    return param_spec[:-2]  # one value per stacked slice
  return ()


def _of_matrix_view(shape: tuple[int, ...], param_shape: tuple[int, ...],
                    view_shape: tuple[int, ...]) -> bool:
  """Whether a state leaf is laid out like the matrix view of its parameter:
  a low-rank moment or projector ``(stack..., a, b)``, or one value per
  stacked matrix; not a statistic of the parameter's own layout."""
  if shape == param_shape:
    return False
  stack = view_shape[:-2]
  return (len(shape) == len(view_shape) and shape[:-2] == stack) or (
      shape == stack)


def _param_specs(params: Any, param_shardings: Any, mesh) -> tuple[Any, Any]:
  """(tree of PartitionSpec, mesh) from explicit shardings or the params."""
  if param_shardings is None:
    is_variable = tree_util.is_variable
    leaves = jax.tree.leaves(params, is_leaf=is_variable)
    if any(is_variable(x) for x in leaves):
      from flax import nnx  # Already imported: the tree holds its Variables.

      param_shardings = nnx.get_partition_spec(params)
      param_shardings = tree_util.unwrap_variables(param_shardings)
    else:
      param_shardings = jax.tree.map(
          lambda x: getattr(x, 'sharding', None), params
      )
  leaves = jax.tree.leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  for leaf in leaves:
    if isinstance(leaf, NamedSharding):
      mesh = mesh or leaf.mesh
  if mesh is None:
    # The concrete mesh set by `jax.set_mesh`, so that the shardings can be
    # compared with (and placed like) real arrays; the abstract one in jit.
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
      mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError(
          'state_shardings needs a mesh: pass NamedShardings, `mesh=`, or'
          ' call it under `jax.set_mesh(mesh)`.'
      )

  def spec_of(sharding):
    if isinstance(sharding, NamedSharding):
      return sharding.spec
    if isinstance(sharding, PartitionSpec):
      return sharding
    if sharding is None or getattr(sharding, 'is_fully_replicated', False):
      return PartitionSpec()
    raise TypeError(
        'parameter shardings must be NamedSharding or PartitionSpec, got'
        f' {sharding!r}.'
    )

  specs = jax.tree.map(
      spec_of,
      param_shardings,
      is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding)),
  )
  return specs, mesh


def state_partition_specs(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """`state_shardings` as a tree of `PartitionSpec`, for `jax.jit` in a mesh.

  Args:
    tx: as in `state_shardings`.
    params: as in `state_shardings`.
    param_shardings: as in `state_shardings`.
    mesh: as in `state_shardings`.

  Returns:
    A tree with the structure of ``jax.eval_shape(tx.init, params)`` of
    `PartitionSpec`.
  """
  return jax.tree.map(
      lambda s: s.spec, state_shardings(tx, params, param_shardings, mesh=mesh)
  )


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """The `NamedSharding` of every leaf of ``tx.init(params)``.

  Args:
    tx: any optax transformation (of this library or not).
    params: the parameters: arrays, `jax.ShapeDtypeStruct` leaves or NNX
      Variables
      (their ``sharding`` metadata from `nnx.with_partitioning` is read).
      Nothing is allocated: the state is evaluated with `jax.eval_shape`.
    param_shardings: a tree like ``params`` of `NamedSharding` or
      `PartitionSpec`; None reads them off ``params`` (``.sharding`` of
      arrays and ShapeDtypeStructs, or NNX metadata).
    mesh: the mesh, when the shardings are `PartitionSpec` objects and no
      mesh is
      set with `jax.set_mesh`.

  Returns:
    A tree with the structure of ``jax.eval_shape(tx.init, params)`` of
    `NamedSharding`, usable as ``out_shardings`` of ``jax.jit(tx.init)``.

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('model',))  # e.g. (2, 4) on 8 devices
    >>> params = jax.device_put({'w': jnp.zeros((256, 512))},
    ...                         NamedSharding(mesh, P(None, 'model')))
    >>> tx = flora_jax.flora(1e-3, rank=32)
    >>> shardings = flora_jax.state_shardings(tx, params)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> state[1].momentum['w'].shape  # the compressed momentum, (r, n)
    (32, 512)
    >>> shardings[1].momentum['w'].spec == P(None, 'model')  # r replicated
    True
  """
  specs, resolved_mesh = _param_specs(params, param_shardings, mesh)
  params = tree_util.unwrap_variables(params)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params
  )
  abstract_state, records = projection.abstract_init_with_plans(
      tx.init, abstract_params)
  # Leaves projected through their DimensionNumbers keep state laid out like
  # their matrix view, not like the parameter.
  views = {plan.path: plan.axes for _, plans in records
           for plan in jax.tree.leaves(plans) if plan.axes is not None}

  param_entries = {}
  for (key_path, leaf), spec in zip(
      jax.tree.leaves_with_path(abstract_params),
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
      strict=True,
  ):
    shape, spec = tuple(leaf.shape), tuple(spec)
    axes = views.get(jax.tree_util.keystr(key_path))
    view = (axes.matrix_shape(shape), axes.matrix_spec(spec, shape)) if axes \
        else None
    param_entries[tree_util.path_parts(key_path)] = (shape, spec, view)
  parameter_of = tree_util.parameter_matcher(param_entries)

  def sharding_of(key_path, leaf):
    shape = tuple(np.shape(leaf))
    spec = ()
    param_path = parameter_of(key_path)
    if param_path is not None:
      param_shape, param_spec, view = param_entries[param_path]
      if view is not None and _of_matrix_view(shape, param_shape, view[0]):
        param_shape, param_spec = view
      spec = _state_spec(shape, param_shape, param_spec)
    return NamedSharding(resolved_mesh, _fit(spec, shape, resolved_mesh))

  shardings = jax.tree.map_with_path(sharding_of, abstract_state)
  return _scales_like_codes(abstract_state, shardings, resolved_mesh)


def _scales_like_codes(abstract_state: Any, shardings: Any, mesh) -> Any:
  """``shardings`` with the scales of every `QuantizedState` in it laid out
  like their codes (axis for axis; a mesh axis kept where it divides)."""
  def lay_out(node, node_shardings):
    if not isinstance(node, quantization.QuantizedState):
      return node_shardings
    codes = {
        jax.tree_util.keystr(path): sharding for path, sharding in
        jax.tree.leaves_with_path(node_shardings.inner_state)
    }
    return node_shardings._replace(scales={
        name: NamedSharding(mesh, _fit(codes[name].spec, scale.shape, mesh))
        for name, scale in node.scales.items()
    })

  is_quantized = lambda x: isinstance(x, quantization.QuantizedState)  # noqa: E731
  return jax.tree.map(lay_out, abstract_state, shardings,
                      is_leaf=is_quantized)


def _lay_out(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  explicit = {
      name
      for name, kind in zip(sharding.mesh.axis_names, sharding.mesh.axis_types,
                            strict=True)
      if kind == jax.sharding.AxisType.Explicit
  }
  named = {
      name
      for names in sharding.spec
      if names is not None
      for name in (names if isinstance(names, tuple) else (names,))
  }
  if explicit and named <= explicit:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def apply_shardings(tree: Any, shardings: Any) -> Any:
  """Lays every leaf of ``tree`` out as ``shardings`` says (inside `jax.jit`).

  The layout step of an init that was not given ``out_shardings``: on
  `AxisType.Auto` axes it is `jax.lax.with_sharding_constraint`, on Explicit
  axes (the default of `jax.make_mesh`) `jax.sharding.reshard`, since there
  a sharding constraint only asserts. NNX Variables (an `nnx.Optimizer`'s
  ``opt_state``) are updated in place; arrays are returned.

  Args:
    tree: arrays or NNX Variables, e.g. a fresh optimizer state.
    shardings: a tree like ``tree`` of `NamedSharding`, e.g. from
      `state_shardings`.

  Returns:
    ``tree`` laid out.

  With an `nnx.Optimizer`, lay out its fresh state where it is made::

    shardings = flora_jax.state_shardings(tx, nnx.state(model, nnx.Param))

    @nnx.jit
    def make_optimizer(model):
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      flora_jax.apply_shardings(optimizer.opt_state, shardings)
      return optimizer

  Example:
    >>> import jax, jax.numpy as jnp, flora_jax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('model',))
    >>> params = {'w': jnp.zeros((256, 512))}
    >>> tx = flora_jax.flora(1e-3, rank=32)
    >>> shardings = flora_jax.state_shardings(
    ...     tx, params, {'w': P(None, 'model')}, mesh=mesh)
    >>> init = jax.jit(
    ...     lambda p: flora_jax.apply_shardings(tx.init(p), shardings))
    >>> init(params)[1].momentum['w'].sharding.spec == P(None, 'model')
    True
  """
  def lay_out(leaf, sharding):
    if tree_util.is_variable(leaf):
      leaf.set_value(_lay_out(leaf.get_value(), sharding))
      return leaf
    return _lay_out(leaf, sharding)

  return jax.tree.map(lay_out, tree, shardings, is_leaf=tree_util.is_variable)
