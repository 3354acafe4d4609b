"""Building blocks shared by the architectures.

- ``ConditionalBatchNorm2d`` / ``PlainNorm2d`` and the ``make_g_norm`` factory: every generator
  normalization layer is called as ``norm(x, labels)`` so blocks do not care whether the model
  is conditional or whether ``model.g_norm`` is ``batch`` or ``none``.
- ``apply_spectral_norm``: wraps every conv/linear/embedding of a module with the
  parametrization-based spectral norm (``torch.nn.utils.parametrizations.spectral_norm``), whose
  state dict holds plain tensors and which supports double backward (needed for R1 / WGAN-GP).
- ``ProjectionHead``: the linear logit plus the projection-discriminator class term
  (Miyato & Koyama 2018).
- ``check_labels``: the one place that decides what a conditional/unconditional net does with
  the ``labels`` argument.
- ``independent_sets`` / ``batch_sets``: how many independent sets (reals, fakes) a D batch holds,
  for layers with batch statistics (StyleGAN2's minibatch std) that must not mix them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


_SETS = 1
"""How many equal-size independent sets the batch of a D forward holds (see `independent_sets`)."""


@contextlib.contextmanager
def independent_sets(sets: int) -> Iterator[None]:
    """While inside: a D batch is `sets` equal-size sets concatenated (reals, then fakes), and
    layers with batch statistics (`batch_sets()`) keep them within each set, as if each set went
    through D alone. A module-level setting rather than a forward argument or a module attribute:
    the objective calls D through wrappers that differ per backend (DDP, DeepSpeed engines behind
    an input-casting closure, FSDP's sharded copy, torch.compile), and every D signature stays
    (x, labels). torch.compile guards on the value."""
    global _SETS
    previous, _SETS = _SETS, sets
    try:
        yield
    finally:
        _SETS = previous


def batch_sets() -> int:
    """The number of independent sets in the current D batch (1 outside `independent_sets`)."""
    return _SETS


def check_labels(labels: Tensor | None, num_classes: int, batch: int, who: str) -> Tensor | None:
    """Labels to use: ``None`` for an unconditional net (labels are ignored), else a (N,) long tensor.

    A conditional net without labels is a caller bug, so it fails loudly instead of silently
    sampling classes. Label values are not range-checked here: that would need a host sync on
    GPU every step; ``nn.Embedding`` raises on out-of-range indices anyway.
    """
    if num_classes == 0:
        return None
    if labels is None:
        raise ValueError(f"{who} is class-conditional ({num_classes} classes) and needs labels")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{who}: labels must have shape ({batch},), got {tuple(labels.shape)}")
    return labels.long()


class ConditionalBatchNorm2d(nn.Module):
    """Per-class gain and bias (embeddings initialised to 1 and 0) after an optional batch norm.

    ``normalize=False`` (``model.g_norm=none``) drops the batch statistics so one sample's output
    does not depend on the rest of the batch; the class-conditional affine stays, so the
    generator remains conditional.
    """

    def __init__(self, num_features: int, num_classes: int, normalize: bool = True):
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes
        # affine=False: the per-class embeddings below replace BN's own gain/bias.
        self.bn = nn.BatchNorm2d(num_features, affine=False) if normalize else None
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        self.reset_affine()

    def reset_affine(self) -> None:
        """Gain 1 / bias 0: the layer starts as a plain (unconditional) normalization.

        Arch init functions call this after their generic init, which must not touch these.
        """
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("ConditionalBatchNorm2d needs labels")
        h = self.bn(x) if self.bn is not None else x
        g = self.gain(labels).view(-1, self.num_features, 1, 1).to(h.dtype)
        b = self.bias(labels).view(-1, self.num_features, 1, 1).to(h.dtype)
        return h * g + b


class PlainNorm2d(nn.Module):
    """Unconditional generator normalization with the ``(x, labels)`` call signature.

    ``normalize=True``: ``nn.BatchNorm2d`` (affine). ``normalize=False``: no normalization, only a
    learnable per-channel gain/bias initialised to 1/0 -- the identity at init. The affine is kept
    because the convs feeding a norm layer have no bias of their own (BN would cancel it), so
    without it the ``g_norm=none`` generator would have no biases at all.
    """

    def __init__(self, num_features: int, normalize: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bn = nn.BatchNorm2d(num_features) if normalize else None
        if not normalize:
            self.gain = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def reset_affine(self) -> None:
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            nn.init.ones_(self.gain)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # labels ignored
        if self.bn is not None:
            return self.bn(x)
        return x * self.gain.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)


def make_g_norm(num_features: int, num_classes: int, g_norm: str) -> nn.Module:
    """Generator norm layer for ``model.g_norm`` (``batch``/``none``); conditional iff num_classes > 0."""
    if g_norm not in ("batch", "none"):
        raise ValueError(f"g_norm must be 'batch' or 'none', got {g_norm!r}")
    normalize = g_norm == "batch"
    if num_classes > 0:
        return ConditionalBatchNorm2d(num_features, num_classes, normalize)
    return PlainNorm2d(num_features, normalize)


def reset_g_norms(module: nn.Module) -> None:
    """Re-apply gain 1 / bias 0 to every G norm layer (after a generic weight init)."""
    for m in module.modules():
        if isinstance(m, (ConditionalBatchNorm2d, PlainNorm2d)):
            m.reset_affine()


SN_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral-normalize the weight of every conv/linear/embedding inside ``module`` (in place).

    Uses the parametrization API: the state dict keeps ``parametrizations.weight.original`` plus
    the power-iteration vectors ``_u``/``_v`` as ordinary tensors. Call it after weight init:
    the initial u/v are drawn from the (seeded) global RNG, so building stays deterministic.
    """
    targets = [m for m in module.modules() if isinstance(m, SN_TYPES)]
    for m in targets:
        spectral_norm(m, name="weight")
    return module


class ProjectionHead(nn.Module):
    """Discriminator output: ``linear(h) + <embed(y), pooled>`` (projection discriminator).

    ``h`` is whatever the arch feeds its linear logit (DCGAN: flattened 4x4 features; resnet:
    the pooled features themselves); ``pooled`` is the globally sum-pooled feature vector
    (``pooled_features`` wide). The class term is an inner product rather than concatenating a
    one-hot label, which is what makes projection D work well (Miyato & Koyama 2018).
    With ``num_classes == 0`` there is no embedding and labels are never looked at.
    """

    def __init__(self, in_features: int, pooled_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, 1)
        self.embed = nn.Embedding(num_classes, pooled_features) if num_classes > 0 else None

    def forward(self, h: Tensor, pooled: Tensor, labels: Tensor | None) -> Tensor:
        out = self.linear(h).view(-1)
        if self.embed is not None:
            out = out + (self.embed(labels).to(pooled.dtype) * pooled).sum(dim=1)
        return out


__all__ = [
    "check_labels",
    "ConditionalBatchNorm2d",
    "PlainNorm2d",
    "make_g_norm",
    "reset_g_norms",
    "apply_spectral_norm",
    "ProjectionHead",
]
