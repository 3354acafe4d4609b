"""The run's scheduled hyperparameters, evaluated at the images seen so far.

Every setting R3GAN anneals is a `Scheduled` config value (learning rates, Adam betas, R1/R2
gamma, EMA half-life, augmentation probability). `Hyperparameters.at(nimg)` gives their values
after `nimg` images; the trainer hands them to the optimizers, the objective and the EMA before
each step (only when something actually varies) and logs them. Being functions of `nimg` alone,
they need no checkpoint state: a resumed run or another world size sees the same values.
"""

from __future__ import annotations

from distgan.backends.base import AdamSpec
from distgan.config import Config
from distgan.gan.phases import Schedule, lazy_reg_adam_params
from distgan.schedules import Scheduled


class Hyperparameters:
    def __init__(self, cfg: Config, schedule: Schedule):
        o, loss = cfg.optim, cfg.loss
        self.settings: dict[str, Scheduled] = {
            "G/lr": o.g_lr, "G/beta1": o.g_betas[0], "G/beta2": o.g_betas[1],
            "D/lr": o.d_lr, "D/beta1": o.d_betas[0], "D/beta2": o.d_betas[1],
            "r1_gamma": loss.r1_gamma, "r2_gamma": loss.r2(),
            "ema_halflife_kimg": o.ema_halflife_kimg, "augment_p": loss.augment_p,
        }
        self.scheduled = tuple(name for name, value in self.settings.items() if not value.constant)
        """Names of the settings that change during the run (logged as `schedule/<name>`)."""
        self.varies = bool(self.scheduled)
        self._reg_interval = {net: schedule.reg_interval(net) for net in ("G", "D")}
        self._adam_impl = o.adam_impl

    def at(self, nimg: float) -> dict[str, float]:
        return {name: value.at(nimg) for name, value in self.settings.items()}

    def adam(self, values: dict[str, float], net: str) -> AdamSpec:
        """`net`'s Adam settings, corrected for its lazy regularization phase if it has one."""
        lr, betas = lazy_reg_adam_params(values[f"{net}/lr"], (values[f"{net}/beta1"], values[f"{net}/beta2"]),
                                         self._reg_interval[net])
        return AdamSpec(lr, betas, self._adam_impl)

    def logged(self, values: dict[str, float]) -> dict[str, float]:
        return {f"schedule/{name}": values[name] for name in self.scheduled}


__all__ = ["Hyperparameters"]
