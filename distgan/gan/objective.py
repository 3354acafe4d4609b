"""Where the objective plugs into the loop: `accumulate_gradients(phase, ...)`.

The trainer owns the schedule, the backend owns distribution; this module only says, per
phase, which forward passes to run and which loss to backpropagate.
"""

from __future__ import annotations

import torch

from distgan.backends.base import Backend
from distgan.config import LossConfig
from distgan.gan.augment import diff_augment
from distgan.gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty
from distgan.gan.phases import Phase


class GANObjective:
    def __init__(self, cfg: LossConfig, backend: Backend, z_dim: int, num_classes: int, batch_size: int):
        self.cfg, self.backend = cfg, backend
        self.z_dim, self.num_classes = z_dim, num_classes
        self.batch_size = batch_size  # per-process batch of the G phase

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fresh generator inputs (from this rank's RNG; ranks are seeded differently)."""
        device = self.backend.device
        z = torch.randn(n, self.z_dim, device=device)
        c = torch.randint(0, self.num_classes, (n,), device=device) if self.num_classes else None
        return z, c

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.cfg.diffaugment) if self.cfg.diffaugment else x

    def accumulate_gradients(
        self, phase: Phase, real: torch.Tensor | None, real_c: torch.Tensor | None, scale: float
    ) -> dict[str, torch.Tensor]:
        """Run `phase`'s forward passes and backward its loss times `phase.gain * scale`.

        Returns detached scalar statistics (kept on the device: no host sync here).
        """
        fns = self.backend.forward_fns(phase.net, phase.manual_sync)
        G, D = fns["G"], fns["D"]
        n = real.shape[0] if real is not None else None
        if phase.name == "Gmain":
            z, c = self.latents(self.batch_size)
            with self.backend.autocast():
                logits = D(self._augment(G(z, c)), c)
            loss = g_loss(self.cfg.objective, logits)
            stats = {"loss": loss.detach(), "D_fake": logits.detach().float().mean()}
        elif phase.name == "Dmain":
            z, c = self.latents(n)
            with torch.no_grad(), self.backend.autocast():
                fake = G(z, c)
            # Real and fake go through D in ONE forward: a single DDP/ZeRO reduction per step.
            both = self._augment(torch.cat([real, fake.to(real.dtype)]))
            labels = torch.cat([real_c, c]) if c is not None else None
            with self.backend.autocast():
                logits = D(both, labels).float()
            real_logits, fake_logits = logits[:n], logits[n:]
            loss = d_loss(self.cfg.objective, real_logits, fake_logits)
            stats = {"D_real": real_logits.detach().mean(), "D_fake": fake_logits.detach().mean()}
            if self.cfg.objective == "wgan-gp":
                gp = gradient_penalty(lambda x: D(x, real_c).float(), real, fake.to(real.dtype))
                loss = loss + self.cfg.gp_weight * gp
                stats["gp"] = gp.detach()
            stats["loss"] = loss.detach()
        elif phase.name == "Dreg":
            real = real.detach().requires_grad_(True)
            with self.backend.autocast():
                logits = D(self._augment(real), real_c).float()
            r1 = r1_penalty(logits, real)
            # `logits * 0` keeps every D parameter in the graph (the R1 term alone never reaches
            # the final bias), which sharded/engine backends expect of each backward.
            loss = (self.cfg.r1_gamma / 2) * r1.mean() + logits.sum() * 0
            stats = {"r1": r1.detach().mean(), "loss": loss.detach()}
        else:
            raise ValueError(f"unknown phase {phase.name}")
        self.backend.backward(loss * (phase.gain * scale), phase.net)
        return stats
