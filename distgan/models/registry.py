"""Architecture registry: ``model.arch`` names -> builders returning ``(G, D)``.

An architecture registers itself with ``@register_arch("name")`` on a builder
``(model_cfg, resolution, channels, num_classes) -> (G, D)``. ``build_models`` does every check
that depends only on the config and the data shape (arch name, resolution, channels, labels)
and raises ``ConfigError`` with a fix-it message, so no arch has to repeat them.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from distgan.config import ConfigError, ModelConfig

Builder = Callable[[ModelConfig, int, int, int], tuple[nn.Module, nn.Module]]

RESOLUTIONS: tuple[int, ...] = (16, 32, 64, 128, 256)
"""Image sides every built-in architecture supports."""
CHANNELS: tuple[int, ...] = (1, 3)

ARCHS: list[str] = []
"""Registered architecture names, in registration order (the same list object is re-exported,
so it also shows archs registered later, e.g. by plugins)."""

_REGISTRY: dict[str, tuple[Builder, tuple[int, ...], tuple[int, ...]]] = {}


def register_arch(
    name: str, resolutions: tuple[int, ...] = RESOLUTIONS, channels: tuple[int, ...] = CHANNELS
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name`` with the resolutions/channels it supports."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model arch {name!r} is already registered")
        _REGISTRY[name] = (builder, tuple(resolutions), tuple(channels))
        ARCHS.append(name)
        return builder

    return decorate


def _unknown_arch(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, ARCHS, n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"model.arch={name!r} is not a known architecture.{hint} Available: {', '.join(ARCHS)}.")


def build_models(model_cfg: ModelConfig, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build ``(G, D)`` for ``model_cfg.arch`` at ``resolution`` x ``resolution`` x ``channels``.

    ``num_classes`` is the number of classes in the data (0: unlabelled). The models are
    conditional iff ``model_cfg.conditional``; with ``conditional=False`` labels are ignored and
    ``G.num_classes == D.num_classes == 0``. Weights are drawn from torch's global RNG, so the
    same ``torch.manual_seed`` gives identical weights.
    """
    arch = model_cfg.arch
    if arch not in _REGISTRY:
        raise _unknown_arch(arch)
    builder, resolutions, chans = _REGISTRY[arch]
    if resolution not in resolutions:
        supported = ", ".join(str(r) for r in resolutions)
        raise ConfigError(
            f"model.arch={arch!r} does not support resolution {resolution!r} "
            f"(data.resolution); supported resolutions: {supported}."
        )
    if channels not in chans:
        raise ConfigError(
            f"model.arch={arch!r} does not support {channels!r} image channels (data.channels); "
            f"supported: {', '.join(str(c) for c in chans)}."
        )
    for key in ("z_dim", "g_width", "d_width"):
        if getattr(model_cfg, key) < 1:
            raise ConfigError(f"model.{key}={getattr(model_cfg, key)!r} must be at least 1")
    if model_cfg.g_norm not in ("batch", "none"):
        raise ConfigError(f"model.g_norm={model_cfg.g_norm!r} is not one of 'batch', 'none'.")
    if model_cfg.conditional:
        if num_classes < 2:
            raise ConfigError(
                "model.conditional=true needs labelled data with at least 2 classes, but the dataset "
                f"reports num_classes={num_classes}. Use a labelled dataset or set model.conditional=false."
            )
        classes = num_classes
    else:
        classes = 0  # unconditional: labels (if any) are ignored
    return builder(model_cfg, resolution, channels, classes)


__all__ = ["ARCHS", "RESOLUTIONS", "CHANNELS", "register_arch", "build_models"]
