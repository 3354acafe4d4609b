"""GAN objectives and discriminator regularizers.

Every loss is a scalar mean over the batch, reduced in fp32: logits produced under bf16/fp16
autocast are cast with ``.float()`` first, so softplus/squares and the batch mean do not lose
precision (or overflow in fp16) when the batch is large.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("logistic", "hinge", "wgan-gp", "lsgan", "rpgan")
RELATIVISTIC = ("rpgan",)
"""Objectives whose G loss compares each fake with a real (the G phase needs real images)."""


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown GAN objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def d_loss(objective: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss for ``objective`` (see ``OBJECTIVES``).

    - ``logistic``: softplus(-D(x)) + softplus(D(G(z)))  (standard/non-saturating GAN)
    - ``hinge``:    relu(1 - D(x)) + relu(1 + D(G(z)))
    - ``wgan-gp``:  D(G(z)) - D(x); the gradient penalty is added by the caller (``gradient_penalty``)
    - ``lsgan``:    0.5 * ((D(x) - 1)^2 + D(G(z))^2)  (targets real=1, fake=0)
    - ``rpgan``:    softplus(-(D(x_i) - D(G(z_i))))  (relativistic pairing, R3GAN: real i and
      fake i are compared one to one, so both batches must have the same size)

    Otherwise the real and fake terms are averaged separately, so the batches may differ in size.
    """
    _check(objective)
    r, f = real_logits.float(), fake_logits.float()
    if objective == "rpgan":
        return F.softplus(f - r).mean()
    if objective == "logistic":
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if objective == "hinge":
        return F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
    if objective == "wgan-gp":
        return f.mean() - r.mean()
    return 0.5 * ((r - 1.0).square().mean() + f.square().mean())


def g_loss(objective: str, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
    """Generator loss: ``logistic`` softplus(-D(G(z))) (non-saturating), ``hinge``/``wgan-gp``
    -D(G(z)), ``lsgan`` 0.5 * (D(G(z)) - 1)^2, ``rpgan`` softplus(-(D(G(z_i)) - D(x_i))) (needs
    ``real_logits``, paired one to one with the fakes)."""
    _check(objective)
    f = fake_logits.float()
    if objective in RELATIVISTIC:
        if real_logits is None or real_logits.shape != fake_logits.shape:
            raise ValueError(f"{objective} pairs each fake with a real: got real logits "
                             f"{None if real_logits is None else tuple(real_logits.shape)} for fakes {tuple(f.shape)}")
        return F.softplus(real_logits.float() - f).mean()
    if objective == "logistic":
        return F.softplus(-f).mean()
    if objective in ("hinge", "wgan-gp"):
        return -f.mean()
    return 0.5 * (f - 1.0).square().mean()


def zero_centered_penalties(logits: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Per-sample ||dD(x)/dx||^2, shape (N,), for each tensor of ``inputs``, from ONE backward
    pass: R1 on real images and R2 on fakes (Mescheder et al. 2018; R3GAN uses both).

    ``inputs`` must have had ``requires_grad_(True)`` before the discriminator ran on them
    (directly, or concatenated/augmented into ``logits``). The graph is kept
    (``create_graph=True``) so that backpropagating a penalty reaches D's parameters. Summing the
    logits is valid because sample i's logit depends only on image i (no batch-coupled layers
    in D). The caller scales by gamma/2 (and the lazy interval).
    """
    grads = torch.autograd.grad(outputs=logits.sum(), inputs=list(inputs), create_graph=True, only_inputs=True)
    return [g.float().square().flatten(1).sum(dim=1) for g in grads]


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """Per-sample R1 term ||dD(x)/dx||^2 on real images (see `zero_centered_penalties`)."""
    return zero_centered_penalties(real_logits, [real_images])[0]


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0,1) in fp32, drawn on the generator's device (a CPU generator cannot feed a CUDA
    draw), then moved to ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def gradient_penalty(
    discriminator: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    alpha: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): E[(||grad_x D(x_hat)||_2 - 1)^2] with
    x_hat = a * real + (1 - a) * fake, a ~ U(0,1) per sample (``alpha``, else drawn from ``generator``).

    ``discriminator`` maps images to logits (wrap a conditional D, e.g. ``lambda x: D(x, y)``).
    Real and fake are detached: the penalty trains D only, never G. The caller multiplies by
    the weight (``loss.gp_weight``).
    """
    real, fake = real.detach(), fake.detach()
    if alpha is None:
        alpha = _uniform((real.shape[0],) + (1,) * (real.dim() - 1), real, generator)
    x_hat = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        outputs=discriminator(x_hat).sum(), inputs=x_hat, create_graph=True, only_inputs=True
    )
    # vector_norm's backward is defined (zero) at a zero gradient, unlike a hand-written sqrt.
    norm = torch.linalg.vector_norm(grad.float().flatten(1), ord=2, dim=1)
    return (norm - 1.0).square().mean()


__all__ = ["OBJECTIVES", "RELATIVISTIC", "d_loss", "g_loss", "r1_penalty", "zero_centered_penalties", "gradient_penalty"]
