"""Adam as HF-transformers' ``AdamW`` computes it (GaLore's and Fira's base).

The reference GaLore and Fira optimizers subclass HF-transformers' AdamW,
which differs from `optax.adamw` in two places that matter for parity: ε is
added to ``sqrt(v)`` before the bias correction, and the decoupled weight
decay multiplies the already updated weights.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import compat
from flora_jax._src import tree_util
from flora_jax._src import validation


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    correct_bias: bool = True,
) -> optax.GradientTransformation:
  r"""Adam as HF-transformers' ``AdamW`` computes it (GaLore's, Fira's base).

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = c_t \frac{m_t}{\sqrt{v_t} + \epsilon}, \quad
    c_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}

  ``ε`` is added before the bias correction, unlike `optax.scale_by_adam`
  (``m̂ / (sqrt(v̂) + ε)``); ``correct_bias=False`` drops ``c_t``.

  Args:
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: added to ``sqrt(v)``.
    correct_bias: multiply by ``c_t``.

  Returns:
    An `optax.GradientTransformation` whose state is `optax.ScaleByAdamState`.

  Example:
    >>> import optax, flora_jax
    >>> tx = optax.chain(flora_jax.scale_by_adam_hf(eps=1e-6),
    ...                  optax.scale_by_learning_rate(1e-3))

  References:
    Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101
  """
  validation.check_in_range('b1', b1, 0.0, 1.0)
  validation.check_in_range('b2', b2, 0.0, 1.0)
  validation.check_finite_at_least('eps', eps, 0.0)

  def init_fn(params):
    params = tree_util.unwrap_variables(params)
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = compat.safe_increment(state.count)
    factor = hf_bias_correction(b1, b2)(state.count) if correct_bias else 1.0
    new_updates = jax.tree.map(
        lambda m, v, u: (factor * m / (jnp.sqrt(v) + eps)).astype(u.dtype),
        mu,
        nu,
        updates,
    )
    return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def hf_bias_correction(b1, b2) -> optax.Schedule:
  """``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` as a function of the 0-based count.

  ``1 - b^t`` is computed as ``-expm1(t log b)`` with ``log b`` in double
  precision when ``b`` is a Python number: in float32, ``1 - 0.999^t``
  loses 5 significant digits for small t, which the reference (Python floats)
  does not.
  """

  def log(b):
    if isinstance(b, numbers.Real):
      return math.log(b) if float(b) > 0 else -math.inf
    return jnp.log(b)

  log1, log2 = log(b1), log(b2)

  def factor(count):
    # Cast before adding: count + 1 overflows int32 at optax's saturated
    # count 2**31 - 1, and a negative t gives inf / NaN.
    t = jnp.asarray(count).astype(jnp.float32) + 1
    return jnp.sqrt(-jnp.expm1(t * log2)) / -jnp.expm1(t * log1)

  return factor


def decay_after_update(
    learning_rate: optax.ScalarOrSchedule, weight_decay
) -> optax.GradientTransformation:
  """``W <- (W + Δ) (1 - lr wd)``: HF AdamW's decay of the updated weights."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'galore/fira with weight_decay needs params: call'
          ' tx.update(grads, state, params).'
      )
    lr = learning_rate
    if callable(learning_rate):
      lr = learning_rate(state.count)
    new_updates = jax.tree.map(
        lambda d, p: (d - lr * weight_decay * (p + d)).astype(d.dtype),
        updates,
        params,
    )
    return new_updates, optax.ScaleByScheduleState(
        count=compat.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)
