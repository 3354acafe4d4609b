"""Exponential moving average of the generator (Karras et al., StyleGAN2-ADA schedule).

The EMA copy is what gets sampled and evaluated: averaging G's weights over the last few
thousand images removes much of the step-to-step jitter of adversarial training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Prefixes that wrappers add to parameter names (DDP: "module.", torch.compile: "_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def ema_beta(batch_images: int, halflife_kimg: float, rampup: float | None, cur_nimg: int) -> float:
    """Decay per update so that a weight's contribution halves every ``halflife_kimg`` thousand
    images: beta = 0.5 ** (batch_images / halflife_nimg).

    With ``rampup`` the half-life is capped at ``cur_nimg * rampup``, so early in training (when
    the weights move fast and old ones are useless) the EMA follows G closely; at cur_nimg = 0
    beta is 0 and the EMA becomes a copy of G. ``halflife_kimg <= 0`` returns 1.0: updates are
    disabled and the EMA stays at its initial copy.
    """
    if halflife_kimg <= 0:
        return 1.0
    halflife_nimg = halflife_kimg * 1000.0
    if rampup:  # None or 0 disables the ramp-up
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_images / max(halflife_nimg, 1e-8))


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _by_name(pairs) -> dict[str, torch.Tensor]:
    return {_strip(name): t for name, t in pairs}


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """In place: every parameter ema = model + (ema - model) * beta; every buffer (BatchNorm
    running stats, spectral-norm u/v vectors) copied from ``model``. ``beta >= 1`` leaves
    ``ema`` untouched (EMA disabled).

    Tensors are matched by name, not by position, so parametrized modules (spectral_norm stores
    ``parametrizations.weight.original``) and DDP/compile wrappers around ``model`` work. ``model``
    must hold full (unsharded) parameters; gather FSDP/ZeRO-3 shards before calling.
    """
    if beta >= 1.0:
        return
    src_params = _by_name(model.named_parameters())
    src_buffers = _by_name(model.named_buffers())
    targets, sources = [], []
    for name, p in ema.named_parameters():
        if name not in src_params:
            raise KeyError(f"update_ema: parameter {name!r} of the EMA model is missing from the model")
        targets.append(p)
        sources.append(src_params[name].detach().to(device=p.device, dtype=p.dtype))
    # (ema - model) * beta + model, in place and batched over all tensors (one kernel launch per
    # op instead of three per parameter); equals model + (ema - model) * beta exactly.
    torch._foreach_sub_(targets, sources)
    torch._foreach_mul_(targets, beta)
    torch._foreach_add_(targets, sources)
    for name, b in ema.named_buffers():
        if name not in src_buffers:
            raise KeyError(f"update_ema: buffer {name!r} of the EMA model is missing from the model")
        b.copy_(src_buffers[name])


def make_ema(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off (it is only ever updated by
    ``update_ema``). Pass the unwrapped model (not the DDP/compiled wrapper)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


__all__ = ["ema_beta", "update_ema", "make_ema"]
