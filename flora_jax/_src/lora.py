"""LoRA adapters for Flax NNX models: add, merge, export.

* `add_lora` puts a scaled LoRA adapter on every `nnx.Linear` / `nnx.Embed`
  of a model whose path matches a pattern: ``y = base(x) + s · x A B`` with
  ``s = α / r`` (or rsLoRA's ``α / sqrt(r)``). The factors are
  `nnx.LoRAParam` (``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)``), so
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them.
* `merge_lora` / `unmerge_lora` fold ``s A B`` into the base weights and back.
  Whether an adapter is merged, and with which factors, is model state
  (`LoRAMergeRecord`): it travels with `nnx.state` and checkpoints.
* `lora_ga_init` (``lora_ga.py``) re-initialises the adapters from the SVD
  of the estimated full gradient.
* `lora_delta` exports every adapter as a low-rank delta relative to the
  ORIGINAL weights; `apply_lora_delta` adds it to an untouched model.

Layout: a Flax kernel is ``(in, out)``, a PyTorch weight ``(out, in)``, so
PEFT's ``lora_A (r, in)`` is ``lora_a.T`` here and ``lora_B (out, r)`` is
``lora_b.T``; the gradient of a kernel is the transpose of PyTorch's.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from flora_jax._src import tree_util
from flora_jax._src import validation

Path = tuple[Any, ...]
TargetSpec = str | Sequence[str] | Callable[[str, nnx.Module], bool]

# PEFT's default for lora_A (kaiming_uniform with a=sqrt(5)): U(±1/sqrt(in)).
_default_a_initializer = nnx.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform'
)


def lora_scale(rank: int, alpha: float | None = None, rslora: bool = False):
  """The LoRA scale ``s``: ``α / r``, or ``α / sqrt(r)`` with rsLoRA.

  Args:
    rank: the rank ``r``.
    alpha: α; None means ``α = r`` (``s = 1`` for plain LoRA).
    rslora: use rank-stabilised LoRA's ``α / sqrt(r)``.

  Returns:
    ``s`` as a Python float.

  Example:
    >>> from flora_jax import nnx as lora
    >>> lora.lora_scale(8, alpha=16)
    2.0
  """
  rank = validation.check_positive_int('rank', rank)
  validation.check_positive_number('alpha', alpha, optional=True)
  alpha = float(rank if alpha is None else alpha)
  return alpha / (math.sqrt(rank) if rslora else rank)


class LoRAInitialFactor(nnx.Variable):
  """A factor's value at LoRA-GA initialisation: kept for export."""


class LoRAMergeRecord(nnx.Variable):
  """What `merge_lora` folded into an adapter's base weight.

  Every adapter holds three: ``merged``, a bool scalar, and ``merged_a`` /
  ``merged_b``, the factors as they were merged (zeros while unmerged), so
  that `unmerge_lora` subtracts exactly what was added even if an optimizer
  moved the factors meanwhile. Being state, not Python attributes, they
  travel with `nnx.state`, `nnx.split`, `nnx.update` and checkpoints, and
  are traced under `nnx.jit`. They are not `nnx.Param`: optimizers built
  with ``wrt=nnx.Param`` or ``wrt=nnx.LoRAParam`` leave them alone.
  """

  def __bool__(self) -> bool:
    # `if adapter.merged:` reads the flag (concrete values only), as when it
    # was a Python bool.
    return bool(self[...])


def _init_merge_record(adapter, a: nnx.Variable, b: nnx.Variable) -> None:
  adapter.merged = LoRAMergeRecord(jnp.array(False))
  adapter.merged_a = LoRAMergeRecord(jnp.zeros_like(a[...]))
  adapter.merged_b = LoRAMergeRecord(jnp.zeros_like(b[...]))


def _unless_merged(adapter: Adapter, out: jax.Array,
                   adapted: Callable[[], jax.Array]) -> jax.Array:
  """``out`` if ``adapter`` is merged, else ``adapted()``: out + its term."""
  return _if_merged(adapter, lambda: out, adapted)


