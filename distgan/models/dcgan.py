"""DCGAN (Radford et al. 2016), generalised to any power-of-two resolution 16..256.

Widths follow the original paper's 64x64 layout: a feature map at resolution ``r`` (4 <= r <= R/2)
has ``width * min(8, R / (2r))`` channels. So ``model.g_width`` / ``model.d_width`` is the width
of the *largest hidden* feature map (R/2 x R/2: the one that the last transposed conv turns into
the R x R image, and the first strided conv of D produces), widths double as resolution halves,
and they are capped at 8x width so 128/256 px models do not explode (for R = 64 this is exactly
the paper's 8w-4w-2w-w stack).

G: z -> 4x4 (transposed conv on a 1x1 map, i.e. a linear layer) -> [norm, ReLU, 4x4 stride-2
   transposed conv] until R/2 -> norm, ReLU -> transposed conv to R -> tanh.
D: [4x4 stride-2 conv, LeakyReLU(0.2)] from R down to 4x4 -> linear on the flattened 4x4 map
   (+ projection term when conditional). No batch norm in D (see ``DCGANDiscriminator``).
Init: N(0, 0.02) for conv/linear/embedding weights, zero biases, norm gain 1 / bias 0.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from distgan.models.layers import ProjectionHead, check_labels, make_g_norm, reset_g_norms
from distgan.models.registry import ModelSettings, register_arch


WIDTH_CAP = 8  # widths stop doubling at 8x the base width (paper: 1024 = 8 * 128 at 4x4)


def feature_widths(resolution: int, width: int) -> list[tuple[int, int]]:
    """``[(r, channels)]`` for the hidden feature maps r = 4, 8, ..., R/2 (see module docstring)."""
    steps = int(math.log2(resolution)) - 2  # number of hidden maps from 4x4 to R/2
    return [(4 << i, width * min(WIDTH_CAP, resolution // (2 * (4 << i)))) for i in range(steps)]


def dcgan_init(module: nn.Module) -> None:
    """DCGAN init: N(0, 0.02) weights, zero biases; G norm layers then reset to gain 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    reset_g_norms(module)


class DCGANGenerator(nn.Module):
    """DCGAN generator; conditional batch norm when ``num_classes > 0``."""

    def __init__(self, z_dim: int, resolution: int, channels: int, width: int, num_classes: int = 0,
                 g_norm: str = "batch"):
        super().__init__()
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.num_classes = num_classes
        widths = [c for _, c in feature_widths(resolution, width)]
        # Convs followed by a norm layer have no bias: BN would subtract it again (and for
        # g_norm=none the norm layer's own per-channel bias plays that role).
        self.input = nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False)  # 1x1 -> 4x4
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False) for cin, cout in zip(widths, widths[1:])
        )
        self.norms = nn.ModuleList(make_g_norm(c, num_classes, g_norm) for c in widths)
        self.out = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)  # R/2 -> R

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, z.shape[0], "DCGAN generator")
        h = self.input(z.view(z.shape[0], self.z_dim, 1, 1))
        h = F.relu(self.norms[0](h, y))
        for up, norm in zip(self.ups, self.norms[1:]):
            h = F.relu(norm(up(h), y))
        return self.out(h).tanh()  # images in [-1, 1], the range real images are scaled to


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator returning raw logits of shape (N,); projection D when conditional.

    Deliberately no batch norm (unlike the paper): R1 and WGAN-GP penalties need each sample's
    logit to depend only on that sample, so the input gradient is per-sample; BN couples the
    batch (and also makes real/fake batches see different statistics).
    """

    def __init__(self, resolution: int, channels: int, width: int, num_classes: int = 0):
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        widths = [c for _, c in reversed(feature_widths(resolution, width))]  # R/2 ... 4
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 4, 2, 1) for cin, cout in zip([channels] + widths[:-1], widths)
        )
        self.head = ProjectionHead(widths[-1] * 16, widths[-1], num_classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, x.shape[0], "DCGAN discriminator")
        h = x
        for conv in self.convs:
            # not inplace: keeps every activation available for double backward (R1).
            h = F.leaky_relu(conv(h), 0.2)
        pooled = h.sum(dim=(2, 3)) if y is not None else None  # projection term uses sum pooling
        return self.head(h.flatten(1), pooled, y)


@register_arch("dcgan", d_blocks="convs")  # FreezeD counts D's strided convs
def build_dcgan(cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build the DCGAN pair (G first, then D, so both draw from the seeded RNG in a fixed order)."""
    g = DCGANGenerator(cfg.z_dim, resolution, channels, cfg.g_width, num_classes, cfg.g_norm)
    dcgan_init(g)
    d = DCGANDiscriminator(resolution, channels, cfg.d_width, num_classes)
    dcgan_init(d)
    return g, d


__all__ = ["DCGANGenerator", "DCGANDiscriminator", "build_dcgan", "feature_widths"]
