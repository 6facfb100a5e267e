"""LoRA-GA: LoRA adapters initialised from the full gradient's SVD.

LoRA-GA (Wang, Yu & Li, NeurIPS 2024, https://arxiv.org/abs/2407.05000)
chooses the adapters' initial factors so that the first step of LoRA matches
full fine-tuning's best low-rank step, and offsets the frozen weights so the
model's output does not change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flora_jax._src import deprecation
from flora_jax._src import keys
from flora_jax._src import tree_util
from flora_jax._src import validation
from flora_jax._src.lora import LoRAInitialFactor
from flora_jax._src.lora import ScaledLoRA
from flora_jax._src.lora import adapters_of
from flora_jax._src.lora import add_to

Direction = Literal['ArB2r', 'A2rBr', 'ArBr', 'random']
FactorScale = Literal['stable', 'unit']

_KERNEL = ('base_module', 'kernel')


@deprecation.renamed_arguments(scale='factor_scale')
def lora_ga_init(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batches: Iterable[Any],
    *,
    direction: Direction = 'ArB2r',
    factor_scale: FactorScale | float = 'stable',
    stable_gamma: float = 16.0,
    key: keys.PRNGKeyLike = 0,
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
  3. ``factor_scale='stable'``: ``c = d_out^{1/4} / sqrt(γ)`` on both
     factors, ``d_out = kernel.shape[1]``, ``γ = stable_gamma`` (16).
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
    factor_scale: the factors' scale c: ``'stable'`` (default), ``'unit'``
      (``c = 1``) or a positive number. (Not the adapter's LoRA scale
      ``s``; ``scale`` is its deprecated spelling.)
    stable_gamma: γ of the stable scale.
    key: PRNG key or seed for ``direction='random'``.

  Returns:
    A dict mapping each adapter's path to the first 2r singular values of
    its averaged gradient.

  Raises:
    ValueError: no linear adapter, ``2r`` larger than a layer's smaller
      dimension, or ``batches`` yields nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flora_jax import nnx as lora
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> lora.add_lora(model, 'layers/0', rank=2, rngs=nnx.Rngs(1))
    ('layers/0',)
    >>> def loss_fn(model, batch):
    ...   return jnp.mean((model(batch) - 1.0) ** 2)
    >>> spectra = lora.lora_ga_init(model, loss_fn, [jnp.ones((4, 8))])
    >>> spectra['layers/0'].shape
    (4,)

  References:
    Wang, Yu, Li, 2024, https://arxiv.org/abs/2407.05000
  """
  validation.check_choice('direction', direction, Direction)
  if isinstance(factor_scale, str):
    validation.check_choice('factor_scale', factor_scale, FactorScale)
  else:
    validation.check_positive_number('factor_scale', factor_scale)
  validation.check_positive_number('stable_gamma', stable_gamma)
  validation.check_key('key', key)
  adapters = _linear_adapters(model)
  gradients = _mean_kernel_gradients(model, loss_fn, batches, adapters)
  key = keys.as_prng_key(key)
  spectra = {}
  for index, (path, adapter) in enumerate(adapters):
    grad = gradients[path + _KERNEL]
    c = _factor_scale(factor_scale, grad.shape[1], stable_gamma)
    spectrum = _initialise(
        adapter, grad, direction, c, jax.random.fold_in(key, index)
    )
    spectra[tree_util.path_string(path)] = spectrum
  return spectra


def _linear_adapters(model: nnx.Module) -> list[tuple[Any, ScaledLoRA]]:
  """The model's `ScaledLoRA` adapters, checked for LoRA-GA."""
  adapters = [
      (path, a) for path, a in adapters_of(model, 'lora_ga_init')
      if isinstance(a, ScaledLoRA)
  ]
  if not adapters:
    raise ValueError('lora_ga_init: the model has no linear LoRA adapters.')
  for path, adapter in adapters:
    rank = adapter.lora_a.shape[1]
    if 2 * rank > min(adapter.base_weight.shape):
      raise ValueError(
          f'lora_ga_init: layer {tree_util.path_string(path)} of shape'
          f' {adapter.base_weight.shape} cannot supply 2r = {2 * rank}'
          ' singular vectors; lower the rank.'
      )
  if any(a.merged for _, a in adapters):
    raise ValueError('lora_ga_init: unmerge the adapters first.')
  return adapters


class _KernelsOf(NamedTuple):
  """A hashable NNX filter: the variables at the given paths."""

  paths: frozenset

  def __call__(self, path, _) -> bool:
    return tuple(path) in self.paths


def _mean_kernel_gradients(model, loss_fn, batches, adapters):
  """``{kernel path: mean gradient}`` over ``batches``, streamed."""
  is_target = _KernelsOf(frozenset(path + _KERNEL for path, _ in adapters))
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
  return {path: v[...] / count for path, v in nnx.to_flat_state(total)}


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


def _factor_scale(factor_scale, d_out: int, stable_gamma: float) -> float:
  if factor_scale == 'stable':
    return d_out**0.25 / math.sqrt(stable_gamma)
  if factor_scale == 'unit':
    return 1.0
  return float(factor_scale)


def _initialise(adapter: ScaledLoRA, grad, direction, c, key) -> jax.Array:
  """Sets one adapter from ``grad``; returns the first 2r singular values."""
  u, s, vt = jnp.linalg.svd(grad, full_matrices=False)
  rank = adapter.lora_a.shape[1]
  a_idx, b_idx = _singular_indices(direction, rank, key)
  adapter.lora_a[...] = (c * u[:, a_idx]).astype(adapter.lora_a[...].dtype)
  adapter.lora_b[...] = (c * vt[b_idx, :]).astype(adapter.lora_b[...].dtype)
  add_to(adapter.base_weight, -adapter.delta())
  adapter.initial_a = LoRAInitialFactor(adapter.lora_a[...])
  adapter.initial_b = LoRAInitialFactor(adapter.lora_b[...])
  return s[: 2 * rank]


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
