"""Where the objective plugs into the loop: `accumulate_gradients(phase, handle, ...)`.

The trainer owns the schedule and the backend's phase handle owns distribution; this module
only says, per loss term, which forward passes to run and what to backpropagate. A phase's
terms are summed and backpropagated once, times `phase.gain * scale`.

A new regularizer is a term here (a method registered in `TERMS`) plus its phase in
`phases.build_phases`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol, Sequence

import torch

from distgan.backends.base import PhaseHandle
from distgan.config import LossConfig
from distgan.gan.ada import AdaptiveAugment
from distgan.gan.augment import diff_augment
from distgan.gan.augment_presets import multipliers
from distgan.gan.augpipe import AugmentPipe
from distgan.gan.losses import RELATIVISTIC, d_loss, g_loss, gradient_penalty, zero_centered_penalties
from distgan.gan.phases import Phase
from distgan.models.layers import independent_sets

Stats = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


class NoiseSource(Protocol):
    """Where the random inputs of the losses come from (tests key them by global sample index)."""

    def latents(self, n: int, z_dim: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator inputs: (z, class labels or None)."""

    def uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) draws (the interpolation weights of the gradient penalty)."""

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) draws shaped like `like` (the image-space directions of the path-length penalty)."""


class TorchNoise:
    """Draws from torch's global RNG (ranks are seeded differently, so each draws its own).

    Class labels follow `class_weights` (a device tensor of per-class weights, e.g. the data's
    class counts: `torch.multinomial` samples on the device, no host sync), else are uniform."""

    def __init__(self, class_weights: torch.Tensor | None = None):
        self.class_weights = class_weights

    def latents(self, n, z_dim, num_classes, device):
        z = torch.randn(n, z_dim, device=device)
        c = None
        if num_classes and self.class_weights is not None:
            c = torch.multinomial(self.class_weights, n, replacement=True)
        elif num_classes:
            c = torch.randint(0, num_classes, (n,), device=device)
        return z, c

    def uniform(self, shape, like):
        return torch.rand(shape, device=like.device, dtype=torch.float32).to(like.dtype)

    def normal(self, like):
        return torch.randn_like(like)


class _MicroBatch:
    """One micro-batch of one phase: its real images, the fakes generated for it (once), and the
    D forward the gradient penalties differentiate (shared with `d_adv` when in one phase)."""

    __slots__ = ("real", "real_c", "fake", "fake_c", "penalized", "inputs", "logits", "_grads")

    def __init__(self, real: torch.Tensor | None, real_c: torch.Tensor | None, penalized: tuple[str, ...]):
        self.real, self.real_c = real, real_c
        self.fake: torch.Tensor | None = None
        self.fake_c: torch.Tensor | None = None
        self.penalized = penalized
        """The penalties ("r1", "r2") this phase runs: their inputs need gradients."""
        self.inputs: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self._grads: dict[str, torch.Tensor] | None = None

    def penalty(self, name: str) -> torch.Tensor:
        """Per-sample ||grad_x D(x)||^2 of "r1" (reals) or "r2" (fakes). Both come from one
        backward pass through D, taken the first time either is asked for."""
        if self._grads is None:
            names = [n for n in ("r1", "r2") if n in self.inputs]
            values = zero_centered_penalties(self.logits, [self.inputs[n] for n in names])
            self._grads = dict(zip(names, values))
        return self._grads[name]


