"""The GAN alternation as data, in the manner of stylegan2-ada's training loop.

One training iteration is `d_steps` discriminator steps (each a D main phase, followed by a
lazy R1 phase when one is due) and then one generator step. Each phase names the network it
trains, how often it runs and how its loss is weighted; the trainer simply walks the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgan.config import Config


@dataclass(frozen=True)
class Phase:
    name: str
    """Dmain, Dreg or Gmain (shown in logs and errors)."""
    net: str
    """The network this phase trains: "G" or "D"."""
    interval: int = 1
    """Run when this network's step counter is a multiple of it (lazy regularization)."""
    gain: float = 1.0
    """Loss multiplier; a lazy regularizer run every k steps is weighted by k."""
    manual_sync: bool = False
    """Double backward inside: bypass the DDP reducer and all-reduce gradients by hand."""

    def due(self, counter: int) -> bool:
        return counter % self.interval == 0


def build_phases(cfg: Config) -> list[Phase]:
    """The phases of one iteration, in order: (Dmain [, Dreg]) x d_steps, Gmain."""
    d_phases = [Phase("Dmain", "D", manual_sync=cfg.loss.objective == "wgan-gp")]
    if cfg.loss.r1_gamma > 0:
        k = cfg.loss.r1_interval
        d_phases.append(Phase("Dreg", "D", interval=k, gain=float(k), manual_sync=True))
    return d_phases * cfg.optim.d_steps + [Phase("Gmain", "G")]
