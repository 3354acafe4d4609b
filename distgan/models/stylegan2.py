"""StyleGAN2 (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020) in
plain PyTorch, following NVlabs' stylegan2-ada-pytorch (config F: 'skip' G, 'resnet' D); the
layers (equalized lr, modulated conv, [1,3,3,1] resampling, minibatch std) live in
`stylegan2_layers`.

- Mapping: z normalized by its second moment (conditional: a class embedding, normalized too,
  concatenated), `model.mapping_layers` equalized-lr FC layers with leaky ReLU and lr multiplier
  0.01, giving w, broadcast to `num_ws` rows: ws (N, num_ws, w_dim). The buffer `w_avg` tracks
  w's moving average (beta 0.995) in training mode; truncation pulls ws towards it. The trainer's
  EMA copies buffers from G, so the EMA generator truncates towards the trained average.
- Synthesis: a learned 4x4 constant, then one block per resolution: two modulated 3x3 convs (the
  first upsamples; the 4x4 block has one), each followed by per-pixel noise of learned strength
  (zero at init), bias and leaky ReLU; a ToRGB (modulated 1x1 conv, no demodulation) per block,
  summed over blocks through [1,3,3,1] upsampling (img = up(img) + torgb(x)). Block 4x4 uses
  ws[:, 0:2]; block i > 0 uses ws[:, 2i-1 : 2i+2] (its ToRGB shares a row with the next block's
  first conv), so num_ws = 2 x blocks. Output not squashed: images are clamped when saved.
- Noise: `G.noise_mode` is `random` (fresh torch.randn each forward), `const` (fixed buffers, for
  deterministic outputs) or `none`.
- Style mixing (`model.style_mixing_prob`, training mode only): with that probability per batch a
  second latent (same labels, no w_avg update) replaces ws[:, cutoff:], cutoff uniform in
  [1, num_ws), one cutoff for the whole batch (NVlabs). Written with tensor ops (no host sync).
- D: FromRGB at full resolution, residual blocks (two 3x3 convs, the second blur-downsampling,
  plus a 1x1 downsampling skip, summed with gain sqrt(0.5)), then the epilogue: minibatch std
  (`model.mbstd_group`, groups laid out as `model.mbstd_layout`), 3x3 conv, FC, output FC.
  Conditional D projects the output on a mapped class embedding (cmap), from its own mapping
  network of `model.d_mapping_layers` (NVlabs: 8, whatever G's depth).
- Precision: `model.lowp_stages=K > 0` runs only the K highest-resolution blocks of G and D under
  the ambient autocast dtype; under autocast the rest (mapping, G's 4x4 block, lower blocks, D's
  epilogue) runs in fp32, as NVlabs' num_fp16_res. K=-1 (the default) is NVlabs' 4; K=0:
  everything follows the ambient autocast.
  In every case G's image path (the skip sum over blocks) is fp32 and so is G's output; modulated
  convs take their demodulation coefficients in fp32 and pre-normalize in fp16 (`modulated_conv2d`).
  `model.conv_clamp` clamps every conv's activations (NVlabs: 256 with num_fp16_res=4).

Widths: `stage_widths` from r3gan (`model.widths`, or g_width/d_width x min(8, R / r)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distgan.models.layers import check_labels
from distgan.models.r3gan import stage_widths
from distgan.models.registry import ModelSettings, register_arch
from distgan.models.stylegan2_layers import (Conv, FullyConnected, MinibatchStd, autocast_off, bias_act, fir_filter, modulated_conv2d,
                                             upsample2d)

RESOLUTIONS = (16, 32, 64, 128, 256, 512, 1024)
MAPPING_LR = 0.01
W_AVG_BETA = 0.995
NOISE_MODES = ("random", "const", "none")
SKIP_GAIN = math.sqrt(0.5)


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _in_fp32_if_forced(force_fp32: bool, forward, *args):
    """`forward(*args)`; a module kept in fp32 (`lowp_stages`) under an active autocast runs with
    autocast off and its floating-point tensor arguments cast to fp32."""
    device = next(a for a in args if isinstance(a, Tensor)).device.type
    if not (force_fp32 and torch.is_autocast_enabled(device)):
        return forward(*args)
    with torch.autocast(device, enabled=False):
        return forward(*(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args))


class MappingNetwork(nn.Module):
    """z (and labels) -> w (N, w_dim), or ws (N, num_ws, w_dim) when `num_ws`; z_dim=0: labels only
    (D's class map). `w_avg` exists iff `track_w_avg`."""

    def __init__(self, z_dim: int, num_classes: int, w_dim: int, num_ws: int | None, layers: int,
                 track_w_avg: bool = True):
        super().__init__()
        self.z_dim, self.num_classes, self.w_dim, self.num_ws = z_dim, num_classes, w_dim, num_ws
        self.force_fp32 = False
        embed = w_dim if num_classes else 0
        self.embed = FullyConnected(num_classes, embed) if num_classes else None  # on one-hot labels
        if self.embed is not None:
            self.embed.is_class_embedding = True  # sized by the class count: `model.reinit_class_embedding` resets it
        dims = [z_dim + embed] + [w_dim] * layers
        self.layers = nn.ModuleList(FullyConnected(dims[i], dims[i + 1], act=True, lr_multiplier=MAPPING_LR)
                                    for i in range(layers))
        if track_w_avg:
            self.register_buffer("w_avg", torch.zeros(w_dim))
        else:
            self.w_avg = None

    def forward(self, z: Tensor | None, labels: Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_w_avg: bool = False) -> Tensor:
        """`update_w_avg`: move `w_avg` towards this batch's mean w (training mode only).
        Truncation: ws = lerp(w_avg, ws, psi), on the first `truncation_cutoff` rows if given."""
        return _in_fp32_if_forced(self.force_fp32, self._forward, z, labels, truncation_psi, truncation_cutoff,
                                  update_w_avg)

    def _forward(self, z, labels, truncation_psi, truncation_cutoff, update_w_avg) -> Tensor:
        batch = z.shape[0] if z is not None else labels.shape[0] if labels is not None else 0
        y = check_labels(labels, self.num_classes, batch, "StyleGAN2 mapping network")
        parts = [normalize_2nd_moment(z)] if self.z_dim else []
        if y is not None:
            dtype = z.dtype if z is not None else self.embed.weight.dtype
            # One-hot by scatter: F.one_hot reads the labels' max back to the host on CPU (a sync
            # per step); scatter range-checks indices as nn.Embedding does.
            one_hot = torch.zeros(y.shape[0], self.num_classes, dtype=dtype, device=y.device)
            parts.append(normalize_2nd_moment(self.embed(one_hot.scatter_(1, y.unsqueeze(1), 1.0))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)
        if update_w_avg and self.training and self.w_avg is not None:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).to(self.w_avg.dtype).lerp(self.w_avg, W_AVG_BETA))
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).expand(-1, self.num_ws, -1)
        if truncation_psi != 1:
            avg = self.w_avg.to(x.dtype)
            if truncation_cutoff is None:
                x = avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (up=2: upsampling), noise, bias, leaky ReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, up: int = 1, conv_clamp: float = 0.0):
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.affine = FullyConnected(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))  # demodulation makes its scale moot
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros(1))  # not 0-d: ZeRO cannot flatten 0-d parameters
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("fir", fir_filter(), persistent=False)

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", gain: float = 1.0) -> Tensor:
        # Training: the unfused form (one batched conv; NVlabs trains this way too), sampling: fused.
        x = modulated_conv2d(x, self.weight, self.affine(w), up=self.up, fir=self.fir, fused=not self.training)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength.to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        return bias_act(x, self.bias, True, gain, self.conv_clamp * gain)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, no demodulation (styles scaled by 1/sqrt(fan_in))."""

    def __init__(self, cin: int, channels: int, w_dim: int, conv_clamp: float = 0.0):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(channels, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.weight_gain = 1 / math.sqrt(cin)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False, fused=not self.training)
        return bias_act(x, self.bias, False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | upsampling conv0), conv1, ToRGB added to the upsampled image."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, channels: int, conv_clamp: float):
        super().__init__()
        self.resolution, self.force_fp32 = resolution, False
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(cin, cout, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(cout, cout, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(cout, channels, w_dim, conv_clamp)
        self.num_conv = 1 if cin == 0 else 2
        self.register_buffer("fir", fir_filter(), persistent=False)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str):
        return _in_fp32_if_forced(self.force_fp32, self._forward, x, img, ws, noise_mode)

    def _forward(self, x, img, ws, noise_mode):
        w = ws.unbind(dim=1)
        if self.conv0 is None:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x.to(ws.dtype), w[0], noise_mode)
        x = self.conv1(x, w[self.num_conv - 1], noise_mode)
        return x, add_to_image(img, self.torgb(x, w[self.num_conv]), self.fir)


def add_to_image(img: Tensor | None, rgb: Tensor, fir: Tensor) -> Tensor:
    """The skip path: the image so far, upsampled, plus this block's ToRGB output, in fp32
    whatever the block's precision (NVlabs: ToRGB convolves in the block's dtype, the sum is fp32).
    Otherwise the image passes through the lowp blocks' bf16/fp16 and G's output is low precision."""
    rgb = rgb.float()
    if img is None:
        return rgb
    with autocast_off(rgb.device.type):  # upsample2d is a conv: keep it out of autocast
        return upsample2d(img.float(), fir) + rgb


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, resolution: int, channels: int, widths: list[int], conv_clamp: float = 0.0):
        super().__init__()
        self.noise_mode = "random"
        self.blocks = nn.ModuleList(
            SynthesisBlock(widths[i - 1] if i else 0, widths[i], w_dim, 4 * 2**i, channels, conv_clamp)
            for i in range(len(widths)))
        self.num_ws = 2 * len(self.blocks)

    def forward(self, ws: Tensor, noise_mode: str | None = None) -> Tensor:
        """ws (N, num_ws, w_dim) -> images (N, C, R, R); `noise_mode` None: `self.noise_mode`."""
        mode = noise_mode or self.noise_mode
        x = img = None
        start = 0
        for block in self.blocks:
            x, img = block(x, img, ws.narrow(1, start, block.num_conv + 1), mode)
            start += block.num_conv
        return img


class StyleGAN2Generator(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, resolution: int, channels: int, widths: list[int],
                 num_classes: int = 0, mapping_layers: int = 8, style_mixing_prob: float = 0.0,
                 lowp_stages: int = 0, conv_clamp: float = 0.0):
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.resolution, self.channels, self.style_mixing_prob = resolution, channels, style_mixing_prob
        self.synthesis = SynthesisNetwork(w_dim, resolution, channels, widths, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, self.num_ws, mapping_layers)
        if lowp_stages > 0:  # the 4x4 block stays fp32, as NVlabs' num_fp16_res
            self.mapping.force_fp32 = True
            for i, block in enumerate(self.synthesis.blocks):
                block.force_fp32 = i == 0 or i < len(self.synthesis.blocks) - lowp_stages

    @property
    def noise_mode(self) -> str:
        return self.synthesis.noise_mode

    @noise_mode.setter
    def noise_mode(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {mode!r}")
        self.synthesis.noise_mode = mode

    def forward(self, z: Tensor, labels: Tensor | None = None, truncation_psi: float = 1.0, return_ws: bool = False,
                truncation_cutoff: int | None = None):
        """Images (N, C, R, R), or (images, ws) with `return_ws`: ws is what synthesis consumed
        (after mixing and truncation), e.g. for the path-length penalty's autograd.grad."""
        if return_ws:
            return self._forward_with_ws(z, labels, truncation_psi, truncation_cutoff)
        return self._forward(z, labels, truncation_psi, truncation_cutoff)[0]

    @torch.compiler.disable
    def _forward_with_ws(self, z, labels, truncation_psi, truncation_cutoff) -> tuple[Tensor, Tensor]:
        """Eager even inside torch.compile: a compiled graph hides its intermediates (ws would not
        be in the autograd graph) and does not support the double backward of the path-length
        penalty, which calls this (lazily, so running it eager costs little)."""
        return self._forward(z, labels, truncation_psi, truncation_cutoff)

    def _forward(self, z, labels, truncation_psi, truncation_cutoff) -> tuple[Tensor, Tensor]:
        ws = self.mapping(z, labels, truncation_psi, truncation_cutoff, update_w_avg=True)
        if self.training and self.style_mixing_prob > 0:
            ws = self._mix(ws, z, labels, truncation_psi, truncation_cutoff)
        return self.synthesis(ws), ws

    def _mix(self, ws: Tensor, z: Tensor, labels, truncation_psi: float, truncation_cutoff) -> Tensor:
        n = ws.shape[1]
        cutoff = torch.randint(1, n, (), device=ws.device)
        cutoff = torch.where(torch.rand((), device=ws.device) < self.style_mixing_prob, cutoff, n)
        other = self.mapping(torch.randn_like(z), labels, truncation_psi, truncation_cutoff)
        later = torch.arange(n, device=ws.device).view(1, n, 1) >= cutoff
        return torch.where(later, other.to(ws.dtype), ws)


