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
    beta is 0 and the EMA becomes a copy of G. ``cur_nimg`` counts the images seen BEFORE this
    step, as NVlabs' ``cur_nimg`` (so the first update is always a copy).

    ``halflife_kimg <= 0`` returns 0.0: a zero half-life forgets at once, so the EMA is a copy of
    G after every step (`optim.ema_halflife_kimg: 0`, "no EMA"; and the start of R3GAN's
    schedules, which begin at 0). The limit of the formula, not a special meaning.
    """
    if halflife_kimg <= 0:
        return 0.0
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


class _Pairs:
    """EMA tensors matched with the model's, by name (built once per model, reused every step)."""

    def __init__(self, ema: nn.Module, model: nn.Module):
        src_params = _by_name(model.named_parameters())
        src_buffers = _by_name(model.named_buffers())
        self.targets, self.sources, self.buf_targets, self.buf_sources = [], [], [], []
        for name, p in ema.named_parameters():
            if name not in src_params:
                raise KeyError(f"update_ema: parameter {name!r} of the EMA model is missing from the model")
            self.targets.append(p)
            self.sources.append(src_params[name])
        for name, b in ema.named_buffers():
            if name not in src_buffers:
                raise KeyError(f"update_ema: buffer {name!r} of the EMA model is missing from the model")
            self.buf_targets.append(b)
            self.buf_sources.append(src_buffers[name])
        # The model may hold other dtypes or devices (DeepSpeed's bf16 engine weights): cast then.
        self.same_layout = all(t.dtype == s.dtype and t.device == s.device
                               for t, s in zip(self.targets + self.buf_targets, self.sources + self.buf_sources))

    @torch.no_grad()
    def apply(self, beta: float) -> None:
        sources = [s.detach() for s in self.sources] if self.same_layout else [
            s.detach().to(device=t.device, dtype=t.dtype) for t, s in zip(self.targets, self.sources)]
        # ema + (1 - beta) * (model - ema), in place, one pass over the weights (torch.lerp) and
        # batched over all tensors: a third of the memory traffic of sub/mul/add.
        torch._foreach_lerp_(self.targets, sources, 1.0 - beta)
        if self.same_layout and self.buf_targets:
            torch._foreach_copy_(self.buf_targets, self.buf_sources)
        else:
            for t, s in zip(self.buf_targets, self.buf_sources):
                t.copy_(s)


def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """In place: every parameter ema = lerp(ema, model, 1 - beta), i.e. ema + (1 - beta) *
    (model - ema); every buffer (BatchNorm
    running stats, spectral-norm u/v vectors) copied from ``model``. ``beta >= 1`` leaves
    ``ema`` untouched (EMA disabled).

    Tensors are matched by name, not by position, so parametrized modules (spectral_norm stores
    ``parametrizations.weight.original``) and DDP/compile wrappers around ``model`` work. ``model``
    must hold full (unsharded) parameters; gather FSDP/ZeRO-3 shards before calling.
    """
    if beta < 1.0:
        _Pairs(ema, model).apply(beta)


class EMA:
    """The EMA generator: a copy of G, updated after every generator step on the schedule of
    `ema_beta` (half-life in kimg with a ramp-up)."""

    def __init__(self, G: nn.Module, halflife_kimg: float, rampup: float | None):
        self.module = make_ema(G)
        self.halflife_kimg, self.rampup = halflife_kimg, rampup
        self._pairs: _Pairs | None = None
        self._source: nn.Module | None = None

    def update(self, source: nn.Module, batch_images: int, nimg: int) -> None:
        """Move towards `source` (G's full weights) after a step of `batch_images` images (every
        D step's reals of that generator step: NVlabs' batch_size, whose iteration is one D
        step); `nimg`: the images seen before that step (the ramp-up's cur_nimg)."""
        beta = ema_beta(batch_images, self.halflife_kimg, self.rampup, nimg)
        if beta >= 1.0:
            return
        if source is not self._source:
            self._pairs, self._source = _Pairs(self.module, source), source
        self._pairs.apply(beta)


def make_ema(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off (it is only ever updated by
    ``update_ema``). Pass the unwrapped model (not the DDP/compiled wrapper)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


__all__ = ["EMA", "ema_beta", "update_ema", "make_ema"]
