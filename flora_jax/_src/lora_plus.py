"""LoRA+: the B factors of LoRA adapters learn λ times faster than the A."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from flora_jax._src import tree_util
from flora_jax._src import validation

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

  Args:
    path: the parameter's path joined by ``'/'``.
    leaf: the parameter (unused).

  Returns:
    Whether the path ends in ``bias`` or ``scale``.

  Example:
    >>> from flora_jax import nnx as lora
    >>> lora.is_bias_or_norm('blocks/0/norm/scale', None)
    True
  """
  del leaf
  return path.rsplit('/', 1)[-1] in ('bias', 'scale')


def lora_plus_labels(
    params: Any,
    *,
    trainable: PathPredicate | None = None,
    no_decay: PathPredicate = is_bias_or_norm,
) -> Any:
  """Labels every leaf with its LoRA+ group, from the parameter paths.

  * ``lora_a`` leaves (`nnx.LoRA`, `flora_jax.nnx.add_lora`) -> ``'lora_a'``;
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

  Example:
    >>> import jax.numpy as jnp
    >>> from flora_jax import nnx as lora
    >>> params = {'q': {'kernel': jnp.zeros((8, 8)),
    ...                 'lora_a': jnp.zeros((8, 2)),
    ...                 'lora_b': jnp.zeros((2, 8))}}
    >>> lora.lora_plus_labels(params)
    {'q': {'kernel': 'frozen', 'lora_a': 'lora_a', 'lora_b': 'lora_b'}}
  """
  params = tree_util.unwrap_variables(params)

  def label(key_path, leaf):
    path = tree_util.path_string(key_path)
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
      tree_util.path_string(key_path).rsplit('/', 1)[-1] in names
      for key_path, _ in jax.tree.leaves_with_path(params)
  ):
    raise ValueError(
        f'lora_plus: the parameters hold no LoRA factor (no leaf named one'
        f' of {names}); add adapters with flora_jax.nnx.add_lora or nnx.LoRA.'
    )
  return labels


def _times(ratio: float, learning_rate: optax.ScalarOrSchedule):
  if ratio == 1:  # the very same rate: λ = 1 is then the optimizer itself
    return learning_rate
  if callable(learning_rate):
    return lambda count: ratio * learning_rate(count)
  return ratio * learning_rate


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    *,
    embedding_learning_rate: optax.ScalarOrSchedule = 1e-6,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    scale_by: optax.GradientTransformation | None = None,
    trainable: PathPredicate | None = None,
    no_decay: PathPredicate = is_bias_or_norm,
) -> optax.GradientTransformation:
  r"""LoRA+ AdamW: the B factors get λ times the learning rate of the A factors.

  The official grouping (`lora_plus_labels`):

  ===========================  ===========================  ============
  group                        learning rate                weight decay
  ===========================  ===========================  ============
  A factors (``lora_a``)       ``lr``                       yes
  B factors (``lora_b``) and   ``λ · lr``                   yes
  other trainable 1-D leaves
  trainable biases and norms   ``λ · lr``                   no
  embedding adapter factors    ``embedding_learning_rate``  yes
  everything else              frozen (zero update)
  ===========================  ===========================  ============

  One optimizer runs over all the trainable leaves, after one global
  gradient clip over them: ``u = -lr_group (scale_by(g) + wd p)``, AdamW by
  default, with `optax.partition` giving each group its learning rate. A
  schedule is multiplied by λ for the B groups, so the ratio holds at every
  step. With ``λ = 1`` and no embedding adapters this is `optax.adamw` with
  a decay mask, bit for bit.

  Why λ defaults to 16: B is the output-side factor and starts at zero; in
  the paper's infinite-width analysis A and B need learning rates of
  different orders, and λ = 2^4 was the recommended starting point from its
  experiments. The best value is model- and task-dependent (the official
  code makes the user choose it): tune it.

  Works with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and with
  ``wrt=nnx.Param`` (the base weights then get zero updates and no state).

  Args:
    learning_rate: the A factors' learning rate, a scalar or schedule.
    ratio: λ = lr_B / lr_A (> 0).
    embedding_learning_rate: for embedding adapters (official: 1e-6).
    weight_decay: decoupled weight decay (AdamW-style, scaled by the group's
      learning rate); none on biases and norms.
    max_grad_norm: clip the global norm of the trainable gradients first;
      None for no clipping.
    b1: Adam's β1, used when ``scale_by`` is None.
    b2: Adam's β2, used when ``scale_by`` is None.
    eps: Adam's ε, used when ``scale_by`` is None.
    scale_by: the optimizer's direction, any optax transform (e.g.
      `optax.scale_by_lion`, `flora_jax.scale_by_adam_hf`,
      `optax.identity` for SGD); default `optax.scale_by_adam`.
    trainable: which non-LoRA leaves are trained too, see
      `flora_jax.nnx.lora_plus_labels`.
    no_decay: which trainable 1-D leaves get no weight decay, see
      `flora_jax.nnx.lora_plus_labels`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import flora_jax
    >>> tx = flora_jax.lora_plus(2e-4, ratio=16, weight_decay=0.01,
    ...                          max_grad_norm=1.0)

  References:
    Hayou, Ghosh, Yu, 2024, https://arxiv.org/abs/2402.12354
  """
  validation.check_learning_rate('learning_rate', learning_rate)
  validation.check_learning_rate('embedding_learning_rate',
                                 embedding_learning_rate)
  validation.check_positive_number('ratio', ratio)
  validation.check_positive_number('max_grad_norm', max_grad_norm,
                                   optional=True)
  validation.check_finite_at_least('weight_decay', weight_decay, 0.0)
  if scale_by is None:
    scale_by = optax.scale_by_adam(b1, b2, eps)
  validation.check_transformation('scale_by', scale_by)

  labels = functools.partial(
      lora_plus_labels, trainable=trainable, no_decay=no_decay
  )
  def in_groups(*groups):
    return lambda params: jax.tree.map(
        lambda label: label in groups, labels(params)
    )
  trained = in_groups(A_FACTORS, B_FACTORS, B_NO_DECAY, EMBEDDING)
  chain = []
  if max_grad_norm is not None:
    chain.append(optax.masked(optax.clip_by_global_norm(max_grad_norm),
                              trained))
  chain.append(optax.masked(scale_by, trained))
  if validation.may_be_nonzero(weight_decay):
    decayed = in_groups(A_FACTORS, B_FACTORS, EMBEDDING)
    chain.append(optax.masked(optax.add_decayed_weights(weight_decay),
                              decayed))
  b_rate = optax.scale_by_learning_rate(_times(ratio, learning_rate))
  chain.append(optax.partition(
      {
          A_FACTORS: optax.scale_by_learning_rate(learning_rate),
          B_FACTORS: b_rate,
          B_NO_DECAY: b_rate,
          EMBEDDING: optax.scale_by_learning_rate(embedding_learning_rate),
          FROZEN: optax.set_to_zero(),
      },
      labels,
  ))
  return optax.chain(*chain)
