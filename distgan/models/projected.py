"""Projected discriminator (Sauer et al., NeurIPS 2021, "Projected GANs Converge Faster").

    x -> [resize] -> EfficientNet-Lite0 (frozen, ImageNet) -> 4 feature maps
      -> CCM: a fixed random 1x1 conv per scale (cross-channel mixing)
      -> CSM: fixed random fusion from the coarsest scale up (cross-scale mixing: add the finer
         map, upsample x2, 1x1 conv)
      -> one small trainable discriminator per scale -> logits, concatenated

Only the per-scale discriminators train. The feature network, CCM and CSM are fixed: their
weights are non-persistent buffers (see `feature_net.py`), so they are in no optimizer, gradient
reduction, ZeRO partition or checkpoint. CCM/CSM are drawn from a generator seeded with
``PROJECTION_SEED``, not from the global RNG, so every rank and every resumed run rebuilds the
same projection without storing it.

D returns a map of logits per image, shape (N, K) (every scale's patch logits side by side), as
the reference does: a hinge loss then puts its margin on each patch, not on their mean.

Differences from the reference, each for a reason:
- The scale discriminators normalise with GroupNorm (the reference's `NormLayer('group')`
  option) rather than BatchNorm: distgan runs reals and fakes through D in one batch, and a
  BatchNorm there would mix them and make each rank's logits depend on its batch size.
- How many down-sampling blocks a scale discriminator has follows the feature map's actual side
  (down to 8x8, then a 4x4 valid conv, smaller at tiny maps) instead of assuming 256 px input,
  so 32 px images can be fed at their own size (`model.projected_resolution=0`).
- Widths follow the reference's table scaled by ``model.d_width / 64`` (64 is the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgan.errors import ConfigError
from distgan.models.feature_net import PACKAGES, EfficientNetLite0Features, freeze_as_buffers
from distgan.models.layers import apply_spectral_norm, check_labels
from distgan.models.registry import ModelSettings, register_discriminator

PROJECTION_SEED = 0
"""Seed of the fixed random CCM/CSM weights (the same on every rank and after every resume)."""
CCM_CHANNELS = 64
"""The reference's `cout`; with `expand`, the scales get 64, 128, 256, 512 channels."""
REFERENCE_WIDTHS = {1: 512, 2: 512, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32}
"""The reference's scale-discriminator width per feature side (its `channel_dict`)."""


def _fixed_conv(cin: int, cout: int, generator: torch.Generator) -> nn.Conv2d:
    """A 1x1 conv with PyTorch's default init (Kaiming-uniform, a=sqrt(5)) drawn from ``generator``."""
    conv = nn.Conv2d(cin, cout, 1)
    bound = 1.0 / math.sqrt(cin)  # default init of a 1x1 conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with torch.no_grad():
        conv.weight.copy_(torch.empty_like(conv.weight).uniform_(-bound, bound, generator=generator))
        conv.bias.copy_(torch.empty_like(conv.bias).uniform_(-bound, bound, generator=generator))
    return conv


class RandomProjection(nn.Module):
    """Fixed CCM + CSM on the four feature maps; ``channels`` lists the output channels per scale."""

    def __init__(self, in_channels: tuple[int, ...]):
        super().__init__()
        g = torch.Generator().manual_seed(PROJECTION_SEED)
        mixed = [CCM_CHANNELS << i for i in range(len(in_channels))]  # 64, 128, 256, 512
        self.ccm = nn.ModuleList(_fixed_conv(c, m, g) for c, m in zip(in_channels, mixed))
        # CSM, coarsest first: scale i's fusion halves the channels (the finest keeps them), so the
        # sum with the next finer CCM output has matching channels.
        fused = [mixed[0]] + [m // 2 for m in mixed[1:]]  # 64, 64, 128, 256
        self.csm = nn.ModuleList(_fixed_conv(m, f, g) for m, f in zip(mixed, fused))
        self.channels = tuple(fused)
        freeze_as_buffers(self)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        mixed = [ccm(f) for ccm, f in zip(self.ccm, features)]
        out: list[Tensor] = [None] * len(mixed)  # type: ignore[list-item]
        h = None
        for i in reversed(range(len(mixed))):
            h = mixed[i] if h is None else h + mixed[i]
            h = self.csm[i](F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))
            out[i] = h
        return out


