"""Stochastic rounding of low-precision parameters, as an optax transform.

Training with bfloat16 weights and round-to-nearest loses every update
smaller than half a unit in the last place of the weight (``2^-9`` of it in
bfloat16): late in training, most of them. Rounding ``p + u`` up or down at
random, with the probabilities that make the expected result exactly
``p + u``, keeps them on average (Gupta et al., "Deep Learning with Limited
Numerical Precision", ICML 2015; Zamirai et al., "Revisiting BFloat16
Training", 2020).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_jax._src import compat
from flora_jax._src import keys
from flora_jax._src import tree_util
from flora_jax._src import validation


class StochasticRoundingState(NamedTuple):
  """State of `stochastic_rounding`."""

  count: jax.Array  # int32[]: updates so far; update t draws with index t.
  key: jax.Array  # key[]: the base key of every draw.


def stochastic_rounding(
    key: keys.PRNGKeyLike = 0,
) -> optax.GradientTransformation:
  r"""Makes ``optax.apply_updates`` round low-precision parameters at random.

  The last transform of a chain. For a parameter ``p`` stored in a
  floating dtype narrower than float32 (bfloat16, float16) it replaces the
  update ``u`` by

  .. math::

    u' = \mathrm{SR}(p + u) - p, \qquad
    \mathrm{SR}(x) = \begin{cases} \lceil x \rceil & \text{with probability }
    (x - \lfloor x \rfloor) / (\lceil x \rceil - \lfloor x \rfloor) \\
    \lfloor x \rfloor & \text{otherwise} \end{cases}

  in float32, with ``⌊x⌋`` and ``⌈x⌉`` the neighbouring values of ``p``'s
  dtype, so ``E[SR(x)] = x``. Any ``apply_updates`` then computes
  ``p + u'`` in float32, where it is exactly ``SR(p + u)``, and casts it
  to ``p``'s dtype without rounding: `optax.apply_updates`,
  `flax.nnx.Optimizer` and `flora_jax.fused_train_step` all store the
  stochastically rounded parameter. Leaves in float32 or wider pass
  through. Draw ``t`` of a leaf is keyed by ``(key, its path, t)``, and
  each matrix of a stacked leaf (its leading axes) is drawn on its own, as
  the fused step needs: a run resumed from a checkpoint of the state
  rounds exactly as the uninterrupted one.

  The sum ``p + u`` is rounded as the compiled program computes it: XLA
  may keep a bfloat16 update's arithmetic in float32 (its
  ``allow_excess_precision``), so two different programs (say, the
  ordinary and the fused step) can round slightly different sums. The same
  program, resumed from the same state, rounds identically.

  Args:
    key: an int seed, a typed key or a raw uint32 key.

  Returns:
    An `optax.GradientTransformation` whose state is
    `StochasticRoundingState`; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, flora_jax
    >>> params = {'w': jnp.ones((4, 4), jnp.bfloat16)}
    >>> tx = optax.chain(optax.sgd(1e-3), flora_jax.stochastic_rounding(0))
    >>> grads = {'w': jnp.ones((4, 4), jnp.bfloat16)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)  # 1 - 1e-3, in bfloat16
    >>> sorted({float(x) for x in new['w'].ravel()})  # one or its neighbour
    [0.99609375, 1.0]

  References:
    Gupta et al., 2015, https://arxiv.org/abs/1502.02551;
    Zamirai et al., 2020, https://arxiv.org/abs/2010.06192
  """
  validation.check_key('key', key)

  def init_fn(params):
    del params
    return StochasticRoundingState(count=jnp.zeros([], jnp.int32),
                                   key=keys.as_prng_key(key))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('stochastic_rounding needs params in update(): it'
                       ' rounds p + u.')
    params = tree_util.unwrap_variables(params)
    validation.check_updates_match_params(updates, params)

    def leaf(key_path, u, p):
      dtype = jnp.result_type(p)
      if (not jnp.issubdtype(dtype, jnp.floating)
          or jnp.finfo(dtype).bits >= 32):
        return u
      path = jax.tree_util.keystr(key_path)
      p32 = jnp.asarray(p).astype(jnp.float32)
      rounded = round_stochastic(
          p32 + u.astype(jnp.float32), dtype,
          keys.projection_key(state.key, path, state.count))
      return rounded.astype(jnp.float32) - p32

    new_updates = jax.tree_util.tree_map_with_path(leaf, updates, params)
    return new_updates, StochasticRoundingState(
        count=compat.safe_increment(state.count), key=state.key)

  return optax.GradientTransformation(init_fn, update_fn)


def round_stochastic(x: jax.Array, dtype: jax.typing.DTypeLike,
                     key: jax.Array) -> jax.Array:
  """``x`` rounded to ``dtype``, up or down at random, unbiased.

  Each matrix of ``x`` (its last two axes; every leading axis is a stack)
  gets its own draw, from ``fold_in(key, s)`` for slice ``s``. Values that
  ``dtype`` represents exactly, infinities and NaN are returned as they are
  (cast).

  Args:
    x: float32 values.
    dtype: the narrower floating dtype to round to.
    key: a typed PRNG key.

  Returns:
    ``x`` in ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  # On magnitudes, the sign put back last: the neighbour of a magnitude is
  # one step of its bit pattern away. (Not `jnp.nextafter`: XLA computes a
  # bfloat16 nextafter in float32, which steps by float32's spacing.)
  size = abs(x)
  nearest = size.astype(dtype)
  near32 = nearest.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(nearest, _UINT[dtype.itemsize])
  step = jnp.where(size > near32, 1, -1).astype(bits.dtype)
  other = jax.lax.bitcast_convert_type(
      jnp.where(size == near32, bits, bits + step), dtype)
  gap = other.astype(jnp.float32) - near32
  # P(other) = distance from the nearest / gap; 0 where x is exact.
  share = jnp.where(gap != 0, (size - near32) / jnp.where(gap != 0, gap, 1),
                    0)
  lead = max(x.ndim - 2, 0)
  words = keys.per_slice(lambda k: jax.random.key_data(k).ravel(), key,
                         x.shape[:lead])
  uniform = keys.hashed_uniform(words.reshape(x.shape[:lead] + (1,) * (
      x.ndim - lead) + words.shape[-1:]), x.shape)
  rounded = jnp.where(uniform < share, other, nearest)
  return jnp.where(jnp.isnan(x), x.astype(dtype),
                   jnp.copysign(rounded, x.astype(dtype)))


_UINT = {1: jnp.uint8, 2: jnp.uint16}