def _if_merged(adapter: Adapter, merged: Callable[[], Any],
               unmerged: Callable[[], Any]) -> Any:
  """``merged()`` or ``unmerged()``, as ``adapter.merged`` says.

  A concrete flag (eager code) branches in Python and computes one side. A
  traced one (under `nnx.jit`) computes both and selects elementwise: in
  the forward pass that costs the low-rank term, where `lax.cond` would cut
  the fused step apart at every adapter, merged or not.
  """
  flag = adapter.merged[...]
  if validation.is_concrete(flag):
    return merged() if bool(flag) else unmerged()
  return jax.tree.map(functools.partial(jnp.where, flag), merged(),
                      unmerged())


class ScaledLoRA(nnx.LoRA):
  """`nnx.LoRA` around an `nnx.Linear`, with the LoRA scale ``s``.

  ``y = base(x) + s · (x @ lora_a @ lora_b)``; ``lora_a`` is ``(in, r)``,
  ``lora_b`` ``(r, out)`` (zeros, so a new adapter changes nothing).

  Attributes:
    scale: ``s`` (a Python float).
    merged: a `LoRAMergeRecord` bool scalar, True after `merge_lora`: the
      base kernel holds ``s A_m B_m`` and the adapter's own term is skipped
      (``bool(adapter.merged)`` reads it).
    merged_a: ``A_m``, ``lora_a`` as it was merged (zeros while unmerged).
    merged_b: ``B_m``, ``lora_b`` as it was merged (zeros while unmerged).
    initial_a: ``A0``, only after `lora_ga_init`: with ``initial_b``, the
      base kernel is ``W0 - s A0 B0``, ``W0`` the original one (rank ``r``,
      more after repeated calls on trained adapters).
    initial_b: ``B0``, only after `lora_ga_init`.
  """

  base_module: nnx.Linear
  merged: LoRAMergeRecord
  merged_a: LoRAMergeRecord
  merged_b: LoRAMergeRecord
  initial_a: LoRAInitialFactor
  initial_b: LoRAInitialFactor

  def __init__(
      self,
      base_module: nnx.Linear,
      rank: int,
      *,
      scale: float,
      rngs: nnx.Rngs,
      a_initializer: nnx.Initializer | None = None,
      param_dtype=jnp.float32,
      dtype=None,
  ):
    super().__init__(
        base_module.in_features,
        rank,
        base_module.out_features,
        base_module=base_module,
        a_initializer=a_initializer or _default_a_initializer,
        param_dtype=param_dtype,
        dtype=dtype,
        rngs=rngs,
    )
    self.scale = float(scale)
    _init_merge_record(self, self.lora_a, self.lora_b)

  def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    out = self.base_module(x, **kwargs)

    def adapted():
      inputs, lora_a, lora_b = self.promote_dtype(
          (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
      )
      return out + self.scale * ((inputs @ lora_a) @ lora_b)

    return _unless_merged(self, out, adapted)

  def delta(self) -> jax.Array:
    """``s A B`` in float32, the shape of the base kernel."""
    return scaled_product(self.scale, self.lora_a, self.lora_b)

  @property
  def base_weight(self) -> nnx.Variable:
    return self.base_module.kernel


class ScaledLoRAEmbed(nnx.Module):
  """An `nnx.Embed` with a LoRA adapter on its table.

  ``embed(ids) = base(ids) + s · lora_embedding_a[ids] @ lora_embedding_b``
  with ``lora_embedding_a`` ``(num_embeddings, r)`` (zeros) and
  ``lora_embedding_b`` ``(r, features)`` (N(0, 1)), PEFT's initialisation
  of embedding adapters. `attend` (tied output heads) includes the adapter.
  ``merged``, ``merged_a`` and ``merged_b`` are as in `ScaledLoRA`.
  """

  merged: LoRAMergeRecord
  merged_a: LoRAMergeRecord
  merged_b: LoRAMergeRecord

  def __init__(
      self,
      base_module: nnx.Embed,
      rank: int,
      *,
      scale: float,
      rngs: nnx.Rngs,
      param_dtype=jnp.float32,
  ):
    self.base_module = base_module
    self.lora_embedding_a = nnx.LoRAParam(
        jnp.zeros((base_module.num_embeddings, rank), param_dtype)
    )
    self.lora_embedding_b = nnx.LoRAParam(
        jax.random.normal(rngs.params(), (rank, base_module.features),
                          param_dtype)
    )
    self.scale = float(scale)
    _init_merge_record(self, self.lora_embedding_a, self.lora_embedding_b)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    out = self.base_module(inputs)

    def adapted():
      rows = jnp.take(self.lora_embedding_a[...], inputs, axis=0)
      return out + self.scale * (rows @ self.lora_embedding_b[...]).astype(
          out.dtype
      )

    return _unless_merged(self, out, adapted)

  def attend(self, query: jax.Array) -> jax.Array:
    out = self.base_module.attend(query)

    def adapted():
      low = query @ self.lora_embedding_b[...].T
      return out + self.scale * (low @ self.lora_embedding_a[...].T).astype(
          out.dtype
      )

    return _unless_merged(self, out, adapted)

  def delta(self) -> jax.Array:
    """``s A B`` in float32, the shape of the base table."""
    return scaled_product(self.scale, self.lora_embedding_a,
                          self.lora_embedding_b)

  @property
  def base_weight(self) -> nnx.Variable:
    return self.base_module.embedding


Adapter = ScaledLoRA | ScaledLoRAEmbed
_ADAPTABLE = (nnx.Linear, nnx.Embed)


def _f32(variable) -> jax.Array:
  return jnp.asarray(variable[...], jnp.float32)


def scaled_product(scale: float, a, b) -> jax.Array:
  """``scale · a @ b`` in float32; ``a``, ``b`` arrays or Variables."""
  return scale * _f32(a) @ _f32(b)


def _target_predicate(targets: TargetSpec) -> Callable[[str, nnx.Module], bool]:
  if callable(targets):
    return targets
  if isinstance(targets, str):
    patterns = [targets]
  elif isinstance(targets, Sequence):
    patterns = list(targets)
  else:
    patterns = []
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise TypeError(
        'targets must be a regex string, a sequence of them, or a callable'
        f' (path, module) -> bool, got {targets!r}.'
    )
  compiled = [re.compile(p) for p in patterns]
  return lambda path, _: any(p.fullmatch(path) for p in compiled)


def _adapters(model: nnx.Module) -> list[tuple[Path, Adapter]]:
  found = [
      (path, module)
      for path, module in nnx.iter_modules(model)
      if isinstance(module, (ScaledLoRA, ScaledLoRAEmbed))
  ]
  return sorted(found, key=lambda item: tree_util.path_string(item[0]))


def _inside(path: Path, prefixes: Iterable[Path]) -> bool:
  return any(path[: len(p)] == p for p in prefixes)


def _replace_submodule(model: nnx.Module, path: Path, new: nnx.Module) -> None:
  parent: Any = model
  for key in path[:-1]:
    parent = getattr(parent, key) if isinstance(key, str) else parent[key]
  if isinstance(path[-1], str):
    setattr(parent, path[-1], new)
  else:
    parent[path[-1]] = new


def add_lora(
    model: nnx.Module,
    targets: TargetSpec,
    rank: int,
    *,
    alpha: float | None = None,
    rslora: bool = False,
    rngs: nnx.Rngs,
    a_initializer: nnx.Initializer | None = None,
    param_dtype=jnp.float32,
    dtype=None,
) -> tuple[str, ...]:
  r"""Adds LoRA adapters, in place, to the matching layers of ``model``.

  Every `nnx.Linear` (and `nnx.Embed`) whose module path matches
  ``targets`` is replaced by a `ScaledLoRA` (`ScaledLoRAEmbed`) around it:
  ``y = x W + b + s · x A B`` with ``s = α / r`` (rsLoRA: ``α / sqrt(r)``),
  ``A`` ``(in, r)`` PEFT-initialised and ``B`` ``(r, out)`` zero, so the
  model's output is unchanged. The base weights stay `nnx.Param`; the
  factors are `nnx.LoRAParam`.

  Args:
    model: an NNX module, modified in place.
    targets: which layers: a regular expression matched in full against the
      module path joined by ``'/'`` (``'blocks/0/attn/query'``), a sequence
      of them, or a callable ``(path, module) -> bool``. Only `nnx.Linear`
      and `nnx.Embed` modules are adapted; others that match are passed over.
    rank: r, at most ``min(in, out)`` of each adapted layer.
    alpha: α (default ``r``: ``s = 1``).
    rslora: use ``s = α / sqrt(r)`` (rank-stabilised LoRA).
    rngs: for ``A`` (and the embedding adapters' ``B``).
    a_initializer: initializer of ``lora_a``; None for PEFT's
      ``U(±1/sqrt(in))``.
    param_dtype: dtype of the factors.
    dtype: dtype of the adapter's computation (None: from the inputs).

  Returns:
    The adapted module paths, sorted.

  Raises:
    ValueError: no `nnx.Linear`/`nnx.Embed` matches, a matched layer already
      has an adapter, or ``rank`` exceeds a matched layer's size.

  Example:
    >>> from flax import nnx
    >>> from flora_jax import nnx as lora
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> lora.add_lora(model, r'layers/\d+', rank=2, alpha=4, rngs=nnx.Rngs(1))
    ('layers/0',)

  References:
    Hu et al., 2021, https://arxiv.org/abs/2106.09685; rsLoRA: Kalajdzievski,
    2023, https://arxiv.org/abs/2312.03732
  """
  scale = lora_scale(rank, alpha, rslora)
  chosen = _matching_layers(model, targets)
  for path, module in chosen:
    size = min(_matrix_shape(module))
    if rank > size:
      raise ValueError(
          f'rank {rank} exceeds layer {tree_util.path_string(path)}, whose'
          f' smaller dimension is {size}.'
      )
  for path, module in chosen:
    if isinstance(module, nnx.Linear):
      adapter = ScaledLoRA(
          module, rank, scale=scale, rngs=rngs, a_initializer=a_initializer,
          param_dtype=param_dtype, dtype=dtype,
      )
    else:
      adapter = ScaledLoRAEmbed(
          module, rank, scale=scale, rngs=rngs, param_dtype=param_dtype
      )
    _replace_submodule(model, path, adapter)
  return tuple(sorted(tree_util.path_string(path) for path, _ in chosen))


def _matching_layers(model: nnx.Module, targets: TargetSpec):
  """``[(path, layer)]`` of the adaptable layers ``targets`` selects."""
  matches = _target_predicate(targets)
  adapted = [path for path, _ in _adapters(model)]
  chosen, candidates = [], []
  for path, module in nnx.iter_modules(model):
    if not path or _inside(path, adapted) and path not in adapted:
      continue  # the model itself, or a base module inside an adapter
    name = tree_util.path_string(path)
    if isinstance(module, _ADAPTABLE) or path in adapted:
      candidates.append(name)
    if not matches(name, module):
      continue
    if path in adapted or isinstance(module, nnx.LoRALinear):
      raise ValueError(f'Layer {name} already has a LoRA adapter.')
    if isinstance(module, _ADAPTABLE):
      chosen.append((path, module))
  if not chosen:
    raise ValueError(
        f'targets {targets!r} match no nnx.Linear or nnx.Embed layer; the'
        f' layers are: {sorted(candidates)}.'
    )
  return chosen


def _matrix_shape(module: nnx.Linear | nnx.Embed) -> tuple[int, int]:
  if isinstance(module, nnx.Linear):
    return module.in_features, module.out_features
  return module.num_embeddings, module.features


def adapters_of(model: nnx.Module, what: str):
  """The model's adapters, sorted by path; raises if there are none."""
  adapters = _adapters(model)
  if not adapters:
    raise ValueError(f'{what}: the model has no adapters (see add_lora).')
  return adapters


def _plus(variable: nnx.Variable, delta: jax.Array) -> jax.Array:
  """``variable + delta``, added in float32, in the variable's dtype."""
  return (_f32(variable) + delta).astype(variable[...].dtype)


def add_to(variable: nnx.Variable, delta: jax.Array) -> None:
  variable[...] = _plus(variable, delta)


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its base weight: ``W <- W + s A B`` (in place).

  The merged model computes the same function without the adapter term (one
  matmul per layer, in eager code; under `nnx.jit` the flag is traced, the
  low-rank term is computed and discarded). Gradients no longer reach the
  factors until `unmerge_lora`, but an optimizer may still move them
  (momentum, weight decay): the factors as merged, ``A_m`` and ``B_m``, are
  recorded (`LoRAMergeRecord`, ``r (m + n)`` numbers per adapter) and the
  merged model keeps computing ``W + s A_m B_m``. Adapters already merged
  are left as they are. Works under `nnx.jit` too.

  Args:
    model: a model with adapters (`add_lora`), modified in place.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flora_jax import nnx as lora
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> lora.add_lora(model, 'layers/0', rank=2, rngs=nnx.Rngs(1))
    ('layers/0',)
    >>> model.layers[0].lora_b[...] = jnp.ones((2, 8))  # as if trained
    >>> x = jnp.ones((1, 8))
    >>> before = model(x)
    >>> lora.merge_lora(model)
    >>> bool(model.layers[0].merged)
    True
    >>> bool(jnp.allclose(model(x), before, atol=1e-5))
    True
  """
  for _, adapter in adapters_of(model, 'merge_lora'):
    _merge(adapter)


def _merge(adapter: Adapter) -> None:
  record = (adapter.base_weight, adapter.merged_a, adapter.merged_b)
  a, b = _factors(adapter)
  values = _if_merged(
      adapter,
      lambda: tuple(v[...] for v in record),  # already merged: unchanged
      lambda: (_plus(adapter.base_weight, adapter.delta()), a[...], b[...]),
  )
  for variable, value in zip(record, values, strict=True):
    variable[...] = value
  adapter.merged[...] = jnp.array(True)


def unmerge_lora(model: nnx.Module) -> None:
  """Undoes `merge_lora`: ``W <- W - s A_m B_m`` (in place).

  ``A_m``, ``B_m`` are the factors as `merge_lora` recorded them, so the
  base weights come back to what they were (to float rounding) however the
  factors changed while merged; the adapters then compute with their
  current factors. Adapters not merged are left as they are.

  Args:
    model: a model with adapters (`add_lora`), modified in place.
  """
  for _, adapter in adapters_of(model, 'unmerge_lora'):
    _unmerge(adapter)


def _unmerge(adapter: Adapter) -> None:
  record = (adapter.base_weight, adapter.merged_a, adapter.merged_b)

  def restore():
    added = scaled_product(adapter.scale, adapter.merged_a, adapter.merged_b)
    return (_plus(adapter.base_weight, -added),
            jnp.zeros_like(adapter.merged_a[...]),
            jnp.zeros_like(adapter.merged_b[...]))

  values = _if_merged(adapter, restore,
                      lambda: tuple(v[...] for v in record))
  for variable, value in zip(record, values, strict=True):
    variable[...] = value
  adapter.merged[...] = jnp.array(False)


# ---------------------------------------------------------------- export


class LoRADelta(NamedTuple):
  """A weight delta ``scale · a @ b`` in the base weight's layout.

  Attributes:
    a: ``(in, k)`` for a kernel, ``(num_embeddings, k)`` for a table.
    b: ``(k, out)`` for a kernel, ``(k, features)`` for a table.
    scale: the LoRA scale ``s``.
  """

  a: jax.Array  # (in, k) for a kernel, (num_embeddings, k) for a table
  b: jax.Array  # (k, out) / (k, features)
  scale: float

  def dense(self) -> jax.Array:
    """The delta as a full float32 matrix."""
    return self.scale * (jnp.asarray(self.a, jnp.float32)
                         @ jnp.asarray(self.b, jnp.float32))


def _factors(adapter: Adapter) -> tuple[nnx.Variable, nnx.Variable]:
  if isinstance(adapter, ScaledLoRA):
    return adapter.lora_a, adapter.lora_b
  return adapter.lora_embedding_a, adapter.lora_embedding_b


def _computing_factors(adapter: Adapter) -> tuple[jax.Array, jax.Array]:
  """The factors the adapter's term computes with: as merged, or current."""
  return _if_merged(
      adapter, lambda: (adapter.merged_a[...], adapter.merged_b[...]),
      lambda: tuple(v[...] for v in _factors(adapter)),
  )


def lora_delta(model: nnx.Module) -> dict[str, LoRADelta]:
  """Every adapter as a delta relative to the ORIGINAL base weights.

  A plain adapter's delta is ``s A B``. After `lora_ga_init` the base weight
  was offset to ``W0 - s A0 B0``, so the trained model's weight is
  ``W0 + s (A B - A0 B0)``: its delta is returned at rank ``2r`` as
  ``a = [A, -A0]``, ``b = [B; B0]``, which applies to the untouched
  ``W0`` (`apply_lora_delta`), e.g. a base model loaded from its original
  checkpoint (``A0`` is wider than ``r`` after repeated `lora_ga_init` on
  trained adapters). A merged adapter exports the factors it was merged
  with, ``A_m`` and ``B_m``: the delta is always that of the function the
  model computes, merged or not.

  Args:
    model: a model with adapters (`add_lora`).

  Returns:
    ``{module path: LoRADelta}``, keyed like `add_lora`'s result.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flora_jax import nnx as lora
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> lora.add_lora(model, 'layers/0', rank=2, rngs=nnx.Rngs(1))
    ('layers/0',)
    >>> original = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> model.layers[0].lora_b[...] = jnp.ones((2, 8))  # as if trained
    >>> lora.apply_lora_delta(original, lora.lora_delta(model))
    >>> x = jnp.ones((1, 8))
    >>> bool(jnp.allclose(original(x), model(x), atol=1e-5))
    True
  """
  deltas = {}
  for path, adapter in adapters_of(model, 'lora_delta'):
    a, b = _computing_factors(adapter)
    if isinstance(adapter, ScaledLoRA) and hasattr(adapter, 'initial_a'):
      a = jnp.concatenate([a, -adapter.initial_a[...]], axis=1)
      b = jnp.concatenate([b, adapter.initial_b[...]], axis=0)
    deltas[tree_util.path_string(path)] = LoRADelta(a, b, adapter.scale)
  return deltas


def apply_lora_delta(model: nnx.Module, deltas: dict[str, LoRADelta]) -> None:
  """Adds exported deltas to a model without adapters (in place).

  Args:
    model: a model without adapters, e.g. the base model loaded again from
      its original checkpoint; modified in place.
    deltas: from `lora_delta`. Each key must name an `nnx.Linear` (its
      kernel gets the delta) or an `nnx.Embed` (its table) of ``model`` with
      the delta's shape.

  Raises:
    ValueError: a key names no such layer, or the shapes differ.
  """
  modules = {
      tree_util.path_string(p): m for p, m in nnx.iter_modules(model) if p
  }
  for name, delta in deltas.items():
    module = modules.get(name)
    if isinstance(module, nnx.Linear):
      weight = module.kernel
    elif isinstance(module, nnx.Embed):
      weight = module.embedding
    else:
      raise ValueError(
          f'apply_lora_delta: {name} is not an nnx.Linear or nnx.Embed of'
          f' the model (found {type(module).__name__}).'
      )
    dense = delta.dense()
    if dense.shape != weight[...].shape:
      raise ValueError(
          f'apply_lora_delta: the delta for {name} has shape {dense.shape},'
          f' the weight {weight[...].shape}.'
      )
    add_to(weight, dense)
