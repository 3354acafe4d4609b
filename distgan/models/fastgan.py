"""FastGAN's generator (Liu et al., "Towards Faster and Stabilized GAN Training for High-fidelity
Few-shot Image Synthesis", ICLR 2021), as Projected GAN ports it (`pg_modules/networks_fastgan.py`,
variant `fastgan`), for any power-of-two resolution 16..256.

Channel layout: the reference's ``nfc[r] = nfc_multi[r] * ngf`` with
``nfc_multi = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5}``; ``model.g_width`` *is* ngf (a
map at resolution r has ``int(nfc_multi[r] * g_width)`` channels, at least 1). The FastGAN paper's
code uses ngf=64, distgan's default g_width (with ``model.z_dim=256``, its nz, that is the paper's
generator: about 29.1M parameters at 256 px); Projected GAN's `fastgan` uses ngf=128. Unlike
DCGAN's, the layout is fixed per resolution and does not grow with the output size: a 32 px
FastGAN has the same 4..32 px maps as the first stages of a 256 px one.

G: z normalized by its second moment (Projected GAN's addition) -> 4x4 transposed conv (a linear
   layer on the 1x1 map) to 2 x nfc[4] channels, norm, GLU -> one up block per resolution 8..R ->
   3x3 conv to the image channels -> tanh (images in [-1, 1], distgan's convention).
   Up blocks (nearest 2x upsampling, then gated 3x3 convs: conv to 2 x out channels, norm, GLU),
   alternating as in the paper's code: `UpBlockComp` (two convs, each followed by noise injection
   before its norm) into 8, 32 and 128 px, `UpBlock` (one conv, no noise) into 16, 64 and 256 px.
   Skip-layer excitation (SLE) gates the channels of the 64, 128 and 256 px maps from the 4, 8
   and 16 px ones (adaptive 4x4 average pool, 4x4 conv, swish, 1x1 conv, sigmoid), where that
   target exists: a 16 or 32 px FastGAN has none.
   Left out: the auxiliary 128 px output (`to_128`), which only feeds FastGAN's own discriminator.
Norm: ``model.g_norm`` through ``make_g_norm`` (``batch``: BatchNorm as the reference; ``none``: a
   per-channel affine). Conditional (num_classes > 0): distgan's conditional batch norm (per-class
   gain and bias) in every norm layer, not the reference's conditional variant (BigGAN-style CCBN
   fed by a shared class embedding), so conditioning, fine-tuning (``model.reinit_class_embedding``)
   and ``g_norm=none`` work as in the other archs.
Noise: per-pixel noise of learned strength (zero at init), ``G.noise_mode`` as StyleGAN2's:
   ``random`` (fresh noise each forward, the reference), ``const`` (fixed noise images: one latent,
   one image) or ``none``. ``none`` leaves the strengths out of the graph, so it is for sampling,
   not for DDP training (whose reducer wants a gradient for every parameter).
Init (the reference's ``weights_init``): N(0, 0.02) conv weights, zero conv biases, norm gains
   N(1, 0.02) (per class when conditional, so labels change the output from the start) and biases
   0; then spectral norm on every conv (the reference spectral-normalizes all of G's convs), which
   keeps the embeddings of conditional batch norm plain.
D: FastGAN's own discriminator (with its self-supervised reconstruction decoders) is not ported;
   ``model.arch=fastgan`` pairs this G with distgan's DCGAN discriminator (``model.d_width``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distgan.models.dcgan import DCGANDiscriminator, dcgan_init
from distgan.models.layers import (ConditionalBatchNorm2d, PlainNorm2d, apply_spectral_norm, check_labels,
                                   make_g_norm, reset_g_norms)
from distgan.models.registry import ModelSettings, register_arch

CHANNEL_MULTIPLIERS: dict[int, float] = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5}
"""The reference's nfc_multi: channels at resolution r per unit of ngf (``model.g_width``)."""
EXCITATIONS: tuple[tuple[int, int], ...] = ((4, 64), (8, 128), (16, 256))
"""Skip-layer excitations as (source, target) resolutions."""
NOISE_MODES = ("random", "const", "none")


def fastgan_widths(resolution: int, width: int) -> dict[int, int]:
    """Channels of the feature map at each resolution 4..R for ngf = ``width`` (module docstring)."""
    return {r: max(1, int(m * width)) for r, m in CHANNEL_MULTIPLIERS.items() if r <= resolution}


def is_comp_stage(resolution: int) -> bool:
    """The paper's code builds 8, 32, 128 (and 512) px with the two-conv `UpBlockComp`."""
    return int(math.log2(resolution)) % 2 == 1


class NoiseInjection(nn.Module):
    """Adds per-pixel noise (one channel, broadcast) scaled by a learned strength, zero at init."""

    def __init__(self, resolution: int):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1))  # not 0-d: ZeRO cannot flatten 0-d parameters
        self.register_buffer("const", torch.randn(resolution, resolution))

    def forward(self, x: Tensor, mode: str) -> Tensor:
        if mode == "random":
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        elif mode == "const":
            noise = self.const.to(x.dtype)
        elif mode == "none":
            return x
        else:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {mode!r}")
        return x + noise * self.strength.to(x.dtype)


