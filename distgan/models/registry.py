"""Architecture registry: ``model.arch`` names -> builders returning ``(G, D)``.

An architecture registers itself with ``@register_arch("name", resolutions=..., channels=...)``
on a builder ``(model_cfg, resolution, channels, num_classes) -> (G, D)``, declaring the image
sizes it supports and, with ``d_blocks``, what D's "blocks" are: the ordered list, input side
first, that ``model.freeze_d=K`` (FreezeD) counts when it freezes D's first K blocks. ``check_arch`` is the one check of an (arch, resolution, channels) triple:
config validation asks it before any work starts, and ``build_models`` asks it again for callers
that build models without a validated config. It raises ``ConfigError`` with a fix-it message.
"""

from __future__ import annotations

import difflib
from typing import Callable, Protocol, Sequence

from torch import nn

from distgan.errors import ConfigError
from distgan.optional import check_installed


class ModelSettings(Protocol):
    """What builders read of `config.ModelConfig` (declared here, so that models never import the
    config module, which imports this registry to validate `model.arch`)."""

    arch: str
    z_dim: int
    g_width: int
    d_width: int
    d_arch: str
    projected_resolution: int
    projected_scales: int
    conditional: bool
    g_norm: str
    widths: list[int]
    blocks_per_stage: int
    expansion: int
    group_size: int
    w_dim: int
    mapping_layers: int
    d_mapping_layers: int
    style_mixing_prob: float
    mbstd_group: int
    mbstd_layout: str
    lowp_stages: int
    conv_clamp: float
    noise_mode: str


Builder = Callable[[ModelSettings, int, int, int], tuple[nn.Module, nn.Module]]

RESOLUTIONS: tuple[int, ...] = (16, 32, 64, 128, 256)
"""Image sides every built-in architecture supports."""
CHANNELS: tuple[int, ...] = (1, 3)

ARCHS: list[str] = []
"""Registered architecture names, in registration order (the same list object is re-exported,
so it also shows archs registered later, e.g. by plugins)."""

_REGISTRY: dict[str, tuple[Builder, tuple[int, ...], tuple[int, ...]]] = {}

DBlocks = Callable[[nn.Module], Sequence[nn.Module]]
_D_BLOCKS: dict[str, str | DBlocks] = {}

DiscriminatorBuilder = Callable[[ModelSettings, int, int, int], nn.Module]
_D_ONLY: dict[str, tuple[DiscriminatorBuilder, tuple[int, ...], tuple[int, ...]]] = {}
"""Discriminators without a generator of their own (``model.d_arch``), e.g. ``projected``."""
_D_NEEDS: dict[str, tuple[str, ...]] = {}
"""Optional modules a discriminator needs (checked at config validation: one line naming the extra)."""


def register_arch(
    name: str, resolutions: tuple[int, ...] = RESOLUTIONS, channels: tuple[int, ...] = CHANNELS,
    d_blocks: str | DBlocks = "blocks",
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name`` with the resolutions/channels it supports.

    ``d_blocks`` names D's ordered block list (input side first) for FreezeD: an attribute of D
    (default ``blocks``) or a function ``D -> [blocks]``."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model arch {name!r} is already registered")
        _REGISTRY[name] = (builder, tuple(resolutions), tuple(channels))
        _D_BLOCKS[name] = d_blocks
        ARCHS.append(name)
        return builder

    return decorate


def register_discriminator(
    name: str, resolutions: tuple[int, ...] = RESOLUTIONS, channels: tuple[int, ...] = CHANNELS,
    d_blocks: str | DBlocks = "blocks", needs: tuple[str, ...] = (),
) -> Callable[[DiscriminatorBuilder], DiscriminatorBuilder]:
    """Decorator registering a discriminator-only builder ``(model_cfg, resolution, channels,
    num_classes) -> D`` under ``name``, for ``model.d_arch``. Its name must not clash with an arch;
    ``needs`` names the optional modules it imports (`distgan/optional.py` knows their extras)."""

    def decorate(builder: DiscriminatorBuilder) -> DiscriminatorBuilder:
        if name in _REGISTRY or name in _D_ONLY:
            raise ValueError(f"discriminator {name!r} is already registered")
        _D_ONLY[name] = (builder, tuple(resolutions), tuple(channels))
        _D_BLOCKS[name] = d_blocks
        _D_NEEDS[name] = tuple(needs)
        return builder

    return decorate


