"""Projection primitives, for building new projecting methods.

Every projecting transform of flora_jax (Flora, GaLore, Fira) is built from
these pieces: a `LeafPlan` per leaf (from `flora_jax.ProjectionRule`), a
projector ``Q`` of shape ``(..., dim, r)`` and the two maps

* side ``'left'`` (compress the rows): ``down(X) = Qᵀ X``, ``up(C) = Q C``;
* side ``'right'`` (compress the columns): ``down(X) = X Q``,
  ``up(C) = C Qᵀ``.

Gaussian projectors are regenerated from a key (`random_projector`, keyed
by `projection_key`, one draw per stacked slice by `normal_per_slice`;
`random_projectors` draws a whole tree's in one batch per shape), not
stored unless a transform is asked to (Flora's ``store_projectors``, whose
staggered schedule re-draws each slice at its `resample_phases`); fitted
ones come from the gradient's
SVD (`svd_projector`) or a randomized range finder
(`randomized_projector`).
"""

from flora_jax._src.keys import normal_per_slice
from flora_jax._src.keys import projection_key
from flora_jax._src.keys import resample_phases
from flora_jax._src.projection import LeafPlan
from flora_jax._src.projectors import canonicalize_signs
from flora_jax._src.projectors import change_basis
from flora_jax._src.projectors import gaussian_projector
from flora_jax._src.projectors import project_down
from flora_jax._src.projectors import project_up
from flora_jax._src.projectors import random_projector
from flora_jax._src.projectors import random_projectors
from flora_jax._src.projectors import randomized_projector
from flora_jax._src.projectors import sample_projector
from flora_jax._src.projectors import svd_projector

__all__ = (
    'LeafPlan',
    'canonicalize_signs',
    'change_basis',
    'gaussian_projector',
    'normal_per_slice',
    'project_down',
    'project_up',
    'projection_key',
    'random_projector',
    'random_projectors',
    'randomized_projector',
    'resample_phases',
    'sample_projector',
    'svd_projector',
)
