"""Where the objective plugs into the loop: `accumulate_gradients(phase, handle, ...)`.

The trainer owns the schedule and the backend's phase handle owns distribution; this module
only says, per loss term, which forward passes to run and what to backpropagate. A phase's
terms are summed and backpropagated once, times `phase.gain * scale`.

A new regularizer is a term here (a method registered in `TERMS`) plus its phase in
`phases.build_phases`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from distgan.backends.base import PhaseHandle
from distgan.config import LossConfig
from distgan.gan.augment import diff_augment
from distgan.gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty
from distgan.gan.phases import Phase

Stats = dict[str, torch.Tensor]


class NoiseSource(Protocol):
    """Where the random inputs of the losses come from (tests key them by global sample index)."""

    def latents(self, n: int, z_dim: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator inputs: (z, class labels or None)."""

    def uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) draws (the interpolation weights of the gradient penalty)."""


class TorchNoise:
    """Draws from torch's global RNG (ranks are seeded differently, so each draws its own)."""

    def latents(self, n, z_dim, num_classes, device):
        z = torch.randn(n, z_dim, device=device)
        c = torch.randint(0, num_classes, (n,), device=device) if num_classes else None
        return z, c

    def uniform(self, shape, like):
        return torch.rand(shape, device=like.device, dtype=torch.float32).to(like.dtype)


class _MicroBatch:
    """One micro-batch of one phase: its real images and the fakes generated for it (once)."""

    __slots__ = ("real", "real_c", "fake", "fake_c")

    def __init__(self, real: torch.Tensor | None, real_c: torch.Tensor | None):
        self.real, self.real_c = real, real_c
        self.fake: torch.Tensor | None = None
        self.fake_c: torch.Tensor | None = None


class GANObjective:
    def __init__(self, cfg: LossConfig, z_dim: int, num_classes: int, batch_size: int, device: torch.device,
                 noise: NoiseSource | None = None):
        self.cfg = cfg
        self.z_dim, self.num_classes = z_dim, num_classes
        self.batch_size = batch_size  # per-process batch of phases without real images
        self.device = device
        self.noise = noise or TorchNoise()
        self._augment: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda x: diff_augment(x, cfg.diffaugment)) if cfg.diffaugment else (lambda x: x))

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.noise.latents(n, self.z_dim, self.num_classes, self.device)

    def accumulate_gradients(self, phase: Phase, h: PhaseHandle, real: torch.Tensor | None,
                             real_c: torch.Tensor | None, scale: float) -> Stats:
        """Run `phase`'s terms on one micro-batch and backward their sum times `phase.gain * scale`.

        Returns detached statistics (scalars or per-sample values, kept on the device and averaged
        only when logged: no host sync and no reduction here).
        """
        batch, stats = _MicroBatch(real, real_c), {}
        loss: torch.Tensor | None = None
        for term in phase.terms:
            value, term_stats = TERMS[term](self, h, batch)
            loss = value if loss is None else loss + value
            stats.update(term_stats)
        stats["loss"] = loss.detach()
        factor = phase.gain * scale
        h.backward(loss * factor if factor != 1.0 else loss)
        return stats

    # ------------------------------------------------------------------ terms
    def _g_adv(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """Generator adversarial loss on fresh fakes (D frozen by the handle)."""
        z, c = self.latents(self.batch_size)
        with h.autocast():
            logits = h.D(self._augment(h.G(z, c)), c)
        return g_loss(self.cfg.objective, logits), {"D_fake": logits.detach()}

    def _d_adv(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """Discriminator adversarial loss: real and fake through D in ONE forward (a single
        DDP/ZeRO reduction per step)."""
        real, n = batch.real, batch.real.shape[0]
        z, batch.fake_c = self.latents(n)
        with torch.no_grad(), h.autocast():
            fake = h.G(z, batch.fake_c)
        batch.fake = fake if fake.dtype == real.dtype else fake.to(real.dtype)
        both = self._augment(torch.cat([real, batch.fake]))
        labels = torch.cat([batch.real_c, batch.fake_c]) if batch.fake_c is not None else None
        with h.autocast():
            logits = h.D(both, labels).float()
        real_logits, fake_logits = logits[:n], logits[n:]
        stats = {"D_real": real_logits.detach(), "D_fake": fake_logits.detach()}
        return d_loss(self.cfg.objective, real_logits, fake_logits), stats

    def _gp(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """WGAN-GP penalty between this micro-batch's reals and the fakes `d_adv` drew for it."""
        real = batch.real
        alpha = self.noise.uniform((real.shape[0],) + (1,) * (real.dim() - 1), real)
        gp = gradient_penalty(lambda x: h.D(x, batch.real_c).float(), real, batch.fake, alpha)
        return self.cfg.gp_weight * gp, {"gp": gp.detach()}

    def _r1(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """R1: gamma/2 E||grad_x D(x)||^2 on real images."""
        real = batch.real.detach().requires_grad_(True)
        with h.autocast():
            logits = h.D(self._augment(real), batch.real_c).float()
        r1 = r1_penalty(logits, real)
        # `logits * 0` keeps every D parameter in the graph (the R1 term alone never reaches the
        # final bias), which sharded/engine backends expect of each backward.
        return (self.cfg.r1_gamma / 2) * r1.mean() + logits.sum() * 0, {"r1": r1.detach()}


TERMS: dict[str, Callable[[GANObjective, PhaseHandle, _MicroBatch], tuple[torch.Tensor, Stats]]] = {
    "g_adv": GANObjective._g_adv,
    "d_adv": GANObjective._d_adv,
    "gp": GANObjective._gp,
    "r1": GANObjective._r1,
}
"""Loss terms by the name a phase lists them under."""
