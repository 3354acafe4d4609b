"""Residual GAN (SNGAN: Miyato et al. 2018, Miyato & Koyama 2018; layout as in BigGAN, Brock et al. 2019).

Widths (``w`` = ``model.g_width`` / ``model.d_width``, capped at 8w like BigGAN's 16w cap):
- G: a map at resolution r has ``w * min(8, R / r)`` channels, so ``g_width`` is the width at the
  output resolution R. z -> linear -> 4x4 -> one upsampling residual block per doubling ->
  BN, ReLU, 3x3 conv to image channels -> tanh.
- D: a map at resolution r has ``w * min(8, R / (2r))`` channels (``d_width`` after the first,
  R -> R/2 block). One downsampling block per halving down to 4x4 (the first is SNGAN's
  "optimized" block: no ReLU on the raw image, shortcut pools before its 1x1 conv), one more
  block at 4x4 without downsampling (BigGAN), ReLU, global *sum* pooling, linear logit
  (+ projection term when conditional). Spectral norm on every D conv/linear/embedding; no
  normalization layers in D, so each sample's logit depends only on that sample (R1/GP).
Init as SNGAN: Xavier-uniform, gain sqrt(2) on the residual-path 3x3 convs (they feed ReLUs),
gain 1 on shortcut 1x1 convs, linear layers, embeddings and the output conv; zero biases;
(conditional) BN gain 1 / bias 0.
"""

from __future__ import annotations
import math

from torch import Tensor, nn
from torch.nn import functional as F

from distgan.models.layers import ProjectionHead, apply_spectral_norm, check_labels, make_g_norm
from distgan.models.registry import ModelSettings, register_arch


WIDTH_CAP = 8


def _xavier(m: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(m.weight, gain)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
    return m


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    """Residual-path 3x3 conv, gain sqrt(2) because a ReLU precedes the next layer (SNGAN)."""
    return _xavier(nn.Conv2d(cin, cout, 3, 1, 1), math.sqrt(2.0))


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    """Shortcut 1x1 conv (gain 1)."""
    return _xavier(nn.Conv2d(cin, cout, 1, 1, 0))


class GBlock(nn.Module):
    """Pre-activation upsampling block: norm, ReLU, 2x nearest up, conv3x3, norm, ReLU, conv3x3;
    shortcut: 2x nearest up, conv1x1. Norms are conditional BN when ``num_classes > 0``."""

    def __init__(self, cin: int, cout: int, num_classes: int, g_norm: str):
        super().__init__()
        self.norm1 = make_g_norm(cin, num_classes, g_norm)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = make_g_norm(cout, num_classes, g_norm)
        self.conv2 = _conv3(cout, cout)
        self.shortcut = _conv1(cin, cout)

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        h = F.interpolate(F.relu(self.norm1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Pre-activation D block: [ReLU], conv3x3, ReLU, conv3x3, [avgpool 2].

    ``first=True`` is SNGAN's optimized first block: no ReLU on the input image and the shortcut
    pools *before* its 1x1 conv (cheaper, same function class). Elsewhere the shortcut is a 1x1
    conv (when the width changes or it downsamples) followed by the pool, else the identity.
    ReLUs are not in place so double backward (R1, WGAN-GP) has every activation it needs.
    """

    def __init__(self, cin: int, cout: int, down: bool = True, first: bool = False):
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = _conv3(cin, cout)
        self.conv2 = _conv3(cout, cout)
        self.shortcut = _conv1(cin, cout) if (first or down or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x if self.first else F.relu(x))
        h = self.conv2(F.relu(h))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        sc = self.shortcut(x) if self.shortcut is not None else x
        return h + (F.avg_pool2d(sc, 2) if self.down else sc)


class ResNetGenerator(nn.Module):
    """SNGAN/BigGAN residual generator; conditional batch norm in every block when conditional."""

    def __init__(self, z_dim: int, resolution: int, channels: int, width: int, num_classes: int = 0,
                 g_norm: str = "batch"):
        super().__init__()
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.num_classes = num_classes
        res = [4 << i for i in range(int(math.log2(resolution)) - 1)]  # 4, 8, ..., R
        widths = [width * min(WIDTH_CAP, resolution // r) for r in res]
        self.c0 = widths[0]
        self.linear = _xavier(nn.Linear(z_dim, 16 * widths[0]))
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes, g_norm) for a, b in zip(widths, widths[1:]))
        # The output norm is unconditional in SNGAN and BigGAN alike.
        self.out_norm = make_g_norm(widths[-1], 0, g_norm)
        self.out = _xavier(nn.Conv2d(widths[-1], channels, 3, 1, 1))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, z.shape[0], "ResNet generator")
        h = self.linear(z).view(z.shape[0], self.c0, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return self.out(F.relu(self.out_norm(h, None))).tanh()  # images in [-1, 1]


class ResNetDiscriminator(nn.Module):
    """SNGAN/BigGAN residual discriminator with spectral norm; projection D when conditional."""

    def __init__(self, resolution: int, channels: int, width: int, num_classes: int = 0):
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        res = [resolution >> i for i in range(1, int(math.log2(resolution)) - 1)]  # R/2, ..., 4
        widths = [width * min(WIDTH_CAP, resolution // (2 * r)) for r in res]
        blocks = [DBlock(channels, widths[0], down=True, first=True)]
        blocks += [DBlock(a, b, down=True) for a, b in zip(widths, widths[1:])]
        blocks.append(DBlock(widths[-1], widths[-1], down=False))
        self.blocks = nn.ModuleList(blocks)
        self.head = ProjectionHead(widths[-1], widths[-1], num_classes)
        _xavier(self.head.linear)
        if self.head.embed is not None:
            _xavier(self.head.embed)
        # After init: SN's power-iteration vectors come from the seeded RNG too.
        apply_spectral_norm(self)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, x.shape[0], "ResNet discriminator")
        h = x
        for block in self.blocks:
            h = block(h)
        # Sum (not mean) pooling as in SNGAN/BigGAN: with every layer held near 1-Lipschitz by
        # spectral norm, averaging would shrink the logits by another factor of 16 (4x4 map).
        pooled = F.relu(h).sum(dim=(2, 3))
        return self.head(pooled, pooled, y)


@register_arch("resnet")
def build_resnet(cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build the residual pair (G first, then D: a fixed order of draws from the seeded RNG)."""
    g = ResNetGenerator(cfg.z_dim, resolution, channels, cfg.g_width, num_classes, cfg.g_norm)
    d = ResNetDiscriminator(resolution, channels, cfg.d_width, num_classes)
    return g, d


__all__ = ["ResNetGenerator", "ResNetDiscriminator", "GBlock", "DBlock", "build_resnet"]
