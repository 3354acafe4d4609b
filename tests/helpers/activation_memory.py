"""How much GPU memory a recipe's training step needs per image, computed without a GPU.

The networks are built on PyTorch's `meta` device (shapes only, no storage, no arithmetic), and
one image goes through the heaviest phases while a saved-tensors hook adds up every distinct
storage autograd keeps for the backward pass:

- the D step with R1 and R2: D on one real and one fake image, `autograd.grad(create_graph=True)`
  for the penalty (the double backward keeps the first backward's graph too);
- the G step: G's forward and D's forward on the fake (and a real, for `rpgan`), D frozen.

This is fp32's activation memory (autocast is keyed by device and does not act on `meta`), so it
is an upper bound for bf16/fp16, which keep about half (measured on CPU: R3GAN CIFAR-10 D step
162 MiB per image in fp32, 85 MiB under bf16 autocast). On CPU the same hook over real tensors
gives the same fp32 bytes to the MiB, which is what makes the meta shortcut trustworthy; the
GPU suite (tests/gpu/test_benchmark.py) checks the estimate against torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses

import torch

from distgan.config import Config
from distgan.models import build_models

HEADROOM = 1.5
"""Peak / saved tensors. While the backward runs it also holds the incoming and outgoing
gradient of the layer it is in (the two widest activations at most), autocast's weight copies and
the caching allocator's rounding; half the saved bytes again covers these."""

GPU_BYTES = 80 * 10**9
"""The GPU the recipes are sized for: one 80 GB A100/H100 (an H200 has 141 GB)."""


class _SavedBytes:
    """A saved-tensors hook that counts each storage once (views and re-saves share one)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            self.bytes += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _meta_models(cfg: Config):
    # fp32 throughout: StyleGAN2's low-precision blocks ask autocast about their device, which
    # has no answer for `meta`; the estimate is fp32's anyway.
    model = dataclasses.replace(cfg.model, lowp_stages=0) if hasattr(cfg.model, "lowp_stages") else cfg.model
    with torch.device("meta"):
        return build_models(model, cfg.data.resolution, cfg.data.channels, _classes(cfg))


def _classes(cfg: Config) -> int:
    """A conditional recipe's networks are built with 10 classes (CIFAR-10's): the class
    embedding's parameters and activations are tiny beside the convolutions at any class count."""
    return 10 if cfg.model.conditional else 0


def _labels(cfg: Config, n: int) -> torch.Tensor | None:
    return torch.zeros(n, dtype=torch.long, device="meta") if cfg.model.conditional else None


_MEASURED: dict[str, dict[str, int]] = {}
"""Per networks and objective: building some networks takes seconds even on `meta`."""


def activation_bytes_per_image(cfg: Config) -> dict[str, int]:
    """fp32 bytes autograd holds per real image in the D step (with R1+R2 through a double
    backward) and in the G step."""
    measured = _measured(cfg)
    return {"D": measured["D"], "G": measured["G"]}


def resident_bytes(cfg: Config) -> int:
    """Weights, gradients and Adam's two moments of G and D in fp32, plus the EMA generator."""
    return _measured(cfg)["resident"]


def _measured(cfg: Config) -> dict[str, int]:
    key = repr((cfg.model, cfg.data.resolution, cfg.data.channels, cfg.loss.objective))
    if key not in _MEASURED:
        _MEASURED[key] = _measure(cfg)
    return _MEASURED[key]


def _measure(cfg: Config) -> dict[str, int]:
    G, D = _meta_models(cfg)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    d_step = _SavedBytes()
    with d_step.hooks():
        x = torch.randn(2, *shape, device="meta").requires_grad_(True)  # one real, one fake
        (grad,) = torch.autograd.grad(D(x, _labels(cfg, 2)).sum(), [x], create_graph=True)
        grad.square().sum()
    g_step = _SavedBytes()
    D.requires_grad_(False)
    with g_step.hooks():
        fake = G(torch.randn(1, G.z_dim, device="meta"), _labels(cfg, 1))
        pair = cfg.loss.objective == "rpgan"
        batch = torch.cat([fake, torch.randn(1, *shape, device="meta")]) if pair else fake
        D(batch, _labels(cfg, batch.shape[0])).sum()
    g, d = (sum(p.numel() for p in net.parameters()) for net in (G, D))
    return {"D": d_step.bytes, "G": g_step.bytes, "resident": 4 * (4 * (g + d) + g)}


def step_bytes(cfg: Config, micro_batch: int) -> int:
    """Estimated peak bytes of one process training `cfg` at `micro_batch` images (fp32)."""
    per_image = max(activation_bytes_per_image(cfg).values())
    return resident_bytes(cfg) + int(HEADROOM * micro_batch * per_image)


def largest_micro_batch(cfg: Config, gpu_bytes: int = GPU_BYTES) -> int:
    """The largest micro-batch whose estimated fp32 step fits `gpu_bytes`."""
    per_image = max(activation_bytes_per_image(cfg).values())
    return int((gpu_bytes - resident_bytes(cfg)) // (HEADROOM * per_image))
