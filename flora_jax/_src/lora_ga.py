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
from flora_jax._src.lora import scaled_product

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
  4. ``W <- W + s A_old B_old - s A B``, so the model's output is
     unchanged (``A_old B_old``, the adapter's term before the call, is
     zero for a new adapter: ``W <- W - s A B``), and the initial factors
     are kept (`LoRAInitialFactor`) for `lora_delta`.

  Everything is computed before anything is written: if a batch's gradient
  is NaN or infinite, or the factors would be, the call raises and the
  model is left bitwise as it was.

  Called again, or on trained adapters, the output is still unchanged and
  `lora_delta` still exports relative to the ORIGINAL weights ``W0``: with
  ``W0 = W + s P0`` before the call (``P0 = A0 B0``, or zero), the
  kept product becomes ``P0 - A_old B_old + A B``. Its factors are the
  concatenated ones, terms that are exactly zero left out: a new adapter's
  (``B = 0``), and ``P0 - A_old B_old`` when the adapter is as the last
  call left it. So the first call and calls in a row keep rank ``r``; a
  call after training adds ``2r``.

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
      dimension, merged adapters (`unmerge_lora` first), ``batches``
      yields nothing, or a gradient (the first bad batch and its adapters
      are named) or a new factor or base weight is NaN or infinite. The
      model is then unchanged.

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
  gradients, rest = _mean_kernel_gradients(model, loss_fn, batches, adapters)
  key = keys.as_prng_key(key)
  plans, spectra = {}, {}
  for index, (path, adapter) in enumerate(adapters):
    grad = gradients.pop(path + _KERNEL)  # freed once used
    c = _factor_scale(factor_scale, grad.shape[1], stable_gamma)
    name = tree_util.path_string(path)
    plans[name], spectra[name] = _plan(
        adapter, grad, direction, c, jax.random.fold_in(key, index)
    )
  _check_finite_plans(plans)
  # Nothing was written so far: a call that raised left the model as it was.
  nnx.update(model, rest)  # RNG streams etc. as the loss advanced them
  for path, adapter in adapters:
    _write(adapter, plans[tree_util.path_string(path)])
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
  merged = [tree_util.path_string(p) for p, a in adapters if a.merged]
  if merged:
    # The gradient would miss the adapters' own term, and a new offset of
    # a merged kernel would be lost at unmerge_lora.
    raise ValueError(
        f'lora_ga_init: the adapters {", ".join(merged)} are merged; call'
        ' unmerge_lora first.'
    )
  return adapters


class _KernelsOf(NamedTuple):
  """A hashable NNX filter: the variables at the given paths."""

  paths: frozenset

  def __call__(self, path, _) -> bool:
    return tuple(path) in self.paths


def _mean_kernel_gradients(model, loss_fn, batches, adapters):
  """``{kernel path: mean gradient}`` over ``batches``, streamed, and the
  model's other state as the loss left it. Raises if a gradient is not
  finite; the model is not written."""
  is_target = _KernelsOf(frozenset(path + _KERNEL for path, _ in adapters))
  graphdef, targets, rest = nnx.split(model, is_target, ...)
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), targets)
  finite = []  # per batch, one flag per kernel: read once, at the end
  for batch in batches:
    total, rest, batch_finite = _accumulate_gradient(
        total, targets, rest, batch, graphdef, is_target, loss_fn
    )
    finite.append(batch_finite)
  if not finite:
    raise ValueError('lora_ga_init: batches yielded no batch.')
  flat = nnx.to_flat_state(total)
  _check_finite_batches(np.asarray(jnp.stack(finite)),
                        [path[: -len(_KERNEL)] for path, _ in flat])
  return {path: v[...] / len(finite) for path, v in flat}, rest


@functools.partial(jax.jit, donate_argnums=0, static_argnums=(4, 5, 6))
def _accumulate_gradient(total, targets, rest, batch, graphdef, is_target,
                         loss_fn):
  """``total + ∂loss/∂targets``; ``total`` is donated: one buffer per weight.

  Only ``targets`` are differentiated. Returns the new total, ``rest``
  as the loss left it (advanced RNG streams, batch statistics) and whether
  each target's gradient is finite, in `nnx.to_flat_state` order.
  """

  def loss_of(targets):
    # New Variables, made in this trace: the loss may advance RNG counts
    # (dropout), which NNX refuses on Variables made outside it.
    model = nnx.merge(graphdef, targets, rest, copy=True)
    loss = loss_fn(model, batch)
    return loss, nnx.split(model, is_target, ...)[2]

  grads, rest = jax.grad(loss_of, has_aux=True)(targets)
  total = jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads)
  finite = jnp.stack([
      jnp.all(jnp.isfinite(g[...])) for _, g in nnx.to_flat_state(grads)
  ])
  return total, rest, finite


