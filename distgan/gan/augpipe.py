"""The StyleGAN2-ADA "bgc" augmentation pipeline in plain, differentiable PyTorch.

Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data": before D sees
an image (real or fake) it goes through blit ops (x-flip, 90-degree rotations, integer
translation), geometric ops (isotropic scaling, rotation, anisotropic scaling, fractional
translation), color ops (brightness, contrast, luma flip, hue rotation, saturation) and cutout.
Each op is applied to each image independently with probability multiplier x `p` (NVlabs' per-op
multipliers; the presets live in `distgan.gan.augment_presets`); since D sees the same
distribution of augmentations on both sides and the ops are invertible in distribution at small
p, G learns the clean data distribution ("non-leaking" augmentations).

Implementation, number for number with NVlabs' AugmentPipe (golden fixtures in
tests/fixtures/golden/augment): the same random draws in the same order and shapes (a CPU
`generator` seeded s gives what `torch.manual_seed(s)` gives NVlabs), the same gating
(`U(0,1) < multiplier x p`; p may exceed 1), every blit and geometric op a 3x3 matrix in pixel
coordinates composed as NVlabs composes them, and the warp 2x supersampled with the sym6 wavelet
with NVlabs' reflect-padded borders (`distgan.gan.resample`; grid_sample, or under
`train.deterministic=true` its gather-based twin in `distgan.gan.sampler`). The color ops compose
into one 4x4 matrix on homogeneous RGB. No per-sample loop, no custom ops, gradients flow to the
input. One deliberate difference: a float `p` of 0 returns the images untouched, where NVlabs
still runs the geometric step's filter round trip (an identity up to float rounding).

`p` may be a Python float (a constant or a schedule's current value) or a 0-d tensor on the
device (adaptive `p` updated without host syncs). Host syncs: none. A float `p` stays a Python
scalar folded into the kernels (`rand < p`), never a tensor made from it (a host->device copy per
call); the constant gray axis is made once per device and reused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from distgan.gan.augment_presets import ALL_OPS, BGC_OPS, BLIT_OPS, GEOMETRIC_OPS
from distgan.gan.resample import single_warp, supersampled_warp

# Strengths as in NVlabs' AugmentPipe defaults.
XINT_MAX = 0.125  # integer translation, fraction of the image side
SCALE_STD = 0.2  # log2 std of isotropic scaling
ROTATE_MAX = 1.0  # rotation range, fraction of a half turn
ANISO_STD = 0.2  # log2 std of anisotropic scaling
XFRAC_STD = 0.125  # fractional translation std, fraction of the image side
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2
HUE_MAX = 1.0  # fraction of a half turn
SATURATION_STD = 1.0  # log2
CUTOUT_SIZE = 0.5  # side of the cutout square, fraction of the image side


def _eye(n: int, size: int, device: torch.device) -> Tensor:
    return torch.eye(size, device=device).expand(n, size, size).clone()


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    m = _eye(sx.shape[0], 3, sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    m = _eye(tx.shape[0], 3, tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _rotate2d(theta: Tensor) -> Tensor:
    m = _eye(theta.shape[0], 3, theta.device)
    c, s = torch.cos(theta), torch.sin(theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


def _translate3d(t: Tensor) -> Tensor:
    m = _eye(t.shape[0], 4, t.device)
    m[:, :3, 3] = t.unsqueeze(1)
    return m


def _scale3d(s: Tensor) -> Tensor:
    m = _eye(s.shape[0], 4, s.device)
    m[:, 0, 0] = m[:, 1, 1] = m[:, 2, 2] = s
    return m


def _rotate3d(axis: Tensor, theta: Tensor) -> Tensor:
    """Rotation by theta around the unit vector `axis` (Rodrigues), as (N, 4, 4)."""
    x, y, z = axis
    c, s = torch.cos(theta), torch.sin(theta)
    cc = 1 - c
    m = _eye(theta.shape[0], 4, theta.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s
    m[:, 2, 0], m[:, 2, 1], m[:, 2, 2] = z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c
    return m


class AugmentPipe:
    """The bgc pipeline: `pipe(images)` with images (N, C, H, W) in [-1, 1], C in {1, 3}.

    `p` is the overall probability (float or 0-d tensor). `ops` names the ops that run, each with
    probability p (a tuple), or maps each to its probability multiplier (op runs with probability
    multiplier x p; 0 or absent: not at all), as NVlabs' AugmentPipe keyword arguments.
    `generator` (optional) makes the draws reproducible: two pipes with generators in the same
    state give the same output, on any rank. Without one, draws come from torch's global RNG on
    the images' device. `supersample` (default, NVlabs'): the warp at 2x between sym6 filters;
    False: sampled once (`loss.augment_supersample=false`, ~10x cheaper on CPU, aliases).
    """

    def __init__(self, p: float | Tensor = 0.0, ops: tuple[str, ...] | Mapping[str, float] = BGC_OPS,
                 generator: torch.Generator | None = None, supersample: bool = True):
        mult = dict(ops) if isinstance(ops, Mapping) else {op: 1.0 for op in ops}
        unknown = sorted(set(mult) - set(ALL_OPS))
        if unknown:
            raise ValueError(f"Unknown augmentation ops {unknown}; choose from {', '.join(ALL_OPS)}")
        self.p = p
        self.mult = {op: float(m) for op, m in mult.items() if m > 0}
        self.ops = frozenset(self.mult)
        self.generator = generator
        self.warp = supersampled_warp if supersample else single_warp
        self._luma: dict[torch.device, Tensor] = {}  # the gray axis per device, made once (no copy per call)

    def __call__(self, images: Tensor) -> Tensor:
        if isinstance(self.p, (int, float)) and self.p <= 0:
            return images
        if images.dim() != 4:
            raise ValueError(f"AugmentPipe expects images of shape (N, C, H, W), got {tuple(images.shape)}")
        dtype = images.dtype
        x = images.float()  # matrices and sampling in fp32 under bf16/fp16 autocast
        x = self._geometric(x)
        x = self._color(x)
        if "cutout" in self.ops:
            x = self._cutout(x)
        return x.to(dtype)

    # ------------------------------------------------------------------ random draws
    def _rand(self, n: int, device: torch.device, *shape: int) -> Tensor:
        dev = self.generator.device if self.generator is not None else device
        return torch.rand((n, *shape), generator=self.generator, device=dev).to(device)

    def _randn(self, n: int, device: torch.device, *shape: int) -> Tensor:
        dev = self.generator.device if self.generator is not None else device
        return torch.randn((n, *shape), generator=self.generator, device=dev).to(device)

    def _prob(self, op: str) -> float | Tensor:
        """multiplier x p: a float for a float p, a device tensor for a tensor p (no host sync)."""
        m = self.mult[op]
        return self.p if m == 1 else self.p * m

    def _gate(self, value: Tensor, identity: float, op: str, p: float | Tensor | None = None) -> Tensor:
        """`value` where a U(0,1) draw falls below `op`'s probability (or `p`), else the op's
        identity value."""
        n = value.shape[0]
        keep = self._rand(n, value.device) < (self._prob(op) if p is None else p)
        keep = keep.view(n, *([1] * (value.dim() - 1)))
        return torch.where(keep, value, torch.full_like(value, identity))

    # ------------------------------------------------------------------ geometric
    def _geometric(self, x: Tensor) -> Tensor:
        """The blit and geometric ops as NVlabs draws and composes them: one matrix per sample
        from output to input pixel coordinates (centred on the image), each op right-multiplying
        the inverse of its transform; then the 2x supersampled warp (`distgan.gan.resample`)."""
        n, _, h, w = x.shape
        dev, ops = x.device, self.ops
        if not (set(BLIT_OPS + GEOMETRIC_OPS) & ops):
            return x
        m = _eye(n, 3, dev)
        if "xflip" in ops:
            flip = self._gate(torch.floor(self._rand(n, dev) * 2), 0.0, "xflip")
            m = m @ _scale2d(1 - 2 * flip, torch.ones_like(flip))  # its own inverse
        if "rotate90" in ops:
            quarter = self._gate(torch.floor(self._rand(n, dev) * 4), 0.0, "rotate90")
            m = m @ _rotate2d(math.pi / 2 * quarter)  # inverse of a turn by -quarter x 90 degrees
        if "xint" in ops:
            t = self._gate((self._rand(n, dev, 2) * 2 - 1) * XINT_MAX, 0.0, "xint")
            m = m @ _translate2d(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h))  # whole pixels
        if "scale" in ops:
            s = self._gate(torch.exp2(self._randn(n, dev) * SCALE_STD), 1.0, "scale")
            m = m @ _scale2d(1 / s, 1 / s)
        # Rotation is split around the anisotropic scaling (as NVlabs): each half applied with
        # 1 - sqrt(1 - p_rotate), so that "any rotation" happens with probability p_rotate.
        p_rot = self._rotation_p() if "rotate" in ops else 0.0
        if "rotate" in ops:
            m = m @ _rotate2d(self._gate((self._rand(n, dev) * 2 - 1) * math.pi * ROTATE_MAX, 0.0, "rotate", p_rot))
        if "aniso" in ops:
            s = self._gate(torch.exp2(self._randn(n, dev) * ANISO_STD), 1.0, "aniso")
            m = m @ _scale2d(1 / s, s)
        if "rotate" in ops:
            m = m @ _rotate2d(self._gate((self._rand(n, dev) * 2 - 1) * math.pi * ROTATE_MAX, 0.0, "rotate", p_rot))
        if "xfrac" in ops:
            t = self._gate(self._randn(n, dev, 2) * XFRAC_STD, 0.0, "xfrac")
            m = m @ _translate2d(-t[:, 0] * w, -t[:, 1] * h)
        return self.warp(x, m)

    def _rotation_p(self) -> float | Tensor:
        """1 - sqrt(1 - multiplier x p): the probability of each of the two rotation halves. A
        float `p` gives a float (folded into the gate's comparison), a device tensor a device
        tensor."""
        p = self._prob("rotate")
        if isinstance(p, Tensor):
            return 1 - torch.sqrt(torch.clamp(1 - p.float(), min=0))
        return 1 - math.sqrt(max(1 - float(p), 0.0))

    def _gray_axis(self, device: torch.device) -> Tensor:
        """The unit gray axis (1, 1, 1, 0) / sqrt(3) in homogeneous RGB, on `device`."""
        luma = self._luma.get(device)
        if luma is None:
            luma = self._luma[device] = (torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)).to(device)
        return luma

    # ------------------------------------------------------------------ color
    def _color(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        dev, ops = x.device, self.ops
        if not ({"brightness", "contrast", "lumaflip", "hue", "saturation"} & ops):
            return x
        luma = self._gray_axis(dev)
        luma_outer = torch.outer(luma, luma)
        m = _eye(n, 4, dev)
        if "brightness" in ops:
            b = self._gate(self._randn(n, dev) * BRIGHTNESS_STD, 0.0, "brightness")
            m = _translate3d(b) @ m
        if "contrast" in ops:
            s = self._gate(torch.exp2(self._randn(n, dev) * CONTRAST_STD), 1.0, "contrast")
            m = _scale3d(s) @ m
        # Mirror colors through the gray axis; on one channel that negates the image (NVlabs
        # applies it whatever the channel count: its gray path keeps the matrix's mean row sum).
        if "lumaflip" in ops:
            i = self._gate(torch.floor(self._rand(n, dev) * 2), 0.0, "lumaflip")
            m = (torch.eye(4, device=dev) - 2 * luma_outer * i.view(n, 1, 1)) @ m
        if c == 3 and "hue" in ops:
            theta = self._gate((self._rand(n, dev) * 2 - 1) * math.pi * HUE_MAX, 0.0, "hue")
            m = _rotate3d(luma[:3], theta) @ m
        if c == 3 and "saturation" in ops:
            s = self._gate(torch.exp2(self._randn(n, dev) * SATURATION_STD), 1.0, "saturation")
            m = (luma_outer + (torch.eye(4, device=dev) - luma_outer) * s.view(n, 1, 1)) @ m
        flat = x.reshape(n, c, -1)
        if c == 3:
            out = m[:, :3, :3] @ flat + m[:, :3, 3:]
        else:  # gray: the mean effect of the matrix on a gray pixel (brightness, contrast, luma flip)
            out = flat * m[:, :3, :3].sum(dim=2).mean(dim=1).view(n, 1, 1) + m[:, :3, 3].mean(dim=1).view(n, 1, 1)
        return out.reshape(x.shape)

    # ------------------------------------------------------------------ cutout
    def _cutout(self, x: Tensor) -> Tensor:
        """NVlabs' cutout: with probability multiplier x p, zero a rectangle of CUTOUT_SIZE x the
        image side centred at a uniform position (pixels whose centre is closer to it than half
        the size in both axes; the rectangle may be clipped by the image edge)."""
        n, _, h, w = x.shape
        dev = x.device
        size = self._gate(torch.full((n, 1), CUTOUT_SIZE, device=dev), 0.0, "cutout")  # 0: no cutout
        center = self._rand(n, dev, 2)
        dx = (torch.arange(w, device=dev) + 0.5) / w - center[:, 0:1]  # (N, W)
        dy = (torch.arange(h, device=dev) + 0.5) / h - center[:, 1:2]  # (N, H)
        keep = (dy.abs() >= size / 2).unsqueeze(2) | (dx.abs() >= size / 2).unsqueeze(1)  # (N, H, W)
        return x * keep.unsqueeze(1).to(x.dtype)


__all__ = ["ALL_OPS", "AugmentPipe", "BGC_OPS"]
