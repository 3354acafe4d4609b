"""Model registry and architectures.

    from distgan.models import build_models, register_arch, ARCHS
    G, D = build_models(cfg.model, resolution, channels, num_classes)

``G(z, labels=None) -> (N, C, R, R)`` images in [-1, 1]; ``D(x, labels=None) -> (N,)`` raw logits.
Importing this package registers the built-in archs (``dcgan``, ``resnet``, ``r3gan``, ``stylegan2``,
``fastgan``).
"""

from distgan.models.registry import (ARCHS, CHANNELS, RESOLUTIONS, build_models, check_arch, check_discriminator,
                                     discriminator_blocks, register_arch, register_discriminator)

# Imported for their @register_arch side effect.
from distgan.models import dcgan as _dcgan  # noqa: E402,F401  isort: skip
from distgan.models import resnet as _resnet  # noqa: E402,F401  isort: skip
from distgan.models import r3gan as _r3gan  # noqa: E402,F401  isort: skip
from distgan.models import stylegan2 as _stylegan2  # noqa: E402,F401  isort: skip
from distgan.models import fastgan as _fastgan  # noqa: E402,F401  isort: skip
from distgan.models import projected as _projected  # noqa: E402,F401  isort: skip

__all__ = ["ARCHS", "RESOLUTIONS", "CHANNELS", "build_models", "check_arch", "check_discriminator", "discriminator_blocks",
           "register_arch", "register_discriminator"]
