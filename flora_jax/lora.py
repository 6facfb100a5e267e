"""LoRA adapters for Flax NNX models, and LoRA-GA initialisation.

* `add_lora` puts a scaled LoRA adapter on every `nnx.Linear` / `nnx.Embed`
  of a model whose path matches a pattern: ``y = base(x) + s · x A B`` with
  ``s = α / r`` (or rsLoRA's ``α / sqrt(r)``). The factors are
  `nnx.LoRAParam` (``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)``), so
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them.
* `merge_lora` / `unmerge_lora` fold ``s A B`` into the base weights and back.
* `lora_ga_init` re-initialises the adapters from the SVD of the estimated
  full gradient (LoRA-GA) and offsets the base weights so the model's output
  is unchanged.
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
from typing import Any, NamedTuple, Optional, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flora_jax import _validation
from flora_jax import projection

Path = tuple[Any, ...]
TargetSpec = Union[str, Sequence[str], Callable[[str, nnx.Module], bool]]

DIRECTIONS = ('ArB2r', 'A2rBr', 'ArBr', 'random')
SCALES = ('stable', 'unit')

# PEFT's default for lora_A (kaiming_uniform with a=sqrt(5)): U(±1/sqrt(in)).
_default_a_initializer = nnx.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform'
)


def lora_scale(rank: int, alpha: Optional[float] = None, rslora: bool = False):
  """The LoRA scale ``s``: ``α / r``, or ``α / sqrt(r)`` with rsLoRA.

  ``alpha=None`` means ``α = r`` (``s = 1`` for plain LoRA).
  """
  rank = _validation.check_positive_int('rank', rank)
  alpha = float(rank if alpha is None else alpha)
  if not alpha > 0:
    raise ValueError(f'alpha must be positive, got {alpha}.')
  return alpha / (math.sqrt(rank) if rslora else rank)


class LoRAInitialFactor(nnx.Variable):
  """A factor's value at LoRA-GA initialisation (not trained, kept for export)."""


