"""The bgc pipeline's geometric warp as StyleGAN2-ADA does it: 2x supersampled with the sym6 wavelet.

Karras et al. 2020 (ADA, appendix B.3) warp at twice the resolution between an orthogonal
low-pass upsampling and the matching downsampling, so that the warp leaks no aliasing into what
D sees at high p. NVlabs' AugmentPipe (training/augment.py, forward, "Execute geometric
transformations"), step by step, all in pixel coordinates centred on the image:

1. margin: how far the output's corners, mapped by the batch's matrices, reach outside the image,
   plus twice the filter's half-support (`2 * SYM6_PAD`), clamped to [0, side - 1] and rounded up;
2. reflect-pad the image by that margin (zeros beyond it);
3. upsample 2x with the sym6 filter (zero insertion, gain 2 per axis, zeros beyond the padding);
4. bilinear `grid_sample` (zeros outside) onto a 2x grid that is `SYM6_PAD` pixels larger than
   the image on every side;
5. downsample 2x with the same filter (correlation, "flip_filter"), cropping that border.

The margin is a maximum over the batch, so NVlabs reads it on the host to size the padding. Here
the padding is always the largest possible (side - 1) and everything outside the margin is masked
to zero: the same numbers as NVlabs' smaller canvas, with shapes fixed and no host sync. Steps 2-3
(reflection, masks, upsampling) and step 5 are linear and separable, so each is one small matrix
per axis (2 x canvas by side; side by 2 x (side + 2 SYM6_PAD)) applied by matmul: exact fp32
(PyTorch's default keeps TF32 off for matmuls, where cuDNN would run fp32 convolutions in TF32),
fast on CPU where small depthwise convolutions are not, a deterministic backward, and no
`reflection_pad2d_backward` (it raises under deterministic algorithms on CUDA). The sampling goes
through `distgan.gan.sampler.sample` (grid_sample, or its gather twin under deterministic
algorithms). Twice differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distgan.gan.sampler import sample

SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
"""Symlet-6 low-pass decomposition filter, PyWavelets 1.9 `pywt.Wavelet("sym6").dec_lo` (public
wavelet constants; NVlabs' `wavelets["sym6"]` lists the same)."""

SYM6_PAD = len(SYM6) // 4
"""NVlabs' Hz_pad: a quarter of the taps (3), the filter's half-support in original pixels."""
_OPERATORS: dict[tuple, Tensor] = {}


def _cached(key: tuple, device: torch.device, build) -> Tensor:
    """A constant operator, built once per shape and device (no host->device copy per call)."""
    key = (*key, device)
    if key not in _OPERATORS:
        _OPERATORS[key] = build().to(device)
    return _OPERATORS[key]


def _reflect_matrix(size: int, pad: int) -> Tensor:
    """(size + 2 pad, size): row j picks pixel j - pad, reflected about the edge pixels as
    F.pad(mode="reflect") does (pad < size)."""
    i = torch.arange(size + 2 * pad) - pad
    i = torch.where(i < 0, -i, torch.where(i >= size, 2 * (size - 1) - i, i))
    return F.one_hot(i, size).float()


def _filter_matrix(rows: int, cols: int, tap_index) -> Tensor:
    """(rows, cols) whose entry [r, c] is the normalized filter's tap `tap_index(r, c)`, or 0 where
    that index falls outside the filter."""
    f = torch.tensor(SYM6, dtype=torch.float32)
    f = f / f.sum()  # normalized to sum 1 in float32, as NVlabs' upfirdn2d.setup_filter
    t = tap_index(torch.arange(rows)[:, None], torch.arange(cols)[None, :])
    inside = (t >= 0) & (t < len(f))
    return torch.where(inside, f[t.clamp(0, len(f) - 1)], torch.zeros(()))


def _upsample_matrix(size: int) -> Tensor:
    """(2 size, size): upfirdn2d.upsample2d along one axis, out[k] = sum_i 2 f[5 + k - 2i] x[i]
    (zero insertion, 6 zeros before and 5 after, the flipped filter, gain 2), zeros outside."""
    return 2 * _filter_matrix(2 * size, size, lambda k, i: 5 + k - 2 * i)


def _downsample_matrix(size: int) -> Tensor:
    """(size, 2 (size + 2 SYM6_PAD)): upfirdn2d.downsample2d(flip_filter=True, padding=-2 SYM6_PAD)
    along one axis, out[m] = sum_t f[t] x[2m + 1 + t]."""
    return _filter_matrix(size, 2 * (size + 2 * SYM6_PAD), lambda m, j: j - 2 * m - 1)


def _pad_and_upsample(size: int, before: Tensor, after: Tensor, like: Tensor) -> Tensor:
    """(2 (3 size - 2), size): reflect-pad by side - 1, keep NVlabs' canvas (`before` / `after`
    pixels of padding, 0-d device tensors), upsample, keep twice that canvas (NVlabs samples zeros
    beyond it)."""
    pad = size - 1
    reflect = _cached(("reflect", size), like.device, lambda: _reflect_matrix(size, pad))
    up = _cached(("up", size + 2 * pad), like.device, lambda: _upsample_matrix(size + 2 * pad))
    kept = _band(size + 2 * pad, pad - before, pad + size + after, like)
    kept_up = _band(2 * (size + 2 * pad), 2 * (pad - before), 2 * (pad + size + after), like)
    return kept_up[:, None] * ((up * kept) @ reflect)


def _margins(g: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NVlabs' padding (left, top, right, bottom) as integer-valued 0-d device tensors: the
    farthest any output corner lands outside the image under any sample's matrix, plus
    2 * SYM6_PAD, within [0, side - 1]."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # max over the four corners (+-cx, +-cy, 1) of +-(row . corner), per row: |a| cx + |b| cy +- t
    reach_x = g[:, 0, 0].abs() * cx + g[:, 0, 1].abs() * cy
    reach_y = g[:, 1, 0].abs() * cx + g[:, 1, 1].abs() * cy
    ends = (reach_x - g[:, 0, 2], reach_y - g[:, 1, 2], reach_x + g[:, 0, 2], reach_y + g[:, 1, 2])
    slack = (2 * SYM6_PAD - cx, 2 * SYM6_PAD - cy) * 2
    limit = (w - 1, h - 1) * 2
    return tuple((e.max() + s).clamp(0, m).ceil() for e, s, m in zip(ends, slack, limit))


def _band(size: int, lo: Tensor, hi: Tensor, like: Tensor) -> Tensor:
    """1.0 at positions lo <= i < hi of range(size), else 0.0 (lo, hi: 0-d device tensors)."""
    i = torch.arange(size, device=like.device, dtype=like.dtype)
    return ((i >= lo) & (i < hi)).to(like.dtype)


def _grid(a: Tensor, t: Tensor, in_size: tuple[int, int], out_shape: tuple[int, int, int, int]) -> Tensor:
    """affine_grid for the map (x, y) -> a @ (x, y) + t between centred pixel coordinates of an
    output of `out_shape` and an input of `in_size` (H, W): in affine_grid's normalized
    coordinates ([-1, 1] across the outer pixel edges) that is diag(2 / in) a diag(out / 2)."""
    (in_h, in_w), (out_h, out_w) = in_size, out_shape[2:]
    rows = torch.stack([a[:, 0] * (2 / in_w), a[:, 1] * (2 / in_h)], dim=1)
    rows = torch.stack([rows[:, :, 0] * (out_w / 2), rows[:, :, 1] * (out_h / 2)], dim=2)
    shift = torch.stack([t[:, 0] * (2 / in_w), t[:, 1] * (2 / in_h)], dim=1)
    return F.affine_grid(torch.cat([rows, shift.unsqueeze(2)], dim=2), list(out_shape), align_corners=False)


def single_warp(x: Tensor, g: Tensor) -> Tensor:
    """The cheap alternative (`loss.augment_supersample=false`): the same warp sampled once at the
    image's resolution, bilinear with reflection padding (grid_sample, or its gather twin). Not
    NVlabs': it aliases at high p and mirrors about the pixel edges; ~10x cheaper on CPU."""
    with torch.autocast(x.device.type, enabled=False):
        n, c, h, w = x.shape
        grid = _grid(g[:, :2, :2].float(), g[:, :2, 2].float(), (h, w), (n, c, h, w))
        return sample(x.float(), grid, padding_mode="reflection")


def supersampled_warp(x: Tensor, g: Tensor) -> Tensor:
    """Warp images `x` (N, C, H, W) by `g` (N, 3, 3), which maps output pixel coordinates to input
    ones (centred on the image: the corner pixel centres are at +-(W-1)/2, +-(H-1)/2), as
    NVlabs' AugmentPipe does (see the module docstring)."""
    with torch.autocast(x.device.type, enabled=False):  # fp32 throughout, as NVlabs
        return _warp(x.float(), g.float())


def _warp(x: Tensor, g: Tensor) -> Tensor:
    n, c, h, w = x.shape
    cw, ch = 3 * w - 2, 3 * h - 2  # our canvas: the image padded by side - 1 on every side
    left, top, right, bottom = _margins(g, h, w)
    along_x, along_y = _pad_and_upsample(w, left, right, x), _pad_and_upsample(h, top, bottom, x)
    up = along_y @ (x @ along_x.T)  # (N, C, 2ch, 2cw)

    # Output -> input in the upsampled canvas' pixels: scale by 2 about the centre, then the half
    # pixel by which 2x sampling moves the centre (NVlabs' translate2d(-0.5) ... translate2d(0.5)).
    a = g[:, :2, :2]
    t = 2 * g[:, :2, 2] + (a[:, :, 0] * 0.5 + a[:, :, 1] * 0.5) - 0.5
    out_h, out_w = (h + 2 * SYM6_PAD) * 2, (w + 2 * SYM6_PAD) * 2
    grid = _grid(a, t, (2 * ch, 2 * cw), (n, c, out_h, out_w))
    warped = sample(up, grid, padding_mode="zeros")
    down_x = _cached(("down", w), x.device, lambda: _downsample_matrix(w))
    down_y = _cached(("down", h), x.device, lambda: _downsample_matrix(h))
    return down_y @ (warped @ down_x.T)


__all__ = ["SYM6", "SYM6_PAD", "single_warp", "supersampled_warp"]
