"""The one conversion from stored pixels to what the networks take: uint8 0..255 -> float32 [-1, 1].

Batches travel as uint8 from the loader workers through shared memory, pinning and the
host-to-device copy (a quarter of float32's bytes at every hop) and are converted where they will
be used, on the device, right before training or feature extraction. Streams that already yield
float images in [-1, 1] (synthetic test and benchmark streams) pass through unchanged.
"""

from __future__ import annotations

import torch

_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(-1, 127.5) as 0-dim float32 tensors on `device`, made once per device (a per-batch
    `torch.tensor(..., device=cuda)` would be a host-to-device copy in every step)."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (torch.full((), -1.0, device=device), torch.full((), 127.5, device=device))
    return _CONSTANTS[device]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, usually N, C, H, W) -> float32 in [-1, 1] on the same device.

    One kernel: `addcdiv(-1, x, 127.5)` = x / 127.5 - 1, reading uint8 and writing float32 with no
    float intermediate; bit-identical to `x.float() / 127.5 - 1` (0 -> -1 and 255 -> 1 exactly,
    which multiplying by 1/127.5 would miss by one ulp). Non-uint8 input is returned as it is.
    """
    if images.dtype != torch.uint8:
        return images
    minus_one, half_range = _constants(images.device)
    return torch.addcdiv(minus_one, images, half_range)