def check_discriminator(d_arch: str, resolution: int, channels: int) -> None:
    """ConfigError unless ``d_arch`` (``model.d_arch``) names a registered arch or discriminator
    that supports ``resolution`` and ``channels``."""
    if d_arch in _REGISTRY:
        check_arch(d_arch, resolution, channels)
        return
    names = [*ARCHS, *_D_ONLY]
    if d_arch not in _D_ONLY:
        close = difflib.get_close_matches(d_arch, names, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.d_arch={d_arch!r} is not a known discriminator.{hint} Available: {', '.join(names)}.")
    for module in _D_NEEDS[d_arch]:
        check_installed(module, f"model.d_arch={d_arch}")
    _, resolutions, chans = _D_ONLY[d_arch]
    if resolution not in resolutions or channels not in chans:
        raise ConfigError(f"model.d_arch={d_arch!r} supports resolutions {', '.join(map(str, resolutions))} and "
                          f"{' or '.join(map(str, chans))} channels, not {resolution} px with {channels} (data.*).")


def discriminator_blocks(arch: str, D: nn.Module) -> list[nn.Module]:
    """D's blocks as ``arch`` declared them (``register_arch(d_blocks=...)``), input side first."""
    spec = _D_BLOCKS[arch]
    blocks = spec(D) if callable(spec) else getattr(D, spec, None)
    if blocks is None:
        raise ConfigError(f"model.arch={arch!r}: its discriminator has no block list {spec!r}; the architecture "
                          "must declare one with register_arch(d_blocks=...) before model.freeze_d can be used.")
    return list(blocks)


def check_arch(arch: str, resolution: int, channels: int) -> None:
    """ConfigError unless ``arch`` is registered and supports ``resolution`` and ``channels``."""
    if arch not in _REGISTRY:
        close = difflib.get_close_matches(arch, ARCHS, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.arch={arch!r} is not a known architecture.{hint} Available: {', '.join(ARCHS)}.")
    _, resolutions, chans = _REGISTRY[arch]
    if resolution not in resolutions:
        raise ConfigError(f"model.arch={arch!r} does not support resolution {resolution!r} (data.resolution); "
                          f"supported resolutions: {', '.join(str(r) for r in resolutions)}.")
    if channels not in chans:
        raise ConfigError(f"model.arch={arch!r} does not support {channels!r} image channels (data.channels); "
                          f"supported: {', '.join(str(c) for c in chans)}.")


def build_models(model_cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build ``(G, D)`` for ``model_cfg.arch`` at ``resolution`` x ``resolution`` x ``channels``.

    ``num_classes`` is the number of classes in the data (0: unlabelled). The models are
    conditional iff ``model_cfg.conditional``; with ``conditional=False`` labels are ignored and
    ``G.num_classes == D.num_classes == 0``. Weights are drawn from torch's global RNG, so the
    same ``torch.manual_seed`` gives identical weights. The other ``model.*`` values were checked
    by config validation (their rules sit next to the fields in ``distgan/config.py``).
    """
    check_arch(model_cfg.arch, resolution, channels)
    if model_cfg.conditional:
        if num_classes < 2:
            raise ConfigError(
                "model.conditional=true needs labelled data with at least 2 classes, but the dataset "
                f"reports num_classes={num_classes}. Use a labelled dataset or set model.conditional=false."
            )
        classes = num_classes
    else:
        classes = 0  # unconditional: labels (if any) are ignored
    builder = _REGISTRY[model_cfg.arch][0]
    d_arch = getattr(model_cfg, "d_arch", "") or model_cfg.arch
    if d_arch == model_cfg.arch:
        return builder(model_cfg, resolution, channels, classes)
    check_discriminator(d_arch, resolution, channels)
    G, _ = builder(model_cfg, resolution, channels, classes)
    if d_arch in _D_ONLY:
        return G, _D_ONLY[d_arch][0](model_cfg, resolution, channels, classes)
    # Another arch's D: its builder also makes a G, which is dropped (it only costs a draw from the
    # seeded RNG, so weights stay a function of the seed).
    return G, _REGISTRY[d_arch][0](model_cfg, resolution, channels, classes)[1]


__all__ = ["ARCHS", "RESOLUTIONS", "CHANNELS", "register_arch", "register_discriminator", "check_arch",
           "check_discriminator", "build_models", "discriminator_blocks"]
