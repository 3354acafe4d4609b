"""Bilinear image sampling at given positions (the bgc pipeline's geometric warp), with a path that
stays deterministic on CUDA.

`F.grid_sample`'s CUDA backward accumulates into the input gradient with atomic adds: its order,
and so the last bits of the gradient, change from run to run, and under
`torch.use_deterministic_algorithms(True)` (`train.deterministic=true`) it raises ("grid_sampler_2d_backward_cuda
does not have a deterministic implementation"). The G step back-propagates through augmented
fakes and R1 through augmented reals, so bgc needs a differentiable warp there.

`gather_sample` computes what `grid_sample(mode="bilinear", padding_mode="reflection",
align_corners=False)` computes, from four `torch.gather` reads of the corner pixels and their
bilinear weights. The backward of gather is a scatter-add, which PyTorch makes deterministic on
CUDA under that flag (and which is twice differentiable, as R1 through the warp needs).
`sample` picks: the gather path while deterministic algorithms are on (on any device, so the CPU
tests run the same code as a deterministic GPU run), `grid_sample` otherwise (one fused kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reflect(coord: Tensor, size: int) -> Tensor:
    """Pixel coordinate reflected into the image as grid_sample's reflection padding does with
    align_corners=False: mirrored about the outer pixel edges (-0.5 and size - 0.5), then clipped
    to the outer pixel centers [0, size - 1]."""
    span = float(size)
    shifted = (coord + 0.5).abs()
    extra = torch.fmod(shifted, span)
    even = torch.remainder(torch.floor(shifted / span), 2) == 0
    reflected = torch.where(even, extra - 0.5, span - extra - 0.5)
    return reflected.clamp(0, size - 1)


def gather_sample(x: Tensor, grid: Tensor) -> Tensor:
    """`F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)`
    built from `torch.gather`. x: (N, C, H, W); grid: (N, Ho, Wo, 2) of (x, y) in [-1, 1]."""
    n, c, h, w = x.shape
    out_h, out_w = grid.shape[1:3]
    # Normalized [-1, 1] -> pixel coordinates (align_corners=False: -1 is the outer edge of pixel 0).
    ix = _reflect(((grid[..., 0] + 1) * w - 1) / 2, w).reshape(n, 1, -1)
    iy = _reflect(((grid[..., 1] + 1) * h - 1) / 2, h).reshape(n, 1, -1)
    x0, y0 = torch.floor(ix), torch.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    # After clipping a coordinate is at most size - 1, where the far corner's weight is 0: clamping
    # its index keeps the read inside the image without changing the result.
    cols = (x0.long(), x1.long().clamp(max=w - 1))
    rows = (y0.long(), y1.long().clamp(max=h - 1))
    flat = x.reshape(n, c, h * w)

    def corner(row: Tensor, col: Tensor) -> Tensor:
        return flat.gather(2, (row * w + col).expand(n, c, -1))

    # The same weights, in the same order, as PyTorch's bilinear grid sampler (nw, ne, sw, se).
    out = (corner(rows[0], cols[0]) * ((x1 - ix) * (y1 - iy))
           + corner(rows[0], cols[1]) * ((ix - x0) * (y1 - iy))
           + corner(rows[1], cols[0]) * ((x1 - ix) * (iy - y0))
           + corner(rows[1], cols[1]) * ((ix - x0) * (iy - y0)))
    return out.reshape(n, c, out_h, out_w)


def sample(x: Tensor, grid: Tensor) -> Tensor:
    """Bilinear sampling with reflection padding (align_corners=False): `gather_sample` while
    deterministic algorithms are on, `F.grid_sample` otherwise."""
    if torch.are_deterministic_algorithms_enabled():
        return gather_sample(x, grid)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


__all__ = ["gather_sample", "sample"]
