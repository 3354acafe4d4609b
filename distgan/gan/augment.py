"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transforms are applied to real and fake images before D, so D
cannot overfit a small dataset while G still gets gradients through the augmentation. Every op
takes ``(x, generator)`` with x of shape (N, C, H, W), draws one set of parameters per sample,
keeps x's dtype and device, and is built from indexing/arithmetic only so autograd flows to x.
Randomness comes from ``generator`` when given, else from the global torch RNG, so results are
reproducible after ``torch.manual_seed``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

TRANSLATION_RATIO = 0.125  # max shift, as a fraction of the side
CUTOUT_RATIO = 0.5  # side of the cut square, as a fraction of the image side


def _device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    # Draw where the generator lives (a CPU generator cannot drive a CUDA draw), move afterwards.
    return generator.device if generator is not None else x.device


def _uniform(x: Tensor, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """One U(low, high) value per sample, shaped (N, 1, 1, 1) to broadcast over C, H, W."""
    u = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=_device(x, generator))
    return (u * (high - low) + low).to(device=x.device, dtype=x.dtype)


def _randint(x: Tensor, low: int, high: int, generator: torch.Generator | None) -> Tensor:
    """One integer in [low, high) per sample, shape (N,), on x's device."""
    r = torch.randint(low, high, (x.shape[0],), generator=generator, device=_device(x, generator))
    return r.to(x.device)


def rand_brightness(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add U(-0.5, 0.5) to every pixel of a sample."""
    return x + _uniform(x, -0.5, 0.5, generator)


def rand_saturation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale each pixel's deviation from its channel mean by U(0, 2) (no-op for 1 channel)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _uniform(x, 0.0, 2.0, generator) + mean


def rand_contrast(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale the deviation from the sample's global mean by U(0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5, generator) + mean


def rand_translation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Shift each sample by integers (dy, dx), |d| <= round(side / 8), filling with zeros.

    Output pixel (i, j) reads input (i - dy, j - dx); reads that fall outside the image are
    clamped onto a one-pixel zero border, which gives zero padding with a single gather for
    the whole batch (no loop over samples).
    """
    n, _, h, w = x.shape
    sy, sx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = _randint(x, -sy, sy + 1, generator).view(n, 1, 1)
    dx = _randint(x, -sx, sx + 1, generator).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy + 1  # +1: index into padded
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx + 1
    rows, cols = rows.clamp(0, h + 1), cols.clamp(0, w + 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    padded = F.pad(x, (1, 1, 1, 1))
    # Advanced indices around a slice put the broadcast (n, h, w) dims first: (n, h, w, c).
    out = padded[batch, :, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def rand_cutout(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Zero one square of side round(side / 2) per sample, placed uniformly so that it lies
    fully inside the image (every sample loses the same area)."""
    n, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = _randint(x, 0, h - ch + 1, generator).view(n, 1, 1)
    left = _randint(x, 0, w - cw + 1, generator).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    # Multiplying by a 0/1 mask (instead of in-place assignment) keeps the op differentiable.
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES: dict[str, list[Callable[..., Tensor]]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def diff_augment(x: Tensor, policy: str, generator: torch.Generator | None = None) -> Tensor:
    """Apply the comma-separated ``policy`` (keys of ``POLICIES``, in the order given) to a
    batch (N, C, H, W). ``""`` returns ``x`` itself. Unknown keys raise ``ValueError`` before
    anything is drawn from the RNG."""
    keys = [k.strip() for k in policy.split(",") if k.strip()]
    for key in keys:
        if key not in POLICIES:
            raise ValueError(f"Unknown DiffAugment policy {key!r}; choose from {', '.join(POLICIES)}")
    if x.dim() != 4 and keys:
        raise ValueError(f"diff_augment expects images of shape (N, C, H, W), got {tuple(x.shape)}")
    for key in keys:
        for op in POLICIES[key]:
            x = op(x, generator)
    return x


__all__ = ["POLICIES", "diff_augment", "rand_brightness", "rand_saturation", "rand_contrast",
           "rand_translation", "rand_cutout"]