def _check_finite_batches(finite: np.ndarray, paths) -> None:
  """Raises naming the first batch whose gradient is not finite.

  Args:
    finite: ``(batches, kernels)`` bools.
    paths: the adapters' paths, one per kernel.
  """
  bad = np.flatnonzero(~finite.all(axis=1))
  if bad.size:
    where = [tree_util.path_string(p)
             for p, ok in zip(paths, finite[bad[0]], strict=True) if not ok]
    raise ValueError(
        f'lora_ga_init: the gradient of batch {bad[0]} (counting from 0;'
        f' {bad.size} of {len(finite)} batches are bad) is NaN or infinite'
        f' at the adapters {", ".join(where)}: check the loss on that'
        ' batch. The model was left unchanged.'
    )


def _factor_scale(factor_scale, d_out: int, stable_gamma: float) -> float:
  if factor_scale == 'stable':
    return d_out**0.25 / math.sqrt(stable_gamma)
  if factor_scale == 'unit':
    return 1.0
  return float(factor_scale)


class _Plan(NamedTuple):
  """One adapter's new values, all computed before any is written.

  The new kernel is not kept (all of them would double the adapted
  weights in memory), only whether it is finite: `_write` computes it
  again.
  """

  lora_a: jax.Array
  lora_b: jax.Array
  initial_a: jax.Array
  initial_b: jax.Array
  finite: jax.Array  # a bool scalar: all of it, the new kernel too


def _plan(adapter: ScaledLoRA, grad, direction, c, key):
  """One adapter's `_Plan` from ``grad``, and the first 2r singular values."""
  u, s, vt = jnp.linalg.svd(grad, full_matrices=False)
  rank = adapter.lora_a.shape[1]
  a_idx, b_idx = _singular_indices(direction, rank, key)
  a = (c * u[:, a_idx]).astype(adapter.lora_a[...].dtype)
  b = (c * vt[b_idx, :]).astype(adapter.lora_b[...].dtype)
  initial_a, initial_b = _initial_factors(adapter, a, b)
  finite = jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x))
      for x in (a, b, initial_a, initial_b, _new_kernel(adapter, a, b))
  ]))
  return _Plan(a, b, initial_a, initial_b, finite), s[: 2 * rank]


def _new_kernel(adapter: ScaledLoRA, a, b) -> jax.Array:
  """``W + s A_old B_old - s A B``: the same function with the new factors.

  The adapter's current term (zero for a new adapter) goes into the base,
  the new one comes out of it.
  """
  weight = adapter.base_weight[...]
  kernel = (jnp.asarray(weight, jnp.float32) + adapter.delta()
            - scaled_product(adapter.scale, a, b))
  return kernel.astype(weight.dtype)


def _initial_factors(adapter: ScaledLoRA, a, b):
  """Factors of ``P0 - A_old B_old + A B``, exactly zero terms left out.

  ``W0 = W + s P0`` before the call and ``W0 = W' + s P0'`` after it
  (`_plan`), so ``P0' = P0 - A_old B_old + A B``.
  """
  old_a, old_b = adapter.lora_a[...], adapter.lora_b[...]
  if hasattr(adapter, 'initial_a'):
    a0, b0 = adapter.initial_a[...], adapter.initial_b[...]
    rank = old_a.shape[1]
    if (jnp.array_equal(a0[:, -rank:], old_a)
        and jnp.array_equal(b0[-rank:], old_b)):
      # As the last call left it: its A B cancels the adapter's term.
      terms = [(a0[:, :-rank], b0[:-rank])]
    else:
      terms = [(a0, b0), (-old_a, old_b)]
  elif jnp.any(old_a) and jnp.any(old_b):
    terms = [(-old_a, old_b)]  # a trained (or custom-initialised) adapter
  else:
    terms = []  # a new adapter: B = 0
  terms.append((a, b))
  return (jnp.concatenate([t[0] for t in terms], axis=1),
          jnp.concatenate([t[1] for t in terms], axis=0))


def _check_finite_plans(plans: dict[str, _Plan]) -> None:
  """Raises naming the adapters whose new values are not all finite."""
  finite = np.asarray(jnp.stack([plan.finite for plan in plans.values()]))
  bad = [name for name, ok in zip(plans, finite, strict=True) if not ok]
  if bad:
    raise ValueError(
        f'lora_ga_init: the new factors or base weights of the adapters'
        f' {", ".join(bad)} are NaN or infinite (the averaged gradient'
        ' overflowed, or the weights were not finite). The model was left'
        ' unchanged.'
    )


def _write(adapter: ScaledLoRA, plan: _Plan) -> None:
  adapter.base_weight[...] = _new_kernel(adapter, plan.lora_a, plan.lora_b)
  adapter.lora_a[...] = plan.lora_a  # after: the kernel reads the old ones
  adapter.lora_b[...] = plan.lora_b
  adapter.initial_a = LoRAInitialFactor(plan.initial_a)
  adapter.initial_b = LoRAInitialFactor(plan.initial_b)


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
