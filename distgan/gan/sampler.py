"""Bilinear image sampling at given positions (the bgc pipeline's geometric warp), with a path that
stays deterministic on CUDA.

`F.grid_sample`'s CUDA backward accumulates into the input gradient with atomic adds: its order,
and so the last bits of the gradient, change from run to run, and under
`torch.use_deterministic_algorithms(True)` (`train.deterministic=true`) it raises ("grid_sampler_2d_backward_cuda
does not have a deterministic implementation"). The G step back-propagates through augmented
fakes and R1 through augmented reals, so bgc needs a differentiable warp there.

`gather_sample` computes what `grid_sample(mode="bilinear", padding_mode=..., align_corners=False)`
computes, for padding "reflection" or "zeros" (the supersampled bgc warp's), from four
`torch.gather` reads of the corner pixels and their bilinear weights. The backward of gather is
a scatter-add, which PyTorch makes deterministic on CUDA under that flag (and which is twice
differentiable, as R1 through the warp needs).
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


def gather_sample(x: Tensor, grid: Tensor, padding_mode: str = "reflection") -> Tensor:
    """`F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)`
    built from `torch.gather`, for padding_mode "reflection" or "zeros". x: (N, C, H, W); grid:
    (N, Ho, Wo, 2) of (x, y) in [-1, 1]."""
    if padding_mode not in ("reflection", "zeros"):
        raise ValueError(f"gather_sample: padding_mode={padding_mode!r}; it has 'reflection' and 'zeros'")
    n, c, h, w = x.shape
    out_h, out_w = grid.shape[1:3]
    # Normalized [-1, 1] -> pixel coordinates (align_corners=False: -1 is the outer edge of pixel 0).
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    if padding_mode == "reflection":
        ix, iy = _reflect(ix, w), _reflect(iy, h)
    ix, iy = ix.reshape(n, 1, -1), iy.reshape(n, 1, -1)
    x0, y0 = torch.floor(ix), torch.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    # Reflection: after clipping a coordinate is at most size - 1, where the far corner's weight
    # is 0, so clamping its index keeps the read inside without changing the result. Zeros: a
    # corner outside the image reads a clamped pixel and counts 0 (grid_sample skips it).
    cols = (x0.long().clamp(0, w - 1), x1.long().clamp(0, w - 1))
    rows = (y0.long().clamp(0, h - 1), y1.long().clamp(0, h - 1))
    flat = x.reshape(n, c, h * w)
    inside = {}
    if padding_mode == "zeros":
        in_x = ((x0 >= 0) & (x0 <= w - 1), (x1 >= 0) & (x1 <= w - 1))
        in_y = ((y0 >= 0) & (y0 <= h - 1), (y1 >= 0) & (y1 <= h - 1))
        inside = {(i, j): (in_y[i] & in_x[j]).to(x.dtype) for i in (0, 1) for j in (0, 1)}

    def corner(i: int, j: int) -> Tensor:
        """The pixel at row corner i, column corner j (0: floor, 1: floor + 1) of each position."""
        read = flat.gather(2, (rows[i] * w + cols[j]).expand(n, c, -1))
        return read * inside[i, j] if inside else read

    # The same weights, in the same order, as PyTorch's bilinear grid sampler (nw, ne, sw, se).
    out = (corner(0, 0) * ((x1 - ix) * (y1 - iy))
           + corner(0, 1) * ((ix - x0) * (y1 - iy))
           + corner(1, 0) * ((x1 - ix) * (iy - y0))
           + corner(1, 1) * ((ix - x0) * (iy - y0)))
    return out.reshape(n, c, out_h, out_w)


def sample(x: Tensor, grid: Tensor, padding_mode: str = "reflection") -> Tensor:
    """Bilinear sampling (align_corners=False) with `padding_mode` "reflection" or "zeros":
    `gather_sample` while deterministic algorithms are on, `F.grid_sample` otherwise."""
    if torch.are_deterministic_algorithms_enabled():
        return gather_sample(x, grid, padding_mode)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


__all__ = ["gather_sample", "sample"]