class ScaleDiscriminator(nn.Module):
    """Down blocks (4x4 stride-2 conv, GroupNorm, LeakyReLU 0.2) from ``side`` to 8x8, then a 4x4
    valid conv to a patch of logits (a k x k conv with k = side for maps smaller than 4x4)."""

    def __init__(self, cin: int, side: int, width_scale: float, num_classes: int):
        super().__init__()

        def width(nominal: int) -> int:
            return max(8, int(REFERENCE_WIDTHS[min(nominal, 256)] * width_scale))

        # The reference counts blocks on power-of-two sides; an odd map (7 at 224 px input) rounds up.
        nominal = 1 << max(0, math.ceil(math.log2(side)))
        layers: list[nn.Module] = []
        c, s = cin, side
        while nominal > 8:
            cout = width(nominal // 2)
            layers += [nn.Conv2d(c, cout, 4, 2, 1), nn.GroupNorm(cout // 2, cout), nn.LeakyReLU(0.2)]
            c, s, nominal = cout, (s + 2 - 4) // 2 + 1, nominal // 2
        self.main = nn.Sequential(*layers)
        self.num_classes = num_classes
        k = min(4, s)
        if num_classes > 0:  # projection on a class embedding, as the reference's SingleDiscCond
            self.out = nn.Conv2d(c, CCM_CHANNELS, k, 1, 0, bias=False)
            self.embed = nn.Embedding(num_classes, CCM_CHANNELS)
        else:
            self.out = nn.Conv2d(c, 1, k, 1, 0, bias=False)

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        h = self.out(self.main(x))
        if self.num_classes > 0:
            cmap = self.embed(labels).to(h.dtype)[:, :, None, None]
            h = (h * cmap).sum(dim=1, keepdim=True) / math.sqrt(CCM_CHANNELS)
        return h.flatten(1)


class ProjectedDiscriminator(nn.Module):
    """``D(x, labels=None) -> (N, K)`` patch logits from all scales (see the module docstring)."""

    def __init__(self, resolution: int, channels: int, width: int, num_classes: int = 0,
                 input_resolution: int = 0, scales: int = 4):
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        # The feature network's coarsest stage has stride 32: smaller images are upsampled to 32.
        self.input_resolution = input_resolution or max(resolution, 32)
        self.features = EfficientNetLite0Features()
        self.projection = RandomProjection(self.features.channels)
        sides = [2 * max(1, math.ceil(self.input_resolution / s)) for s in self.features.strides]  # CSM doubles
        self.heads = nn.ModuleList(
            ScaleDiscriminator(c, side, width / 64, num_classes)
            for c, side in list(zip(self.projection.channels, sides))[:scales]
        )
        apply_spectral_norm(self.heads)  # the reference spectral-normalises every D conv
        # Fixed weights are buffers (not parameters): DDP would broadcast them on every forward
        # with its default broadcast_buffers, so it is told to leave them alone (they are equal on
        # every rank by construction).
        self._ddp_params_and_buffers_to_ignore = [
            *(f"features.{n}" for n in self.features.frozen_names),
            *(f"projection.{n}" for n, _ in self.projection.named_buffers()),
        ]

    def train(self, mode: bool = True) -> "ProjectedDiscriminator":
        super().train(mode)
        self.features.train(False)
        return self

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        y = check_labels(labels, self.num_classes, x.shape[0], "projected discriminator")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same image in R, G and B
        if self.input_resolution != x.shape[-1]:
            x = F.interpolate(x, size=self.input_resolution, mode="bilinear", align_corners=False)
        features = self.projection(self.features(x))
        return torch.cat([head(f, y) for head, f in zip(self.heads, features)], dim=1)


@register_discriminator("projected", d_blocks="heads", needs=PACKAGES)
def build_projected(cfg: ModelSettings, resolution: int, channels: int, num_classes: int) -> nn.Module:
    if cfg.projected_resolution % 32:
        raise ConfigError(f"model.projected_resolution={cfg.projected_resolution}: must be a multiple of 32 (the "
                          "feature network's stages have strides 4 to 32, and the cross-scale mixing adds each "
                          "scale to the next coarser one at twice its side), e.g. 64 or 224; or 0 (the image size).")
    return ProjectedDiscriminator(resolution, channels, cfg.d_width, num_classes,
                                  input_resolution=cfg.projected_resolution, scales=cfg.projected_scales)


__all__ = ["ProjectedDiscriminator", "RandomProjection", "ScaleDiscriminator", "PROJECTION_SEED"]
