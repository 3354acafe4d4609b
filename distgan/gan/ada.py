"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data").

When D starts to memorize a small training set, its outputs on real images drift positive. ADA
measures this with the overfitting heuristic r_t = E[sign(D(x_real))] and moves the probability
`p` of the augmentations so as to hold r_t at a target (0.6): every `interval` D steps,

    p <- max(p + sign(r_t - target) * batch * interval / (ada_kimg * 1000), 0)

where `batch` is the global batch of one D step, so p can cross [0, 1] in `ada_kimg` thousand
images whatever the batch and the number of processes. As NVlabs (training_loop.py, "Execute ADA
heuristic"), p is clamped at 0 only and may climb past 1 (the augmentation pipeline treats a
probability above 1 as 1); `loss.augment_p_max` > 0 adds an upper clamp (distgan's option: p then
responds at the next adjustment once r_t falls, instead of first coming back down through the
excess), 0 (the default) none.

r_t counts the real logits of every D phase that runs D on reals: the main D step and the lazy R1
phase (NVlabs reports `Loss/signs/real` from both). As NVlabs, the trainer calls `d_steps_done`
after all the phases of a step, so a lazy R1 phase in the step of an adjustment counts towards it.
When one generator step holds several due adjustments (`loss.ada_interval` below `optim.d_steps`;
NVlabs has one D step per iteration), they are one r_t over all their signs, moving p by that
many steps: adjusting twice in a row would read the second r_t from no signs at all.
Golden fixture: tests/fixtures/golden/augment/ada.safetensors (NVlabs' update, 200 adjustments).

Host syncs: none. `p`, the running sums and r_t are device tensors; the augmentation pipeline
reads `p` as a tensor, so the adjustment is a few device ops and one small all-reduce (the signs
of every rank count) every `interval` D steps.

Checkpoint: `p` is the same on every rank; the sums since the last adjustment are per rank, so the
controller is saved with each rank's state and a resume on the same world size continues exactly.
On another world size the partial sums (at most `interval` - 1 D steps of signal) start again
from zero and `p` carries over.
"""

from __future__ import annotations

from typing import Any

import torch

from distgan.backends.base import Backend


class AdaptiveAugment:
    carries_over_world_change = True
    """The checkpointer hands rank 0's saved state to every rank when the world size changed."""

    def __init__(self, backend: Backend, initial_p: float, target: float, kimg: float, interval: int,
                 p_max: float, images_per_d_step: int):
        """`p_max`: upper clamp of p, 0 for none (NVlabs)."""
        self.backend, self.target, self.interval, self.p_max = backend, target, interval, p_max
        self.step_size = images_per_d_step * interval / (kimg * 1000)
        """|change of p| per adjustment."""
        device = backend.device
        self.p = torch.tensor(float(initial_p), device=device)
        """The current probability (a 0-d device tensor the augmentation pipeline reads)."""
        self.rt = torch.zeros((), device=device)
        """r_t measured at the last adjustment (logged)."""
        self._sums = torch.zeros(2, device=device)  # [sum of sign(D(real)), number of reals] on this rank

    def observe(self, real_logits: torch.Tensor) -> None:
        """Count the signs of D's outputs on a micro-batch of real images."""
        self._sums[0] += real_logits.detach().float().sign().sum()
        self._sums[1] += real_logits.numel()

    def d_steps_done(self, before: int, after: int) -> None:
        """After a generator step whose D steps took the run's count from `before` to `after`:
        adjust p once per multiple of `interval` passed, from all the signs since the last one."""
        due = after // self.interval - before // self.interval
        if due > 0:
            self.adjust(due)

    @torch.no_grad()
    def adjust(self, times: int = 1) -> None:
        """`times` ADA updates from the signs of every rank since the last one (a collective). In
        place: the augmentation pipeline holds `p` itself."""
        sums = self.backend.all_reduce_mean(self._sums.clone())  # the ratio of the means is the ratio of the sums
        self.rt.copy_(sums[0] / sums[1].clamp(min=1.0))
        self.p.add_(torch.sign(self.rt - self.target) * (self.step_size * times)).clamp_(0.0, self.p_max or None)
        self._sums.zero_()

    def logged(self) -> dict[str, torch.Tensor]:
        return {"ada/p": self.p, "ada/rt": self.rt}

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p.detach().cpu().clone(), "rt": self.rt.detach().cpu().clone(),
                "sums": self._sums.detach().cpu().clone(), "world_size": self.backend.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p.copy_(torch.as_tensor(state["p"]))
        self.rt.copy_(torch.as_tensor(state["rt"]))
        same_world = int(state["world_size"]) == self.backend.world_size
        self._sums.copy_(torch.as_tensor(state["sums"]) if same_world else torch.zeros(2))


__all__ = ["AdaptiveAugment"]