class GatedConv(nn.Module):
    """3x3 conv to twice the output channels, [noise], norm, GLU (half the channels gate the other half)."""

    def __init__(self, cin: int, cout: int, num_classes: int, g_norm: str, noise_resolution: int = 0):
        super().__init__()
        # No bias: the norm layer after it has its own (BN would subtract a conv bias again).
        self.conv = nn.Conv2d(cin, 2 * cout, 3, 1, 1, bias=False)
        self.noise = NoiseInjection(noise_resolution) if noise_resolution else None
        self.norm = make_g_norm(2 * cout, num_classes, g_norm)

    def forward(self, x: Tensor, labels: Tensor | None, noise_mode: str) -> Tensor:
        h = self.conv(x)
        if self.noise is not None:
            h = self.noise(h, noise_mode)
        return F.glu(self.norm(h, labels), dim=1)


class UpBlock(nn.Module):
    """Nearest 2x upsampling, then one gated conv (`UpBlock`) or two with noise (`UpBlockComp`)."""

    def __init__(self, cin: int, cout: int, resolution: int, num_classes: int, g_norm: str, comp: bool):
        super().__init__()
        noise = resolution if comp else 0
        self.convs = nn.ModuleList([GatedConv(cin, cout, num_classes, g_norm, noise)])
        if comp:
            self.convs.append(GatedConv(cout, cout, num_classes, g_norm, noise))

    def forward(self, x: Tensor, labels: Tensor | None, noise_mode: str) -> Tensor:
        h = F.interpolate(x, scale_factor=2, mode="nearest")
        for conv in self.convs:
            h = conv(h, labels, noise_mode)
        return h


class SkipExcitation(nn.Module):
    """SLE: per-channel gates in (0, 1) for a high-resolution map, computed from a low-resolution one."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, cout, 4, 1, 0, bias=False)  # the pooled 4x4 map -> 1x1
        self.excite = nn.Conv2d(cout, cout, 1, 1, 0, bias=False)

    def forward(self, small: Tensor, big: Tensor) -> Tensor:
        gates = self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(small, 4)))).sigmoid()
        return big * gates


def _norm_gain(norm: nn.Module) -> Tensor:
    """The gain tensor of a G norm layer (BN weight, plain gain, or the per-class gain table)."""
    if isinstance(norm, ConditionalBatchNorm2d):
        return norm.gain.weight
    return norm.bn.weight if norm.bn is not None else norm.gain


def fastgan_init(module: nn.Module) -> None:
    """The reference's weights_init: N(0, 0.02) convs (zero biases), norm gains N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    reset_g_norms(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (ConditionalBatchNorm2d, PlainNorm2d)):
                _norm_gain(m).normal_(1.0, 0.02)


class FastGANGenerator(nn.Module):
    """FastGAN generator (module docstring); ``width`` is the reference's ngf."""

    def __init__(self, z_dim: int, resolution: int, channels: int, width: int, num_classes: int = 0,
                 g_norm: str = "batch"):
        super().__init__()
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.num_classes = num_classes
        self.noise_mode = "random"
        widths = fastgan_widths(resolution, width)
        self.input = nn.ConvTranspose2d(z_dim, 2 * widths[4], 4, 1, 0, bias=False)  # 1x1 -> 4x4
        self.input_norm = make_g_norm(2 * widths[4], num_classes, g_norm)
        self.stages = [r for r in widths if r > 4]  # 8, 16, ..., R
        self.ups = nn.ModuleList(UpBlock(widths[r // 2], widths[r], r, num_classes, g_norm, is_comp_stage(r))
                                 for r in self.stages)
        # Keyed by the target resolution (ModuleDict keys are strings).
        self.excitations = nn.ModuleDict({str(big): SkipExcitation(widths[small], widths[big])
                                          for small, big in EXCITATIONS if big <= resolution})
        self.to_image = nn.Conv2d(widths[resolution], channels, 3, 1, 1)
        fastgan_init(self)
        for conv in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]:
            apply_spectral_norm(conv)  # per conv: the CBN embeddings stay unnormalized

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, z.shape[0], "FastGAN generator")
        z = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # onto the sphere of radius sqrt(z_dim)
        h = F.glu(self.input_norm(self.input(z.view(z.shape[0], self.z_dim, 1, 1)), y), dim=1)
        features = {4: h}  # the SLE sources (4, 8, 16 px) are read from here
        for r, up in zip(self.stages, self.ups):
            h = up(h, y, self.noise_mode)
            key = str(r)
            if key in self.excitations:
                h = self.excitations[key](features[r // 16], h)
            features[r] = h
        return self.to_image(h).tanh()


@register_arch("fastgan", d_blocks="convs")  # D is DCGAN's: FreezeD counts its strided convs
def build_fastgan(cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """FastGAN's G with distgan's DCGAN D, built as the dcgan builder builds it (G first, then D)."""
    g = FastGANGenerator(cfg.z_dim, resolution, channels, cfg.g_width, num_classes, cfg.g_norm)
    g.noise_mode = cfg.noise_mode
    d = DCGANDiscriminator(resolution, channels, cfg.d_width, num_classes)
    dcgan_init(d)
    return g, d


__all__ = ["FastGANGenerator", "build_fastgan", "fastgan_widths", "SkipExcitation", "UpBlock"]
