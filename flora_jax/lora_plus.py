"""LoRA+: the B factors of LoRA adapters learn λ times faster than the A factors."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any, Optional

import jax
import optax

from flora_jax import projection

PathPredicate = Callable[[str, Any], bool]

# Groups of the official LoRA+ optimizer, by label.
A_FACTORS = 'lora_a'  # A factors and other trainable >= 2-D leaves: lr
B_FACTORS = 'lora_b'  # B factors and trainable 1-D leaves: ratio * lr
B_NO_DECAY = 'lora_b_no_decay'  # trainable biases and norm parameters
EMBEDDING = 'lora_embedding'  # factors of embedding adapters: own lr
FROZEN = 'frozen'  # everything else: zero updates

_A_NAMES = ('lora_a',)
_B_NAMES = ('lora_b',)
_EMBEDDING_NAMES = ('lora_embedding_a', 'lora_embedding_b')


def is_bias_or_norm(path: str, leaf: Any) -> bool:
  """Biases and normalisation parameters: no weight decay in LoRA+.

  Flax names them ``bias`` (every layer) and ``scale`` (`nnx.LayerNorm`,
  `nnx.RMSNorm`, `nnx.GroupNorm`, `nnx.BatchNorm`).
  """
  del leaf
  return path.rsplit('/', 1)[-1] in ('bias', 'scale')


def lora_plus_labels(
    params: Any,
    *,
    trainable: Optional[PathPredicate] = None,
    no_decay: PathPredicate = is_bias_or_norm,
) -> Any:
  """Labels every leaf with its LoRA+ group, from the parameter paths.

  * ``lora_a`` leaves (`nnx.LoRA`, `flora_jax.add_lora`) -> ``'lora_a'``;
  * ``lora_b`` leaves -> ``'lora_b'``;
  * ``lora_embedding_a`` / ``lora_embedding_b`` -> ``'lora_embedding'``;
  * other leaves for which ``trainable(path, leaf)`` holds: 1-D ones ->
    ``'lora_b'`` (or ``'lora_b_no_decay'`` when ``no_decay`` holds),
    higher-dimensional ones -> ``'lora_a'``;
  * everything else (the frozen base weights) -> ``'frozen'``.

  Args:
    params: the parameter tree (arrays or NNX Variables).
    trainable: ``(path, leaf) -> bool`` for non-LoRA leaves that are trained
      too (a classifier head, say); paths are joined by ``'/'``. None: only
      the LoRA factors are trained.
    no_decay: ``(path, leaf) -> bool`` for the trainable 1-D leaves that get
      no weight decay (default: `is_bias_or_norm`).

  Returns:
    A tree of group names with the structure of ``params`` (Variables
    unwrapped).

  Raises:
    ValueError: ``params`` holds no LoRA factor.
  """
  params = projection.unwrap_variables(params)

  def label(key_path, leaf):
    path = projection.path_string(key_path)
    name = path.rsplit('/', 1)[-1]
    if name in _A_NAMES:
      return A_FACTORS
    if name in _B_NAMES:
      return B_FACTORS
    if name in _EMBEDDING_NAMES:
      return EMBEDDING
    if trainable is None or not trainable(path, leaf):
      return FROZEN
    if leaf.ndim >= 2:
      return A_FACTORS
    return B_NO_DECAY if no_decay(path, leaf) else B_FACTORS

  labels = jax.tree.map_with_path(label, params)
  names = _A_NAMES + _B_NAMES + _EMBEDDING_NAMES
  if not any(
      projection.path_string(key_path).rsplit('/', 1)[-1] in names
      for key_path, _ in jax.tree.leaves_with_path(params)
  ):
    raise ValueError(
        f'lora_plus: the parameters hold no LoRA factor (no leaf named one'
        f' of {names}); add adapters with flora_jax.add_lora or nnx.LoRA.'
    )
  return labels


def _times(ratio: float, learning_rate: optax.ScalarOrSchedule):
  if callable(learning_rate):
    return lambda count: ratio * learning_rate(count)
  return ratio * learning_rate


def _accepts_weight_decay(optimizer: Callable[..., Any]) -> bool:
  try:
    return 'weight_decay' in inspect.signature(optimizer).parameters
  except (TypeError, ValueError):
    return True


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    *,
    embedding_learning_rate: optax.ScalarOrSchedule = 1e-6,
    weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = None,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
    trainable: Optional[PathPredicate] = None,
    no_decay: PathPredicate = is_bias_or_norm,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformation:
  r"""LoRA+: one optimizer, a learning rate λ times larger for the B factors.

  The official grouping (`lora_plus_labels`), each group its own copy of
  ``optimizer``:

  ============================  =========================  ============
  group                         learning rate              weight decay
  ============================  =========================  ============
  A factors (``lora_a``)        ``lr``                     yes
  B factors (``lora_b``),       ``λ · lr``                 yes
  trainable 1-D leaves
  trainable biases and norms    ``λ · lr``                 no
  embedding adapter factors     ``embedding_learning_rate``  yes
  everything else               frozen (zero update)
  ============================  =========================  ============

  after one global gradient clip over the trainable leaves. A schedule is
  multiplied by λ for the B groups, so the ratio holds at every step. With
  ``λ = 1`` and no embedding adapters this is ``optimizer`` itself.

  Why λ defaults to 16: B is the output-side factor and starts at zero; in
  the infinite-width analysis of the paper, A and B need learning rates of
  different orders, and λ ≈ 16 (2^4) was the best starting point across its
  experiments (2^3 to 2^4 for the roberta and GPT-2 tasks). It is model- and
  task-dependent: the official code makes the user choose it.

  Works with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and with
  ``wrt=nnx.Param`` (the base weights then get zero updates).

  Args:
    learning_rate: the A factors' learning rate, a scalar or schedule.
    ratio: λ = lr_B / lr_A (> 0).
    embedding_learning_rate: for embedding adapters (official: 1e-6).
    weight_decay: passed to ``optimizer`` as ``weight_decay`` (0 for the
      no-decay group).
    max_grad_norm: clip the global norm of the trainable gradients first;
      None for no clipping.
    optimizer: a factory ``optimizer(learning_rate, **kwargs)`` such as
      `optax.adamw` (default), `optax.lion`, `optax.adam`, `optax.sgd`; it
      must accept ``weight_decay`` when ``weight_decay`` is not 0.
    trainable, no_decay: see `lora_plus_labels`.
    **optimizer_kwargs: more arguments of ``optimizer`` (``b1``, ``eps``...).

  Returns:
    An `optax.GradientTransformation` built on `optax.partition`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.lora_plus(2e-4, ratio=16, weight_decay=0.01,
    ...                          max_grad_norm=1.0)

  References:
    Hayou, Ghosh, Yu, 2024, https://arxiv.org/abs/2402.12354
  """
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (
      ratio > 0
  ):
    raise ValueError(f'ratio must be a positive number, got {ratio!r}.')
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(
        f'max_grad_norm must be None or positive, got {max_grad_norm!r}.'
    )
  decays = weight_decay is not None and weight_decay != 0
  if decays and not _accepts_weight_decay(optimizer):
    raise TypeError(
        f'optimizer {getattr(optimizer, "__name__", optimizer)!r} takes no'
        ' weight_decay argument; use one that does (optax.adamw) or'
        ' weight_decay=0.'
    )

  def make(lr, decay):
    kwargs = dict(optimizer_kwargs)
    if decays:
      kwargs['weight_decay'] = weight_decay if decay else 0.0
    return optimizer(lr, **kwargs)

  labels = functools.partial(
      lora_plus_labels, trainable=trainable, no_decay=no_decay
  )
  groups = optax.partition(
      {
          A_FACTORS: make(learning_rate, True),
          B_FACTORS: make(_times(ratio, learning_rate), True),
          B_NO_DECAY: make(_times(ratio, learning_rate), False),
          EMBEDDING: make(embedding_learning_rate, True),
          FROZEN: optax.set_to_zero(),
      },
      labels,
  )
  if max_grad_norm is None:
    return groups
  trained = lambda params: jax.tree.map(lambda g: g != FROZEN, labels(params))
  return optax.chain(
      optax.masked(optax.clip_by_global_norm(max_grad_norm), trained), groups
  )
