"""flora_jax: memory-efficient training methods as composable optax transforms."""

from flora_jax.accumulation import FloraMultiSteps
from flora_jax.accumulation import FloraMultiStepsState
from flora_jax.flora import flora
from flora_jax.flora import flora_compress
from flora_jax.flora import FloraCompressState
from flora_jax.flora import FloraMomentumState
from flora_jax.flora import scale_by_flora_momentum
from flora_jax.projection import gaussian_projector
from flora_jax.projection import LeafPlan
from flora_jax.projection import path_mask
from flora_jax.projection import project_down
from flora_jax.projection import project_up
from flora_jax.projection import ProjectionRule
from flora_jax.projection import state_bytes

__version__ = '0.1.0'

__all__ = (
    'FloraCompressState',
    'FloraMomentumState',
    'FloraMultiSteps',
    'FloraMultiStepsState',
    'LeafPlan',
    'ProjectionRule',
    'flora',
    'flora_compress',
    'gaussian_projector',
    'path_mask',
    'project_down',
    'project_up',
    'scale_by_flora_momentum',
    'state_bytes',
)