class ScaledLoRA(nnx.LoRA):
  """`nnx.LoRA` around an `nnx.Linear`, with the LoRA scale ``s``.

  ``y = base(x) + s · (x @ lora_a @ lora_b)``; ``lora_a`` is ``(in, r)``,
  ``lora_b`` ``(r, out)`` (zeros, so a new adapter changes nothing).

  Attributes:
    scale: ``s`` (a Python float).
    merged: True after `merge_lora`: the base kernel holds ``s A B`` and the
      adapter's own term is skipped.
  """

  def __init__(
      self,
      base_module: nnx.Linear,
      rank: int,
      *,
      scale: float,
      rngs: nnx.Rngs,
      a_initializer=_default_a_initializer,
      param_dtype=jnp.float32,
      dtype=None,
  ):
    super().__init__(
        base_module.in_features,
        rank,
        base_module.out_features,
        base_module=base_module,
        a_initializer=a_initializer,
        param_dtype=param_dtype,
        dtype=dtype,
        rngs=rngs,
    )
    self.scale = float(scale)
    self.merged = False

  def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    out = self.base_module(x, **kwargs)
    if self.merged:
      return out
    x, lora_a, lora_b = self.promote_dtype(
        (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
    )
    return out + self.scale * ((x @ lora_a) @ lora_b)

  def delta(self) -> jax.Array:
    """``s A B`` in float32, the shape of the base kernel."""
    return self.scale * _f32(self.lora_a) @ _f32(self.lora_b)

  @property
  def base_weight(self) -> nnx.Variable:
    return self.base_module.kernel


class ScaledLoRAEmbed(nnx.Module):
  """An `nnx.Embed` with a LoRA adapter on its table.

  ``embed(ids) = base(ids) + s · lora_embedding_a[ids] @ lora_embedding_b``
  with ``lora_embedding_a`` ``(num_embeddings, r)`` (zeros) and
  ``lora_embedding_b`` ``(r, features)`` (N(0, 1)), PEFT's initialisation
  of embedding adapters. `attend` (tied output heads) includes the adapter.
  """

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
    self.merged = False

  def __call__(self, inputs: jax.Array) -> jax.Array:
    out = self.base_module(inputs)
    if self.merged:
      return out
    rows = jnp.take(self.lora_embedding_a[...], inputs, axis=0)
    return out + self.scale * (rows @ self.lora_embedding_b[...]).astype(
        out.dtype
    )

  def attend(self, query: jax.Array) -> jax.Array:
    out = self.base_module.attend(query)
    if self.merged:
      return out
    low = query @ self.lora_embedding_b[...].T
    return out + self.scale * (low @ self.lora_embedding_a[...].T).astype(
        out.dtype
    )

  def delta(self) -> jax.Array:
    return (self.scale * _f32(self.lora_embedding_a)
            @ _f32(self.lora_embedding_b))

  @property
  def base_weight(self) -> nnx.Variable:
    return self.base_module.embedding


Adapter = Union[ScaledLoRA, ScaledLoRAEmbed]
_ADAPTABLE = (nnx.Linear, nnx.Embed)


def _f32(variable) -> jax.Array:
  return jnp.asarray(variable[...], jnp.float32)


def _path_string(path: Path) -> str:
  return '/'.join(str(k) for k in path)


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
  return sorted(found, key=lambda item: _path_string(item[0]))


def _inside(path: Path, prefixes: Iterable[Path]) -> bool:
  return any(path[: len(p)] == p for p in prefixes)


def _replace_submodule(model: nnx.Module, path: Path, new: nnx.Module) -> None:
  parent = model
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
    alpha: Optional[float] = None,
    rslora: bool = False,
    rngs: nnx.Rngs,
    a_initializer=_default_a_initializer,
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
    a_initializer: initializer of ``lora_a`` (default: PEFT's
      ``U(±1/sqrt(in))``).
    param_dtype, dtype: of the factors and of the adapter's computation.

  Returns:
    The adapted module paths, sorted.

  Raises:
    ValueError: no `nnx.Linear`/`nnx.Embed` matches, a matched layer already
      has an adapter, or ``rank`` exceeds a matched layer's size.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> add_lora(model, r'layers/\d+', rank=2, alpha=4, rngs=nnx.Rngs(1))
    ('layers/0',)

  References:
    Hu et al., 2021, https://arxiv.org/abs/2106.09685; rsLoRA: Kalajdzievski,
    2023, https://arxiv.org/abs/2312.03732
  """
  scale = lora_scale(rank, alpha, rslora)
  matches = _target_predicate(targets)
  adapted = [path for path, _ in _adapters(model)]
  chosen, candidates = [], []
  for path, module in nnx.iter_modules(model):
    if not path or _inside(path, adapted) and path not in adapted:
      continue  # the model itself, or a base module inside an adapter
    name = _path_string(path)
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
  for path, module in chosen:
    if isinstance(module, nnx.Linear):
      size = min(module.in_features, module.out_features)
    else:
      size = min(module.num_embeddings, module.features)
    if rank > size:
      raise ValueError(
          f'rank {rank} exceeds layer {_path_string(path)}, whose smaller'
          f' dimension is {size}.'
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
  return tuple(sorted(_path_string(path) for path, _ in chosen))


def _require_adapters(model: nnx.Module, what: str):
  adapters = _adapters(model)
  if not adapters:
    raise ValueError(f'{what}: the model has no adapters (see add_lora).')
  return adapters


def _add_to(variable: nnx.Variable, delta: jax.Array) -> None:
  variable[...] = (_f32(variable) + delta).astype(variable[...].dtype)


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its base weight: ``W <- W + s A B`` (in place).

  The merged model computes the same function without the adapter term (one
  matmul per layer). Gradients no longer reach the factors until
  `unmerge_lora`, which subtracts the same product again.
  """
  for _, adapter in _require_adapters(model, 'merge_lora'):
    if not adapter.merged:
      _add_to(adapter.base_weight, adapter.delta())
      adapter.merged = True


def unmerge_lora(model: nnx.Module) -> None:
  """Undoes `merge_lora`: ``W <- W - s A B`` (in place)."""
  for _, adapter in _require_adapters(model, 'unmerge_lora'):
    if adapter.merged:
      _add_to(adapter.base_weight, -adapter.delta())
      adapter.merged = False


# ---------------------------------------------------------------- export


class LoRADelta(NamedTuple):
  """A weight delta ``scale · a @ b`` in the base weight's layout."""

  a: jax.Array  # (in, k) for a kernel, (num_embeddings, k) for a table
  b: jax.Array  # (k, out) / (k, features)
  scale: float

  def dense(self) -> jax.Array:
    return self.scale * (jnp.asarray(self.a, jnp.float32)
                         @ jnp.asarray(self.b, jnp.float32))


def _factors(adapter: Adapter) -> tuple[nnx.Variable, nnx.Variable]:
  if isinstance(adapter, ScaledLoRA):
    return adapter.lora_a, adapter.lora_b
  return adapter.lora_embedding_a, adapter.lora_embedding_b


def lora_delta(model: nnx.Module) -> dict[str, LoRADelta]:
  """Every adapter as a delta relative to the ORIGINAL base weights.

  A plain adapter's delta is ``s A B``. After `lora_ga_init` the base weight
  was offset to ``W0 - s A0 B0``, so the trained model's weight is
  ``W0 + s (A B - A0 B0)``: its delta is returned at rank ``2r`` as
  ``a = [A, -A0]``, ``b = [B; B0]``, which applies to the untouched
  ``W0`` (`apply_lora_delta`), e.g. a base model loaded from its original
  checkpoint. Merged or not makes no difference.

  Returns:
    ``{module path: LoRADelta}``, keyed like `add_lora`'s result.
  """
  deltas = {}
  for path, adapter in _require_adapters(model, 'lora_delta'):
    a, b = (v[...] for v in _factors(adapter))
    if hasattr(adapter, 'initial_a'):
      a = jnp.concatenate([a, -adapter.initial_a[...]], axis=1)
      b = jnp.concatenate([b, adapter.initial_b[...]], axis=0)
    deltas[_path_string(path)] = LoRADelta(a, b, adapter.scale)
  return deltas


def apply_lora_delta(model: nnx.Module, deltas: dict[str, LoRADelta]) -> None:
  """Adds exported deltas to a model without adapters (in place).

  Each key must name an `nnx.Linear` (its kernel gets the delta) or an
  `nnx.Embed` (its table) of ``model`` with the delta's shape.
  """
  modules = {_path_string(p): m for p, m in nnx.iter_modules(model) if p}
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
    _add_to(weight, dense)


# --------------------------------------------------------------- LoRA-GA


def _check_direction_and_scale(direction, scale, stable_gamma):
  _validation.check_choice('direction', direction, DIRECTIONS)
  if isinstance(scale, str):
    _validation.check_choice('scale', scale, SCALES)
  elif not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(
        f"scale must be one of {SCALES} or a positive number, got {scale!r}."
    )
  if not (isinstance(stable_gamma, (int, float)) and stable_gamma > 0):
    raise ValueError(f'stable_gamma must be positive, got {stable_gamma!r}.')


def _singular_indices(direction: str, rank: int, key) -> tuple[Any, Any]:
  """Which singular vectors go to A (left, U) and B (right, Vᵀ), Flax layout."""
  if direction == 'ArB2r':
    return np.arange(rank), np.arange(rank, 2 * rank)
  if direction == 'A2rBr':
    return np.arange(rank, 2 * rank), np.arange(rank)
  if direction == 'ArBr':  # interleaved, as the official code: B even, A odd
    return np.arange(1, 2 * rank, 2), np.arange(0, 2 * rank, 2)
  order = np.asarray(jax.random.permutation(key, 2 * rank))
  return order[:rank], order[rank:]


class _KernelsOf(NamedTuple):
  """A hashable NNX filter: the variables at the given paths."""

  paths: frozenset

  def __call__(self, path, _) -> bool:
    return tuple(path) in self.paths


@functools.partial(jax.jit, donate_argnums=0, static_argnums=(4, 5, 6))
def _accumulate_gradient(total, targets, rest, batch, graphdef, is_target,
                         loss_fn):
  """``total + ∂loss/∂targets``; ``total`` is donated: one buffer per weight.

  Only ``targets`` are differentiated. Returns the new total and ``rest``
  as the loss left it (advanced RNG streams, batch statistics).
  """

  def loss_of(targets):
    model = nnx.merge(graphdef, targets, rest)
    loss = loss_fn(model, batch)
    return loss, nnx.split(model, is_target, ...)[2]

  grads, rest = jax.grad(loss_of, has_aux=True)(targets)
  total = jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads)
  return total, rest


