"""The GAN alternation as data, in the manner of stylegan2-ada's training loop.

One generator step is `d_steps` discriminator steps (each a D main phase, followed by a lazy R1
phase when one is due) and then one G main phase. A phase declares what it trains, the data it
needs, how often it runs, how its loss is weighted and which loss terms it runs; the trainer
walks the due phases without knowing their names, the backend serves each one a handle, and
only the objective knows what a term computes.

Adding a regularizer phase means a line in `build_phases` and its term in `objective.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgan.config import Config
from distgan.gan.losses import RELATIVISTIC

REAL_FRESH, REAL_OWN, REAL_LAST, REAL_NONE = "fresh", "own", "last", "none"


@dataclass(frozen=True)
class Phase:
    name: str
    """Dmain, Dreg, Gmain, ... (shown in logs and errors, prefix of its logged statistics)."""
    net: str
    """The network this phase trains: "G" or "D"."""
    terms: tuple[str, ...]
    """Loss terms the objective runs and sums, e.g. ("d_adv",) or ("r1",)."""
    real: str = REAL_NONE
    """Real images it needs: `fresh` draws new micro-batches (counted as images shown to D),
    `own` draws new ones that are not (R3GAN's G step), `last` reuses the latest drawn ones,
    `none` needs none."""
    interval: int = 1
    """Run on every `interval`-th occurrence in the schedule (lazy regularization)."""
    gain: float = 1.0
    """Loss multiplier; a lazy regularizer run every k occurrences is weighted by k."""
    double_backward: bool = False
    """Its loss differentiates through a gradient (R1, gradient penalty): the backend syncs its
    gradients by hand, since DDP's reducer cannot."""
    regularizer: bool = False
    """A separate regularization step of its network (lazy or not): that network's Adam is
    corrected for the extra steps (`lazy_reg_adam_params`)."""

    @property
    def draws_reals(self) -> bool:
        """It takes new micro-batches from the data stream (`fresh` or `own`)."""
        return self.real in (REAL_FRESH, REAL_OWN)


class Schedule:
    """The phases of one generator step, and which of them are due at a given step.

    A phase's occurrence count is derived from the step (occurrences per step x step + its slot),
    so lazy phases need no counters of their own and resume on the same cadence.
    """

    def __init__(self, phases: list[Phase]):
        self.phases = phases
        per_step: dict[Phase, int] = {}
        self._slots: list[tuple[Phase, int]] = []
        for phase in phases:
            self._slots.append((phase, per_step.get(phase, 0)))
            per_step[phase] = per_step.get(phase, 0) + 1
        self._per_step = per_step
        self._always = list(phases) if all(p.interval == 1 for p in phases) else None

    def due(self, step: int) -> list[Phase]:
        """The phases to run, in order, in generator step `step` (0-based)."""
        if self._always is not None:
            return self._always
        return [p for p, slot in self._slots if (step * self._per_step[p] + slot) % p.interval == 0]

    def reg_interval(self, net: str) -> int:
        """The interval of `net`'s regularization phase (0: it has none)."""
        return max((p.interval for p in self.phases if p.net == net and p.regularizer), default=0)


def build_phases(cfg: Config) -> list[Phase]:
    """The phases of one generator step, in order: (Dmain [, Dreg]) x d_steps, Gmain [, Greg].

    R1/R2 with `loss.r1_interval=1` run inside Dmain, differentiating the same D forward as the
    adversarial loss (R3GAN); a longer interval makes them a lazy Dreg phase of their own.
    A relativistic objective's G phase draws its own reals (`loss.g_reals=fresh`, R3GAN) or reuses
    those of the step's last D phase (`reuse`). Path-length
    regularization (`loss.pl_weight`) is a lazy G phase every `loss.pl_interval` G steps.
    """
    loss = cfg.loss
    gp = loss.objective == "wgan-gp"
    penalties = loss.penalties()
    lazy = loss.r1_interval > 1
    d_terms = ("d_adv", "gp") if gp else ("d_adv",)
    if penalties and not lazy:
        d_terms += penalties
    d_phases = [Phase("Dmain", "D", d_terms, real=REAL_FRESH, double_backward=gp or (bool(penalties) and not lazy))]
    if penalties and lazy:
        k = loss.r1_interval
        d_phases.append(Phase("Dreg", "D", penalties, real=REAL_LAST, interval=k, gain=float(k),
                              double_backward=True, regularizer=True))
    g_real = REAL_NONE
    if loss.objective in RELATIVISTIC:
        g_real = REAL_OWN if loss.g_reals == "fresh" else REAL_LAST
    g_phases = [Phase("Gmain", "G", ("g_adv",), real=g_real)]
    if loss.pl_weight > 0:  # StyleGAN2's path-length regularization, lazy like R1
        k = loss.pl_interval
        g_phases.append(Phase("Greg", "G", ("pl",), interval=k, gain=float(k), double_backward=True, regularizer=True))
    return d_phases * cfg.optim.d_steps + g_phases


def lazy_reg_adam_params(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """Adam settings corrected for lazy regularization (StyleGAN2, Karras et al. 2020, App. B).

    When the regularizer runs every ``interval`` steps, the optimizer effectively takes
    ``interval + 1`` steps per ``interval`` minibatches, so lr is scaled by c = interval/(interval+1)
    and the betas raised to the power c to keep the same momentum time scale in images.
    ``interval <= 0`` (no lazy regularization) returns the inputs unchanged.
    """
    if interval <= 0:
        return lr, (betas[0], betas[1])
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)
