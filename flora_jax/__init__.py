"""flora_jax: memory-efficient training methods as composable optax transforms."""

from flora_jax.accumulation import FloraMultiSteps
from flora_jax.accumulation import FloraMultiStepsState
from flora_jax.flora import flora
from flora_jax.flora import flora_compress
from flora_jax.flora import FloraCompressState
from flora_jax.flora import FloraMomentumState
from flora_jax.flora import scale_by_flora_momentum
from flora_jax.galore import fira
from flora_jax.galore import galore
from flora_jax.galore import GaLoreState
from flora_jax.galore import limit_norm_growth
from flora_jax.galore import LimitNormGrowthState
from flora_jax.galore import scale_by_adam_hf
from flora_jax.galore import scale_by_fira
from flora_jax.galore import scale_by_galore
from flora_jax.lora import add_lora
from flora_jax.lora import apply_lora_delta
from flora_jax.lora import lora_delta
from flora_jax.lora import lora_ga_init
from flora_jax.lora import lora_scale
from flora_jax.lora import LoRADelta
from flora_jax.lora import LoRAInitialFactor
from flora_jax.lora import merge_lora
from flora_jax.lora import ScaledLoRA
from flora_jax.lora import ScaledLoRAEmbed
from flora_jax.lora import unmerge_lora
from flora_jax.lora_plus import is_bias_or_norm
from flora_jax.lora_plus import lora_plus
from flora_jax.lora_plus import lora_plus_labels
from flora_jax.projection import canonicalize_signs
from flora_jax.projection import change_basis
from flora_jax.projection import gaussian_projector
from flora_jax.projection import LeafPlan
from flora_jax.projection import path_mask
from flora_jax.projection import project_down
from flora_jax.projection import project_up
from flora_jax.projection import ProjectionRule
from flora_jax.projection import randomized_projector
from flora_jax.projection import state_bytes
from flora_jax.projection import svd_projector
from flora_jax.sharding import apply_shardings
from flora_jax.sharding import state_partition_specs
from flora_jax.sharding import state_shardings

__version__ = '0.1.0'

__all__ = (
    'FloraCompressState',
    'FloraMomentumState',
    'FloraMultiSteps',
    'FloraMultiStepsState',
    'GaLoreState',
    'LeafPlan',
    'LimitNormGrowthState',
    'LoRADelta',
    'LoRAInitialFactor',
    'ProjectionRule',
    'ScaledLoRA',
    'ScaledLoRAEmbed',
    'add_lora',
    'apply_shardings',
    'apply_lora_delta',
    'canonicalize_signs',
    'change_basis',
    'fira',
    'flora',
    'flora_compress',
    'galore',
    'gaussian_projector',
    'is_bias_or_norm',
    'limit_norm_growth',
    'lora_delta',
    'lora_ga_init',
    'lora_plus',
    'lora_plus_labels',
    'lora_scale',
    'merge_lora',
    'path_mask',
    'project_down',
    'project_up',
    'randomized_projector',
    'scale_by_adam_hf',
    'scale_by_fira',
    'scale_by_flora_momentum',
    'scale_by_galore',
    'state_bytes',
    'state_partition_specs',
    'state_shardings',
    'svd_projector',
    'unmerge_lora',
)