class DiscriminatorBlock(nn.Module):
    """(FromRGB,) conv3x3, blur-downsampling conv3x3, plus a 1x1 downsampling skip; x sqrt(0.5)."""

    def __init__(self, cin: int, cout: int, channels: int = 0, conv_clamp: float = 0.0):
        super().__init__()
        self.force_fp32 = False
        self.from_rgb = Conv(channels, cin, 1, conv_clamp=conv_clamp) if channels else None
        self.conv0 = Conv(cin, cin, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv(cin, cout, 3, down=2, conv_clamp=conv_clamp)
        self.skip = Conv(cin, cout, 1, act=False, bias=False, down=2)

    def forward(self, x: Tensor) -> Tensor:
        return _in_fp32_if_forced(self.force_fp32, self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.from_rgb is not None:
            x = self.from_rgb(x)
        return self.skip(x, gain=SKIP_GAIN) + self.conv1(self.conv0(x), gain=SKIP_GAIN)


class DiscriminatorEpilogue(nn.Module):
    """Minibatch std, conv3x3, FC, output FC (1 logit or a cmap_dim vector projected on cmap)."""

    def __init__(self, cin: int, cmap_dim: int, mbstd_group: int, conv_clamp: float = 0.0,
                 mbstd_layout: str = "strided"):
        super().__init__()
        self.cmap_dim, self.force_fp32 = cmap_dim, False
        self.mbstd = MinibatchStd(mbstd_group, mbstd_layout)
        self.conv = Conv(cin + 1, cin, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(cin * 16, cin, act=True)
        self.out = FullyConnected(cin, cmap_dim or 1)

    def forward(self, x: Tensor, cmap: Tensor | None) -> Tensor:
        return _in_fp32_if_forced(self.force_fp32, self._forward, x, cmap)

    def _forward(self, x: Tensor, cmap: Tensor | None) -> Tensor:
        x = self.out(self.fc(self.conv(self.mbstd(x)).flatten(1)))
        if cmap is not None:
            x = (x * cmap.to(x.dtype)).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x.view(x.shape[0])


class StyleGAN2Discriminator(nn.Module):
    def __init__(self, resolution: int, channels: int, widths: list[int], num_classes: int = 0,
                 mapping_layers: int = 8, mbstd_group: int = 4, lowp_stages: int = 0, conv_clamp: float = 0.0,
                 mbstd_layout: str = "strided"):
        """`mapping_layers`: depth of the conditional D's class-embedding map (NVlabs: 8)."""
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        widths = list(reversed(widths))  # output resolution first, 4x4 last
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(widths[i], widths[i + 1], channels if i == 0 else 0, conv_clamp)
            for i in range(len(widths) - 1))
        cmap_dim = widths[-1] if num_classes else 0
        self.mapping = (MappingNetwork(0, num_classes, cmap_dim, None, mapping_layers, track_w_avg=False)
                        if num_classes else None)
        self.epilogue = DiscriminatorEpilogue(widths[-1], cmap_dim, mbstd_group, conv_clamp, mbstd_layout)
        if lowp_stages > 0:
            for i, block in enumerate(self.blocks):
                block.force_fp32 = i >= lowp_stages
            self.epilogue.force_fp32 = True
            if self.mapping is not None:
                self.mapping.force_fp32 = True

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, x.shape[0], "StyleGAN2 discriminator")
        cmap = self.mapping(None, y) if y is not None else None
        for block in self.blocks:
            x = block(x)
        return self.epilogue(x, cmap)


def discriminator_blocks(D: StyleGAN2Discriminator) -> list[nn.Module]:
    """FreezeD's blocks: the residual blocks (the first holds FromRGB), then the epilogue."""
    return [*D.blocks, D.epilogue]


NVLABS_LOWP_STAGES = 4
"""`model.lowp_stages=-1`: NVlabs' `num_fp16_res`, the same in every train.py configuration."""


@register_arch("stylegan2", resolutions=RESOLUTIONS, d_blocks=discriminator_blocks)
def build_stylegan2(cfg: ModelSettings, resolution: int, channels: int,
                    num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build the StyleGAN2 pair (G first, then D, drawing from the seeded RNG in a fixed order)."""
    lowp = NVLABS_LOWP_STAGES if cfg.lowp_stages < 0 else cfg.lowp_stages
    g = StyleGAN2Generator(cfg.z_dim, cfg.w_dim or cfg.z_dim, resolution, channels,
                           stage_widths(resolution, cfg.g_width, cfg.widths), num_classes, cfg.mapping_layers,
                           cfg.style_mixing_prob, lowp, cfg.conv_clamp)
    d = StyleGAN2Discriminator(resolution, channels, stage_widths(resolution, cfg.d_width, cfg.widths), num_classes,
                               cfg.d_mapping_layers, cfg.mbstd_group, lowp, cfg.conv_clamp,
                               cfg.mbstd_layout)
    g.noise_mode = cfg.noise_mode
    return g, d


__all__ = ["StyleGAN2Generator", "StyleGAN2Discriminator", "MappingNetwork", "SynthesisNetwork", "build_stylegan2"]
