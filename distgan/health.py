"""Training health: notice, from the log rows, when a run has stopped learning.

GAN runs rarely crash when they fail; they keep going and produce nothing. Three failures are
common enough to watch for (e.g. "Which Training Methods for GANs do actually Converge?",
Mescheder et al. 2018; the StyleGAN2/3 and R3GAN training notes):

* **dead discriminator**: D outputs about 0 on real and fake images, its loss sits at the value
  of a constant D (2 ln 2 for the logistic loss) and its gradient norm has collapsed. D gives G
  no signal any more. Typical causes: a learning rate too high for the architecture (ReLU units
  that never fire again), or a gradient penalty that makes a flat D the easiest optimum.
* **discriminator wins outright**: D(real) - D(fake) keeps growing and G's loss explodes. G gets
  saturated, useless gradients. Typical causes: G learns too slowly, too many D steps, no
  augmentation on a small dataset, too little regularization.
* **sample collapse**: G's outputs for different latents become (nearly) the same image. It is
  measured as the spread of G's outputs over the fixed sample latents (the mean per-pixel
  standard deviation) and compared with the largest spread this run has had. Only a fall
  counts: early in a run the spread is small for a harmless reason (G runs in eval mode, and
  its batch-norm running statistics still hold their initial values), and it rises from there.

`HealthMonitor.check(step, row)` sees each log row (the trainer adds `health/sample_spread` to
it) and returns the warnings that start at this row. A condition must hold over `window`
consecutive rows, so one noisy row never warns; each detector warns once per run. The trainer
logs each warning, writes it into the row (`warning/<name>` in metrics.jsonl) and sends it as a
W&B alert. Nothing here reads a device value or talks to other ranks: it is host arithmetic on
the row the main process already has.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from distgan.gan.losses import d_loss, g_loss

SPREAD_KEY = "health/sample_spread"
"""Row key of the sample spread (the trainer measures it on the fixed sample latents)."""

DEAD_D, D_WINS, COLLAPSE = "dead_discriminator", "discriminator_wins", "sample_collapse"


@dataclass(frozen=True)
class HealthThresholds:
    """When each detector fires. Defaults were set on runs that failed that way and runs that
    trained well (tests/integration/test_health.py)."""

    window: int = 5
    """Consecutive log rows a condition must hold before it warns."""
    dead_logit: float = 0.05
    """Dead D: |mean D logit| on real and on fake images below this."""
    dead_loss: float = 0.02
    """Dead D: D's loss within this fraction (at least this much absolutely) of a constant D's."""
    dead_grad_fraction: float = 0.05
    """Dead D: D's gradient norm below this fraction of its largest value in this run."""
    dead_grad_floor: float = 1e-4
    """Dead D: a gradient norm below this counts as collapsed even without a history (resumed run)."""
    win_margin: float = 6.0
    """D wins: D(real) - D(fake), in mean logits, above this (D is ~95% sure of both, logistic)..."""
    win_g_loss: float = 2.0
    """... and G's loss this far above its value against an undecided D, both still rising."""
    collapse_fraction: float = 0.1
    """Collapse: sample spread below this fraction of the largest spread in this run (a run
    resumed after its samples collapsed has no such history and is not warned about)."""


@dataclass(frozen=True)
class HealthWarning:
    name: str
    """Which detector: dead_discriminator, discriminator_wins or sample_collapse."""
    step: int
    """The generator step of the log row that completed the window."""
    message: str
    """One line: the step, the signal with its values, and what to try."""


def constant_d_loss(objective: str, gp_weight: float = 0.0) -> float:
    """D's main-phase loss when D outputs 0 for every image: the objective at zero logits, plus
    the gradient penalty of a flat critic for wgan-gp ((||grad|| - 1)^2 = 1 at a zero gradient).
    R1/R2 add nothing then (a flat D has no input gradient)."""
    zero = torch.zeros(1)
    value = float(d_loss(objective, zero, zero))
    return value + (gp_weight if objective == "wgan-gp" else 0.0)


def undecided_g_loss(objective: str) -> float:
    """G's loss against a D that outputs 0 (the reference for "G's loss exploded")."""
    zero = torch.zeros(1)
    try:
        return float(g_loss(objective, zero))
    except (TypeError, ValueError):  # a relativistic loss needs real logits too
        return float(g_loss(objective, zero, zero))


def sample_spread(images: torch.Tensor) -> float:
    """Mean over pixels of the standard deviation over samples: ~0 when every latent gives the
    same image. One reduction over a batch the trainer already generates cheaply."""
    return float(images.detach().float().std(dim=0).mean())


