"""Measuring optimizer memory without allocating it.

`memory_report` shows, per parameter leaf, whether a transform compresses
it (and why not), with its state bytes next to `optax.adamw`'s;
`state_bytes` totals any state, real or from `jax.eval_shape`.
"""

from flora_jax._src.memory import LeafMemory
from flora_jax._src.memory import memory_report
from flora_jax._src.memory import MemoryReport
from flora_jax._src.memory import state_bytes
from flora_jax._src.projection import LowCompressionWarning
from flora_jax._src.projection import MIN_PROJECTED_FRACTION

__all__ = (
    'LeafMemory',
    'LowCompressionWarning',
    'MIN_PROJECTED_FRACTION',
    'MemoryReport',
    'memory_report',
    'state_bytes',
)