class GANObjective:
    """The loss terms of every phase, and the little state they keep: the path-length penalty's
    running mean (saved with the checkpoint, the same on every rank) and, with ADA, the
    augmentation probability that `ada` adapts (the pipeline reads its device tensor)."""

    def __init__(self, cfg: LossConfig, z_dim: int, num_classes: int, batch_size: int, device: torch.device,
                 noise: NoiseSource | None = None, ada: AdaptiveAugment | None = None,
                 class_counts: Sequence[int] | None = None):
        self.cfg = cfg
        self.z_dim, self.num_classes = z_dim, num_classes
        self.batch_size = batch_size  # per-process batch of phases without real images
        self.device = device
        self.noise = noise or TorchNoise(self._class_weights(cfg, num_classes, class_counts, device))
        self.relativistic = cfg.objective in RELATIVISTIC
        # Scheduled weights: the trainer sets their current values (`set_hyperparameters`).
        self.r1_gamma, self.r2_gamma = cfg.r1_gamma.at(0), cfg.r2().at(0)
        self.ada = ada
        self.pipe = (AugmentPipe(ada.p if ada else cfg.augment_p.at(0), multipliers(cfg.augment, cfg.augment_ops),
                                 supersample=cfg.augment_supersample)
                     if cfg.augment else None)
        self._augment: Callable[[torch.Tensor], torch.Tensor] = self._augmenter(cfg.diffaugment, self.pipe)
        self.pl_mean = torch.zeros((), device=device)
        """Running mean `a` of the generator's path lengths (StyleGAN2), the penalty's target."""
        self._pl_sums = torch.zeros(2, device=device)  # [sum of lengths, count] of the running phase

    @staticmethod
    def _class_weights(cfg: LossConfig, num_classes: int, class_counts: Sequence[int] | None,
                       device: torch.device) -> torch.Tensor | None:
        """The fakes' class weights under `loss.fake_labels=data` (None: uniform). Made once here,
        so that drawing labels in the step copies nothing from the host."""
        if not num_classes or cfg.fake_labels != "data":
            return None
        if class_counts is None or len(class_counts) != num_classes or sum(class_counts) <= 0:
            log.warning("loss.fake_labels=data: the data's manifest (dataset.json) records no class counts for its %d "
                        "classes (shards made before distgan recorded them); fake labels are drawn uniformly. "
                        "Re-make the shards with `distgan shards` to draw them from the data.", num_classes)
            return None
        return torch.tensor([float(n) for n in class_counts], device=device)

    @staticmethod
    def _augmenter(policy: str, pipe: AugmentPipe | None) -> Callable[[torch.Tensor], torch.Tensor]:
        if pipe is not None and policy:
            return lambda x: diff_augment(pipe(x), policy)
        if pipe is not None:
            return pipe
        return (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)

    def set_hyperparameters(self, r1_gamma: float, r2_gamma: float, augment_p: float) -> None:
        """Current values of the scheduled loss settings."""
        self.r1_gamma, self.r2_gamma = r1_gamma, r2_gamma
        if self.pipe is not None and self.ada is None:  # ADA sets p itself
            self.pipe.p = augment_p

    def end_phase(self, phase: Phase, h: PhaseHandle) -> None:
        """After all micro-batches of `phase` (every rank calls it: a collective for `pl`)."""
        if "pl" in phase.terms:
            sums = h.backend.all_reduce_mean(self._pl_sums.clone())  # the ratio of means is the ratio of sums
            with torch.no_grad():
                self.pl_mean.lerp_(sums[0] / sums[1].clamp(min=1.0), self.cfg.pl_decay)
            self._pl_sums.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"pl_mean": self.pl_mean.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pl_mean.copy_(torch.as_tensor(state.get("pl_mean", 0.0)))

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.noise.latents(n, self.z_dim, self.num_classes, self.device)

    def accumulate_gradients(self, phase: Phase, h: PhaseHandle, real: torch.Tensor | None,
                             real_c: torch.Tensor | None, scale: float) -> Stats:
        """Run `phase`'s terms on one micro-batch and backward their sum times `phase.gain * scale`.

        Returns detached statistics (scalars or per-sample values, kept on the device and averaged
        only when logged: no host sync and no reduction here).
        """
        batch, stats = _MicroBatch(real, real_c, tuple(t for t in phase.terms if t in ("r1", "r2"))), {}
        loss: torch.Tensor | None = None
        for term in phase.terms:
            value, term_stats = TERMS[term](self, h, batch)
            loss = value if loss is None else loss + value
            stats.update(term_stats)
        stats["loss"] = loss.detach()
        factor = phase.gain * scale
        h.backward(loss * factor if factor != 1.0 else loss)
        return stats

    # ------------------------------------------------------------------ helpers
    def _fakes(self, h: PhaseHandle, batch: _MicroBatch, n: int, like: torch.Tensor) -> torch.Tensor:
        """`n` fakes for D's phases (no graph into G). Under a relativistic objective each fake
        takes the label of the real it is paired with."""
        z, c = self.latents(n)
        if self.relativistic and batch.real_c is not None:
            c = batch.real_c
        with torch.no_grad(), h.autocast():
            fake = h.G(z, c)
        batch.fake, batch.fake_c = (fake if fake.dtype == like.dtype else fake.to(like.dtype)), c
        return batch.fake

    def _d_forward(self, h: PhaseHandle, batch: _MicroBatch, parts: dict[str, torch.Tensor],
                   labels: list[torch.Tensor | None]) -> torch.Tensor:
        """D on the concatenated `parts` (augmented; ONE forward, so one DDP/ZeRO reduction and one
        R1/R2 double backward), with the penalized parts marked to need input gradients. Batch
        statistics (minibatch std) stay within each part, as in separate forwards."""
        for name in batch.penalized:
            if name in parts:
                parts[name] = parts[name].detach().requires_grad_(True)
                batch.inputs[name] = parts[name]
        both = self._augment(torch.cat(list(parts.values())))
        c = torch.cat(labels) if labels[0] is not None else None
        with independent_sets(len(parts)), h.autocast():
            batch.logits = h.D(both, c).float()
        return batch.logits

    # ------------------------------------------------------------------ terms
    def _g_adv(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """Generator adversarial loss on fresh fakes (D frozen by the handle); a relativistic
        objective runs D on the phase's reals too, in the same forward."""
        if not self.relativistic:
            z, c = self.latents(self.batch_size)
            with h.autocast():
                logits = h.D(self._augment(h.G(z, c)), c)
            return g_loss(self.cfg.objective, logits), {"D_fake": logits.detach()}
        real, n = batch.real, batch.real.shape[0]
        z, _ = self.latents(n)
        c = batch.real_c
        with h.autocast():
            fake = h.G(z, c)
        labels = torch.cat([c, c]) if c is not None else None
        with independent_sets(2), h.autocast():
            logits = h.D(self._augment(torch.cat([fake, real.to(fake.dtype)])), labels).float()
        fake_logits, real_logits = logits[:n], logits[n:]
        return (g_loss(self.cfg.objective, fake_logits, real_logits),
                {"D_fake": fake_logits.detach(), "D_real": real_logits.detach()})

    def _d_adv(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """Discriminator adversarial loss: real and fake through D in ONE forward."""
        real, n = batch.real, batch.real.shape[0]
        fake = self._fakes(h, batch, n, real)
        logits = self._d_forward(h, batch, {"r1": real, "r2": fake}, [batch.real_c, batch.fake_c])
        real_logits, fake_logits = logits[:n], logits[n:]
        # sign(D(real)): its mean is ADA's overfitting signal r_t, logged in every run.
        stats = {"D_real": real_logits.detach(), "D_fake": fake_logits.detach(), "D_real_sign": real_logits.detach().sign()}
        if self.ada is not None:
            self.ada.observe(real_logits)
        return d_loss(self.cfg.objective, real_logits, fake_logits), stats

    def _gp(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """WGAN-GP penalty between this micro-batch's reals and the fakes `d_adv` drew for it."""
        real = batch.real
        alpha = self.noise.uniform((real.shape[0],) + (1,) * (real.dim() - 1), real)
        gp = gradient_penalty(lambda x: h.D(x, batch.real_c).float(), real, batch.fake, alpha)
        return self.cfg.gp_weight * gp, {"gp": gp.detach()}

    def _penalty_forward(self, h: PhaseHandle, batch: _MicroBatch) -> torch.Tensor:
        """A lazy regularization phase's own D forward, on what its penalties need. Returns
        `logits.sum() * 0`: it keeps every D parameter in the graph (a penalty alone never
        reaches the final bias), which sharded/engine backends expect of each backward."""
        parts, labels = {"r1": batch.real}, [batch.real_c]
        if "r2" in batch.penalized:
            parts["r2"] = self._fakes(h, batch, batch.real.shape[0], batch.real)
            labels.append(batch.fake_c)
        if "r1" not in batch.penalized:
            del parts["r1"], labels[0]
        logits = self._d_forward(h, batch, parts, labels)
        if self.ada is not None and "r1" in parts:  # NVlabs counts the lazy R1 phase's reals in r_t too
            self.ada.observe(logits[:batch.real.shape[0]])
        return logits.sum() * 0

    def _penalty(self, h: PhaseHandle, batch: _MicroBatch, name: str, gamma: float) -> tuple[torch.Tensor, Stats]:
        anchor = self._penalty_forward(h, batch) if batch.logits is None else 0.0
        value = batch.penalty(name)
        return (gamma / 2) * value.mean() + anchor, {name: value.detach()}

    def _r1(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """R1: gamma/2 E||grad_x D(x)||^2 on real images."""
        return self._penalty(h, batch, "r1", self.r1_gamma)

    def _r2(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """R2: gamma/2 E||grad_x D(x)||^2 on fake images (R3GAN)."""
        return self._penalty(h, batch, "r2", self.r2_gamma)

    def _pl(self, h: PhaseHandle, batch: _MicroBatch) -> tuple[torch.Tensor, Stats]:
        """Path-length regularization (StyleGAN2, Karras et al. 2020): for random image-space
        directions y, the length of J_w^T y should not depend on w. Penalizes (|J_w^T y| - a)^2,
        `a` the running mean of the lengths, on `batch_size / pl_batch_shrink` fresh latents.

        The penalty pulls towards `a` moved by this micro-batch's mean length, with the gradient
        through that mean (`loss.pl_target=updated`, NVlabs), or towards `a` as it stood when the
        phase began (`phase_start`). Then `end_phase` moves `a` itself by the mean length over
        every micro-batch and rank (one small all-reduce per phase), so `a` is the same on every
        rank (NVlabs keeps one per rank, moved per micro-batch; on one process with one micro-batch
        the two agree exactly)."""
        cfg = self.cfg
        z, c = self.latents(max(1, self.batch_size // cfg.pl_batch_shrink))
        with h.autocast():
            images, ws = h.G(z, c, return_ws=True)
        # Directions scaled by 1/sqrt(pixels), so that the lengths do not grow with resolution.
        y = self.noise.normal(images).to(images.dtype) / math.sqrt(images.shape[2] * images.shape[3])
        (grads,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
        lengths = grads.float().square().sum(2).mean(1).sqrt()
        self._pl_sums[0] += lengths.detach().sum()
        self._pl_sums[1] += lengths.numel()
        target = self.pl_mean
        if cfg.pl_target == "updated":  # NVlabs: a moved by this batch first, its gradient kept
            target = self.pl_mean.lerp(lengths.mean(), cfg.pl_decay)
        penalty = (lengths - target).square()
        # `images.sum() * 0` keeps every G parameter in the graph (the last bias gets no
        # path-length gradient), which the sharded backends expect of each backward.
        loss = cfg.pl_weight * penalty.mean() + images.float().sum() * 0
        return loss, {"pl_length": lengths.detach(), "pl_penalty": penalty.detach(), "pl_mean": self.pl_mean.clone()}


TERMS: dict[str, Callable[[GANObjective, PhaseHandle, _MicroBatch], tuple[torch.Tensor, Stats]]] = {
    "g_adv": GANObjective._g_adv,
    "d_adv": GANObjective._d_adv,
    "gp": GANObjective._gp,
    "r1": GANObjective._r1,
    "r2": GANObjective._r2,
    "pl": GANObjective._pl,
}
"""Loss terms by the name a phase lists them under."""
