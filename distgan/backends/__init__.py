"""Backends wrap G, D and both optimizers for one execution setup; see `base.Backend`."""

from __future__ import annotations

from distgan.backends.base import Backend
from distgan.config import Config


def build_backend(cfg: Config) -> Backend:
    """Create the backend named by `dist.backend` (imports heavy packages only when used)."""
    if cfg.dist.backend == "deepspeed":
        from distgan.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    from distgan.backends.accelerate import AccelerateBackend

    return AccelerateBackend(cfg)


__all__ = ["Backend", "build_backend"]