class HealthMonitor:
    """Watches log rows for a dead D, a D that wins outright and sample collapse."""

    def __init__(self, objective: str, gp_weight: float = 0.0, thresholds: HealthThresholds | None = None):
        self.t = thresholds or HealthThresholds()
        self.objective = objective
        self.constant_d_loss = constant_d_loss(objective, gp_weight)
        self.undecided_g_loss = undecided_g_loss(objective)
        self.rows: deque[dict[str, float]] = deque(maxlen=self.t.window)
        self.peak_d_grad = 0.0
        self.peak_spread = 0.0
        self.fired: set[str] = set()

    def check(self, step: int, row: dict[str, float]) -> list[HealthWarning]:
        """The warnings that fire at this row (each detector at most once per run)."""
        self.peak_d_grad = max(self.peak_d_grad, _get(row, "D/grad_norm", 0.0))
        self.peak_spread = max(self.peak_spread, _get(row, SPREAD_KEY, 0.0))
        self.rows.append(row)
        if len(self.rows) < self.t.window:
            return []
        found = []
        for name, detect in ((DEAD_D, self._dead_d), (D_WINS, self._d_wins), (COLLAPSE, self._collapse)):
            if name in self.fired:
                continue
            message = detect(step)
            if message:
                self.fired.add(name)
                found.append(HealthWarning(name, step, message))
        return found

    # ------------------------------------------------------------------ detectors
    def _dead_d(self, step: int) -> str:
        t, rows = self.t, list(self.rows)
        grad_limit = max(t.dead_grad_floor, t.dead_grad_fraction * self.peak_d_grad)
        loss_tol = t.dead_loss * max(1.0, abs(self.constant_d_loss))
        for row in rows:
            real, fake = _get(row, "Dmain/D_real"), _get(row, "Dmain/D_fake")
            loss, grad = _get(row, "Dmain/loss"), _get(row, "D/grad_norm")
            if None in (real, fake, loss, grad):
                return ""
            if not (abs(real) < t.dead_logit and abs(fake) < t.dead_logit
                    and abs(loss - self.constant_d_loss) < loss_tol and grad < grad_limit):
                return ""
        last = rows[-1]
        return (f"step {step}: the discriminator looks dead for the last {len(rows)} log rows: D(real) "
                f"{last['Dmain/D_real']:+.3f} and D(fake) {last['Dmain/D_fake']:+.3f} (mean logits, ~0), D loss "
                f"{last['Dmain/loss']:.3f} (a constant D gives {self.constant_d_loss:.3f}), D grad norm "
                f"{last['D/grad_norm']:.2g} (peak {self.peak_d_grad:.2g}). G gets no signal. Try a lower optim.d_lr "
                "(and g_lr), a smaller loss.r1_gamma, or Adam betas with momentum (optim.d_betas=[0.5,0.999]).")

    def _d_wins(self, step: int) -> str:
        t, rows = self.t, list(self.rows)
        margins = [_margin(r) for r in rows]
        g_losses = [_get(r, "Gmain/loss") for r in rows]
        if None in margins or None in g_losses:
            return ""
        rising = margins[-1] > margins[0] and g_losses[-1] > g_losses[0]
        if not (rising and margins[-1] > t.win_margin and g_losses[-1] > self.undecided_g_loss + t.win_g_loss):
            return ""
        return (f"step {step}: the discriminator is winning outright: D(real) - D(fake) rose from {margins[0]:.2f} to "
                f"{margins[-1]:.2f} and the G loss from {g_losses[0]:.2f} to {g_losses[-1]:.2f} over the last "
                f"{len(rows)} log rows (G's gradients saturate). Try a higher optim.g_lr or a lower optim.d_lr, fewer "
                "optim.d_steps, augmentation (loss.diffaugment=color,translation,cutout) or a larger loss.r1_gamma.")

    def _collapse(self, step: int) -> str:
        t, rows = self.t, list(self.rows)
        spreads = [_get(r, SPREAD_KEY) for r in rows]
        if None in spreads:
            return ""
        limit = t.collapse_fraction * self.peak_spread
        if not all(s < limit for s in spreads):
            return ""
        return (f"step {step}: the samples have collapsed: G's outputs for different latents differ by {spreads[-1]:.2g} "
                f"(mean per-pixel std over the fixed sample latents; this run's largest was {self.peak_spread:.2g}) for "
                f"the last {len(rows)} log rows. Try a lower optim.g_lr, augmentation (loss.diffaugment=...), R1 "
                "(loss.r1_gamma) or another objective (loss.objective=hinge); resume from a checkpoint before it.")


def _get(row: dict[str, float], key: str, default: float | None = None) -> float | None:
    value = row.get(key, default)
    return float(value) if isinstance(value, (int, float)) else default


def _margin(row: dict[str, float]) -> float | None:
    real, fake = _get(row, "Dmain/D_real"), _get(row, "Dmain/D_fake")
    return None if real is None or fake is None else real - fake


__all__ = ["HealthMonitor", "HealthThresholds", "HealthWarning", "SPREAD_KEY", "constant_d_loss", "sample_spread",
           "undecided_g_loss"]
