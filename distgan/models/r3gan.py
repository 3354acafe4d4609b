"""R3GAN's networks (Huang et al., "The GAN is dead; long live the GAN! A modern GAN baseline",
NeurIPS 2024): a plain modern ConvNet, no normalization, no mapping network, no custom ops.

- Residual blocks in the ResNeXt style: 1x1 conv (widen by `expansion`), grouped 3x3 conv,
  1x1 conv back, each conv followed by a learned bias and leaky ReLU(0.2), except the last.
  With no normalization, stability comes from the initialization ("fix-up"): the last conv of
  every residual branch starts at zero (a fresh block is the identity) and the other convs are
  He-initialized with their gain scaled by L^(-1/4), L the total number of blocks, so the
  variance of the sum of residual branches stays bounded as the network deepens.
- Resampling by R3GAN's fixed [1,2,1]-derived low-pass filter ([1,3,3,1] with stride 2, written
  as bilinear upsampling and blur + 2x2 averaging), with zero edges as R3GAN's upfirdn2d
  (R3GAN/Resamplers.py: `upfirdn2d.upsample2d` / `downsample2d`), so border pixels match the
  reference and its weights reproduce its images; channels changed by a 1x1 conv on the narrow
  side of the transition.
- G starts from a learned 4x4 basis modulated per channel by a linear map of z (plus a class
  embedding when conditional) and ends with a 1x1 conv to image channels (no tanh, as R3GAN: the
  output is clamped when saved or scored).
- D starts with a 1x1 conv from the image, mirrors G's stages and ends with a depthwise 4x4 conv
  and a linear layer; conditional D projects its features on a class embedding.

Widths: `model.widths` lists channels per stage from 4x4 up to the output resolution (D uses
the list reversed); empty derives `width * min(8, R / r)` at resolution r from `g_width`/`d_width`.
Precision, as R3GAN's `FP16Stages` (its `training/networks.py` sets a `DataType` per stage): under
an active autocast only the `model.lowp_stages` highest-resolution stages of G and D run in
the autocast dtype, their input cast to it as R3GAN casts each stage's input; the others run with
autocast off in fp32, and with them G's basis and modulation (R3GAN's stage 0) and D's head (its
last stage). G's final 1x1 conv follows G's last stage and D's first 1x1 conv D's first, as
R3GAN. The default (-1) is its presets' count, min(4, stages - 1): all but the 4x4 stage up to
64 px, 32 px and up at 256; 0 lets every stage follow autocast. R1/R2's double backward runs through the same per-stage dtypes, as
R3GAN's loss, which calls D as it is. Without autocast everything follows the input's dtype:
every weight is cast to the activations' dtype in the forward pass (bf16 models work too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distgan.models.layers import check_labels
from distgan.models.registry import ModelSettings, register_arch

LEAK = 0.2
ACT_GAIN = math.sqrt(2 / (1 + LEAK**2))  # He gain for leaky ReLU(0.2)
RESOLUTIONS = (16, 32, 64, 128, 256, 512, 1024)
WIDTH_CAP = 8


def preset_lowp_stages(stages: int) -> int:
    """R3GAN's presets' bf16 stage count: 3 of 4 (CIFAR10), 4 of 5 (FFHQ-64), 4 of 7 (FFHQ-256)."""
    return min(4, stages - 1)


def lowp_stage_count(lowp_stages: int, stages: int) -> int:
    """`model.lowp_stages` as a count of low-precision stages out of `stages`: -1 R3GAN's presets,
    0 every stage (all follow autocast)."""
    if lowp_stages < 0:
        return preset_lowp_stages(stages)
    return stages if lowp_stages == 0 else min(lowp_stages, stages)


def at_stage_precision(fp32: bool, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`forward(x)` at a stage's precision. Under an active autocast an `fp32` stage runs with
    autocast off on fp32 input, a low-precision one on input cast to the autocast dtype (R3GAN's
    `x.to(self.DataType)`: the residual stream itself is bf16 there). No autocast: as it comes."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return forward(x)
    if fp32:
        with torch.autocast(device, enabled=False):
            return forward(x.float())
    return forward(x.to(torch.get_autocast_dtype(device)))


def stage_widths(resolution: int, width: int, explicit: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Channels of each stage, from 4x4 up to `resolution`."""
    n = int(math.log2(resolution)) - 1  # 4, 8, ..., resolution
    if explicit:
        if len(explicit) != n:
            raise ValueError(f"model.widths needs {n} values for resolution {resolution} (4x4 up to "
                             f"{resolution}x{resolution}), got {len(explicit)}: {list(explicit)}")
        return list(explicit)
    return [width * min(WIDTH_CAP, resolution // (4 * 2**i)) for i in range(n)]


def _he_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Weights ~ N(0, gain^2 / fan_in) (MSR/He), no bias (biases live in `BiasedLeakyReLU`)."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.normal_(0.0, gain / math.sqrt(fan_in))
    return layer


class Conv(nn.Module):
    """Bias-free conv whose weight follows the input's dtype (bf16-friendly)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, kernel, kernel))
        self.groups, self.padding = groups, (kernel - 1) // 2
        _he_init(self, gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.padding, groups=self.groups)


class BiasedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), LEAK)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), the last conv zero-initialized."""

    def __init__(self, channels: int, expansion: int, group_size: int, total_blocks: int):
        super().__init__()
        wide = channels * expansion
        groups = max(1, wide // group_size)
        # 3 convs per branch: the variance-scaling exponent is -1/(2*3 - 2) (R3GAN, Sec. 4).
        gain = ACT_GAIN * total_blocks ** (-1 / 4)
        self.widen = Conv(channels, wide, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(wide)
        self.grouped = Conv(wide, wide, 3, groups=groups, gain=gain)
        self.act2 = BiasedLeakyReLU(wide)
        self.narrow = Conv(wide, channels, 1, gain=0.0)  # a new block is the identity

    def branch(self, x: Tensor) -> Tensor:
        return self.narrow(self.act2(self.grouped(self.act1(self.widen(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _blur121(x: Tensor) -> Tensor:
    """Separable [1,2,1]/4 blur with zeros beyond the image (upfirdn2d's padding), as shifted
    adds (cheap on CPU, and differentiable twice, as R1/R2 need)."""
    x = F.pad(x, (1, 1, 1, 1))
    x = (x[..., :-2, :] + 2 * x[..., 1:-1, :] + x[..., 2:, :]) / 4
    return (x[..., :-2] + 2 * x[..., 1:-1] + x[..., 2:]) / 4


def _upsample2x_linear(x: Tensor, dim: int) -> Tensor:
    """2x linear upsampling along `dim` at half-pixel centers with zeros beyond the edges: output
    2i is x[i-1]/4 + 3x[i]/4, output 2i+1 is 3x[i]/4 + x[i+1]/4, x[-1] = x[n] = 0."""
    size = x.shape[dim]
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    before = torch.cat([zero, x.narrow(dim, 0, size - 1)], dim)
    after = torch.cat([x.narrow(dim, 1, size - 1), zero], dim)
    even, odd = 0.25 * before + 0.75 * x, 0.75 * x + 0.25 * after
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


def _edge_weights(size: int, like: Tensor) -> Tensor:
    """1 inside, 3/4 on the first and last of `size` output rows (or columns): what turns
    clamped-edge bilinear upsampling into the zero-padded one. At an edge output the clamped
    version puts weight 1 on the edge pixel, the zero-padded one 3/4 (the other 1/4 falls on a
    zero), and nothing else differs."""
    w = like.new_full((size,), 0.75)
    w.narrow(0, 1, size - 2).fill_(1.0)  # fill_ of a Python scalar: no tensor built from host data
    return w


def upsample2x_bilinear(x: Tensor) -> Tensor:
    """R3GAN's 2x upsampling: `upfirdn2d.upsample2d(x, [1,3,3,1] (x) [1,3,3,1])`, i.e. bilinear
    interpolation at half-pixel centers with zeros beyond the image (not clamped edges).

    Fast path: `F.interpolate(..., "bilinear")` (one kernel) times the edge weights. Under
    `torch.use_deterministic_algorithms(True)` (train.deterministic=true) the CUDA backward of
    bilinear interpolation raises (it accumulates with atomic adds), so the same result is built
    from slices, concatenations and sums, whose backward is deterministic everywhere."""
    if not torch.are_deterministic_algorithms_enabled():
        out = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = out.shape[-2:]
        return out * (_edge_weights(h, out).unsqueeze(-1) * _edge_weights(w, out))
    return _upsample2x_linear(_upsample2x_linear(x, x.dim() - 1), x.dim() - 2)


class Upsample(nn.Module):
    """Channels changed by a 1x1 conv at the low resolution, then 2x upsampling by the
    [1,3,3,1]/4 filter (R3GAN's [1,2,1] filter convolved with the [1,1] hold), which is exactly
    bilinear interpolation at half-pixel centers; zeros beyond the image, as upfirdn2d."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x) if self.proj is not None else x
        return upsample2x_bilinear(x)


class Downsample(nn.Module):
    """2x downsampling by the [1,3,3,1]/8 filter (= the [1,2,1] blur, then 2x2 averages) with
    zeros beyond the image (`upfirdn2d.downsample2d`, padding 1 on each side), then channels
    changed by a 1x1 conv at the low resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(_blur121(x), 2)
        return self.proj(x) if self.proj is not None else x


class R3GANGenerator(nn.Module):
    def __init__(self, z_dim: int, resolution: int, channels: int, widths: list[int], blocks: int, expansion: int,
                 group_size: int, num_classes: int = 0, lowp_stages: int = -1):
        super().__init__()
        self.z_dim, self.resolution, self.channels, self.num_classes = z_dim, resolution, channels, num_classes
        total, n = blocks * len(widths), len(widths)
        lowp = lowp_stage_count(lowp_stages, n)
        self.fp32_stages = [i < n - lowp for i in range(n)]  # the highest-resolution `lowp` follow autocast
        embed = z_dim if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed) if num_classes else None
        if self.embed is not None:  # a linear map of a one-hot label, He-initialized
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(num_classes))
        self.basis = nn.Parameter(torch.randn(widths[0], 4, 4))
        self.modulate = _he_init(nn.Linear(z_dim + embed, widths[0], bias=False))
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            layers = [] if i == 0 else [Upsample(widths[i - 1], width)]
            layers += [ResidualBlock(width, expansion, group_size, total) for _ in range(blocks)]
            self.stages.append(nn.Sequential(*layers))
        self.to_image = Conv(widths[-1], channels, 1)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, z.shape[0], "R3GAN generator")
        if y is not None:
            z = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        x = z
        for i, stage in enumerate(self.stages):
            x = at_stage_precision(self.fp32_stages[i], self._basis_and_stage if i == 0 else stage, x)
        return at_stage_precision(self.fp32_stages[-1], self.to_image, x)

    def _basis_and_stage(self, z: Tensor) -> Tensor:
        """R3GAN's stage 0: the 4x4 basis modulated by a linear map of z, then its blocks."""
        scale = self.modulate(z)
        return self.stages[0](self.basis.to(scale.dtype).unsqueeze(0) * scale.unsqueeze(-1).unsqueeze(-1))


class DiscriminatorHead(nn.Module):
    """Depthwise 4x4 conv (a learned per-channel basis) and a linear map to the logit(s)."""

    def __init__(self, channels: int, outputs: int):
        super().__init__()
        self.basis = _he_init(nn.Conv2d(channels, channels, 4, groups=channels, bias=False))
        self.linear = _he_init(nn.Linear(channels, outputs, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.basis.weight.to(x.dtype), groups=self.basis.groups)
        return F.linear(x.flatten(1), self.linear.weight.to(x.dtype))


class R3GANDiscriminator(nn.Module):
    def __init__(self, resolution: int, channels: int, widths: list[int], blocks: int, expansion: int,
                 group_size: int, num_classes: int = 0, lowp_stages: int = -1):
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        widths = list(reversed(widths))  # output resolution first, 4x4 last
        total, n = blocks * len(widths), len(widths)
        lowp = lowp_stage_count(lowp_stages, n)
        self.fp32_stages = [i >= lowp for i in range(n)]  # the first `lowp` (highest resolution) follow autocast
        self.from_image = Conv(channels, widths[0], 1)
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [ResidualBlock(width, expansion, group_size, total) for _ in range(blocks)]
            last = i == len(widths) - 1
            layers.append(DiscriminatorHead(width, widths[-1] if num_classes else 1) if last
                          else Downsample(width, widths[i + 1]))
            self.stages.append(nn.Sequential(*layers))
        self.embed = nn.Embedding(num_classes, widths[-1]) if num_classes else None
        if self.embed is not None:  # R3GAN: gain 1/sqrt(dim) on a one-hot linear map
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(num_classes * widths[-1]))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, x.shape[0], "R3GAN discriminator")
        x = at_stage_precision(self.fp32_stages[0], self.from_image, x)
        for i, stage in enumerate(self.stages):
            x = at_stage_precision(self.fp32_stages[i], stage, x)
        if y is not None:  # projection: the features' inner product with the class embedding
            x = (x * self.embed(y).to(x.dtype)).sum(dim=1, keepdim=True)
        return x.view(x.shape[0])


@register_arch("r3gan", resolutions=RESOLUTIONS, d_blocks="stages")  # FreezeD counts D's stages
def build_r3gan(cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build the R3GAN pair (G first, then D, drawing from the seeded RNG in a fixed order)."""
    shape = (cfg.blocks_per_stage, cfg.expansion, cfg.group_size)
    lowp = cfg.lowp_stages
    g = R3GANGenerator(cfg.z_dim, resolution, channels, stage_widths(resolution, cfg.g_width, cfg.widths), *shape,
                       num_classes=num_classes, lowp_stages=lowp)
    d = R3GANDiscriminator(resolution, channels, stage_widths(resolution, cfg.d_width, cfg.widths), *shape,
                           num_classes=num_classes, lowp_stages=lowp)
    return g, d


__all__ = ["R3GANGenerator", "R3GANDiscriminator", "ResidualBlock", "build_r3gan", "stage_widths"]
