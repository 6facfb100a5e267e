"""Measuring optimizer memory without allocating it."""

from flora_jax._src.memory import state_bytes

__all__ = ('state_bytes',)