def lora_ga_init(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batches: Iterable[Any],
    *,
    direction: str = 'ArB2r',
    scale: Union[str, float] = 'stable',
    stable_gamma: float = 16.0,
    key: Any = 0,
) -> dict[str, jax.Array]:
  r"""LoRA-GA: initialise every linear adapter from the full gradient's SVD.

  1. The gradient of ``loss_fn`` with respect to each adapted layer's base
     kernel, averaged over ``batches``: one jitted step per batch, each
     added into a single float32 accumulator per kernel (only those kernels
     are differentiated).
  2. ``G = U S Vᵀ`` (Flax layout ``(in, out)``). With the default direction
     ``'ArB2r'``: ``lora_a = c U[:, :r]`` (top-r LEFT vectors of the kernel
     gradient = PyTorch's right vectors) and ``lora_b = c Vᵀ[r:2r]`` (right
     vectors r+1..2r). Singular values are not used.
  3. ``scale='stable'``: ``c = d_out^{1/4} / sqrt(γ)`` on both factors,
     ``d_out = kernel.shape[1]``, ``γ = stable_gamma`` (16).
  4. ``W <- W - s A B``, so the model's output is unchanged, and the
     initial factors are kept (`LoRAInitialFactor`) for `lora_delta`.

  Then one SGD step of learning rate ``η`` on the factors changes the
  effective weight by ``-η s² c² G_2r + O(η²)``, ``G_2r`` the best rank-2r
  approximation of ``G``: full fine-tuning's best low-rank first step.

  Embedding adapters (`ScaledLoRAEmbed`) are left as they are.

  Args:
    model: an NNX model with `ScaledLoRA` adapters (`add_lora`), modified
      in place.
    loss_fn: ``loss_fn(model, batch) -> scalar``, the training loss. The
      gradient step is compiled per ``loss_fn`` (and model structure): pass
      a function defined once, not a new lambda per call, to reuse it.
    batches: an iterable of batches (a generator is fine: they are consumed
      one at a time, never held together). The paper uses 8 samples, the
      official examples 128.
    direction: ``'ArB2r'`` (default), ``'A2rBr'`` (A from vectors r+1..2r,
      B from the top r), ``'ArBr'`` (the first 2r vectors interleaved: B
      the even, A the odd ones, as the official code) or ``'random'`` (a
      random split of the first 2r, from ``key``).
    scale: ``'stable'`` (default), ``'unit'`` (``c = 1``) or a positive
      number ``c``.
    stable_gamma: γ of the stable scale.
    key: PRNG key or seed for ``direction='random'``.

  Returns:
    ``{adapter path: the first 2r singular values of its averaged
    gradient}``.

  Raises:
    ValueError: no linear adapter, ``2r`` larger than a layer's smaller
      dimension, or ``batches`` yields nothing.

  References:
    Wang, Yu, Li, 2024, https://arxiv.org/abs/2407.05000
  """
  _check_direction_and_scale(direction, scale, stable_gamma)
  projection.check_key_argument(key)
  adapters = [
      (path, a) for path, a in _require_adapters(model, 'lora_ga_init')
      if isinstance(a, ScaledLoRA)
  ]
  if not adapters:
    raise ValueError('lora_ga_init: the model has no linear LoRA adapters.')
  for path, adapter in adapters:
    rank = adapter.lora_a.shape[1]
    if 2 * rank > min(adapter.base_weight.shape):
      raise ValueError(
          f'lora_ga_init: layer {_path_string(path)} of shape'
          f' {adapter.base_weight.shape} cannot supply 2r = {2 * rank}'
          ' singular vectors; lower the rank.'
      )
  if any(a.merged for _, a in adapters):
    raise ValueError('lora_ga_init: unmerge the adapters first.')

  is_target = _KernelsOf(
      frozenset(path + ('base_module', 'kernel') for path, _ in adapters)
  )
  graphdef, targets, rest = nnx.split(model, is_target, ...)
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), targets)
  count = 0
  for batch in batches:
    total, rest = _accumulate_gradient(
        total, targets, rest, batch, graphdef, is_target, loss_fn
    )
    count += 1
  if count == 0:
    raise ValueError('lora_ga_init: batches yielded no batch.')
  nnx.update(model, rest)  # RNG streams etc. as the loss advanced them

  gradients = {path: v[...] for path, v in nnx.to_flat_state(total)}
  key = projection.as_prng_key(key)
  spectra = {}
  for index, (path, adapter) in enumerate(adapters):
    grad = gradients[path + ('base_module', 'kernel')] / count
    u, s, vt = jnp.linalg.svd(grad, full_matrices=False)
    rank = adapter.lora_a.shape[1]
    a_idx, b_idx = _singular_indices(
        direction, rank, jax.random.fold_in(key, index)
    )
    if scale == 'stable':
      c = grad.shape[1] ** 0.25 / math.sqrt(stable_gamma)
    elif scale == 'unit':
      c = 1.0
    else:
      c = float(scale)
    lora_a = c * u[:, a_idx]
    lora_b = c * vt[b_idx, :]
    adapter.lora_a[...] = lora_a.astype(adapter.lora_a[...].dtype)
    adapter.lora_b[...] = lora_b.astype(adapter.lora_b[...].dtype)
    _add_to(adapter.base_weight, -adapter.delta())
    adapter.initial_a = LoRAInitialFactor(adapter.lora_a[...])
    adapter.initial_b = LoRAInitialFactor(adapter.lora_b[...])
    spectra[_path_string(path)] = s[: 2 * rank]
  return spectra
