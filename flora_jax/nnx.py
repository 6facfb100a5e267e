"""LoRA, LoRA-GA, LoRA+ and fused train steps for Flax NNX (needs flax).

* `add_lora` puts a scaled LoRA adapter (`ScaledLoRA`, `ScaledLoRAEmbed`) on
  the matching `flax.nnx.Linear` / `flax.nnx.Embed` layers of a model;
  `merge_lora` / `unmerge_lora` fold it into the base weights and back
  (what was merged is state: `LoRAMergeRecord`).
* `lora_ga_init` initialises the adapters from the full gradient's SVD.
* `lora_delta` / `apply_lora_delta` export the adapters as low-rank deltas
  relative to the original weights.
* `lora_plus_labels` / `is_bias_or_norm`: the LoRA+ parameter groups used by
  the `flora_jax.lora_plus` optimizer.
* `fused_train_step`: `flora_jax.fused_train_step` for a model whose blocks
  are stacked with `flax.nnx.vmap` and its `nnx.Optimizer`.

Import it under another name than flax's ``nnx``, e.g.
``from flora_jax import nnx as lora``.
"""

try:
  import flax.nnx as _flax_nnx  # noqa: F401
except ImportError as _error:  # pragma: no cover - depends on the install
  raise ImportError(
      'flora_jax.nnx needs flax: pip install "flora_jax[nnx]".'
  ) from _error

from flora_jax._src.fused_nnx import fused_train_step
from flora_jax._src.lora import add_lora
from flora_jax._src.lora import apply_lora_delta
from flora_jax._src.lora import lora_delta
from flora_jax._src.lora import lora_scale
from flora_jax._src.lora import LoRADelta
from flora_jax._src.lora import LoRAInitialFactor
from flora_jax._src.lora import LoRAMergeRecord
from flora_jax._src.lora import merge_lora
from flora_jax._src.lora import ScaledLoRA
from flora_jax._src.lora import ScaledLoRAEmbed
from flora_jax._src.lora import unmerge_lora
from flora_jax._src.lora_ga import lora_ga_init
from flora_jax._src.lora_plus import is_bias_or_norm
from flora_jax._src.lora_plus import lora_plus_labels

__all__ = (
    'LoRADelta',
    'LoRAInitialFactor',
    'LoRAMergeRecord',
    'ScaledLoRA',
    'ScaledLoRAEmbed',
    'add_lora',
    'apply_lora_delta',
    'fused_train_step',
    'is_bias_or_norm',
    'lora_delta',
    'lora_ga_init',
    'lora_plus_labels',
    'lora_scale',
    'merge_lora',
    'unmerge_lora',
)
