"""flora_jax: memory-efficient training methods as composable optax transforms.

The top level holds the optimizers, the transforms they are built from,
their states, the projection settings and the sharding helpers. Primitives
for building new projecting methods are in `flora_jax.projections`, memory
measurement in `flora_jax.memory`, and the Flax NNX pieces (LoRA, LoRA-GA,
LoRA+ labels) in `flora_jax.nnx`, the only part that needs flax.
"""

import importlib as _importlib
import warnings as _warnings

from flora_jax import memory
from flora_jax import projections
from flora_jax._src.accumulation import FloraMultiSteps
from flora_jax._src.accumulation import FloraMultiStepsState
from flora_jax._src.adam_hf import scale_by_adam_hf
from flora_jax._src.alias import apollo
from flora_jax._src.alias import apollo_mini
from flora_jax._src.alias import fira
from flora_jax._src.alias import flora
from flora_jax._src.alias import galore
from flora_jax._src.fira import FiraResidual
from flora_jax._src.fira import limit_norm_growth
from flora_jax._src.fira import LimitNormGrowthState
from flora_jax._src.flora import flora_compress
from flora_jax._src.flora import FloraCompressState
from flora_jax._src.flora import FloraMomentumState
from flora_jax._src.flora import FloraStoredMomentumState
from flora_jax._src.flora import scale_by_flora_momentum
from flora_jax._src.fused import fused_train_step
from flora_jax._src.lora_plus import lora_plus
from flora_jax._src.memory import memory_report
from flora_jax._src.apollo import scale_by_apollo
from flora_jax._src.projection import DimensionNumbers
from flora_jax._src.projection import path_dimension_numbers
from flora_jax._src.projection import path_mask
from flora_jax._src.projection import ProjectionRule
from flora_jax._src.quantization import quantize_state
from flora_jax._src.quantization import QuantizedState
from flora_jax._src.rounding import stochastic_rounding
from flora_jax._src.rounding import StochasticRoundingState
from flora_jax._src.settings import adopt_settings
from flora_jax._src.sharding import apply_shardings
from flora_jax._src.sharding import state_partition_specs
from flora_jax._src.sharding import state_shardings
from flora_jax._src.subspace import GaLoreState
from flora_jax._src.subspace import scale_by_fira
from flora_jax._src.subspace import scale_by_galore

__version__ = '0.9.0'

__all__ = (
    'DimensionNumbers',
    'FiraResidual',
    'FloraCompressState',
    'FloraMomentumState',
    'FloraStoredMomentumState',
    'FloraMultiSteps',
    'FloraMultiStepsState',
    'GaLoreState',
    'LimitNormGrowthState',
    'ProjectionRule',
    'QuantizedState',
    'StochasticRoundingState',
    'adopt_settings',
    'apollo',
    'apollo_mini',
    'apply_shardings',
    'fira',
    'flora',
    'flora_compress',
    'fused_train_step',
    'galore',
    'limit_norm_growth',
    'lora_plus',
    'memory',
    'memory_report',
    'path_dimension_numbers',
    'path_mask',
    'projections',
    'quantize_state',
    'scale_by_adam_hf',
    'scale_by_apollo',
    'scale_by_fira',
    'scale_by_flora_momentum',
    'scale_by_galore',
    'state_partition_specs',
    'state_shardings',
    'stochastic_rounding',
)

# Names of 0.1 that moved, kept for one release: old name -> (module, name).
_MOVED = {
    'LeafPlan': ('flora_jax.projections', 'LeafPlan'),
    'canonicalize_signs': ('flora_jax.projections', 'canonicalize_signs'),
    'change_basis': ('flora_jax.projections', 'change_basis'),
    'gaussian_projector': ('flora_jax.projections', 'gaussian_projector'),
    'project_down': ('flora_jax.projections', 'project_down'),
    'project_up': ('flora_jax.projections', 'project_up'),
    'randomized_projector': ('flora_jax.projections', 'randomized_projector'),
    'svd_projector': ('flora_jax.projections', 'svd_projector'),
    'state_bytes': ('flora_jax.memory', 'state_bytes'),
    'LoRADelta': ('flora_jax.nnx', 'LoRADelta'),
    'LoRAInitialFactor': ('flora_jax.nnx', 'LoRAInitialFactor'),
    'ScaledLoRA': ('flora_jax.nnx', 'ScaledLoRA'),
    'ScaledLoRAEmbed': ('flora_jax.nnx', 'ScaledLoRAEmbed'),
    'add_lora': ('flora_jax.nnx', 'add_lora'),
    'apply_lora_delta': ('flora_jax.nnx', 'apply_lora_delta'),
    'is_bias_or_norm': ('flora_jax.nnx', 'is_bias_or_norm'),
    'lora_delta': ('flora_jax.nnx', 'lora_delta'),
    'lora_ga_init': ('flora_jax.nnx', 'lora_ga_init'),
    'lora_plus_labels': ('flora_jax.nnx', 'lora_plus_labels'),
    'lora_scale': ('flora_jax.nnx', 'lora_scale'),
    'merge_lora': ('flora_jax.nnx', 'merge_lora'),
    'unmerge_lora': ('flora_jax.nnx', 'unmerge_lora'),
}


def __getattr__(name: str):
  if name == 'nnx':  # imported on first use: it needs flax
    return _importlib.import_module('flora_jax.nnx')
  if name in _MOVED:
    module, attribute = _MOVED[name]
    _warnings.warn(
        f'flora_jax.{name} is deprecated: use {module}.{attribute}.',
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_importlib.import_module(module), attribute)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  # The supported names only. `nnx` is not in __all__: a star import must
  # not need flax.
  return sorted(__all__ + ('nnx',))
