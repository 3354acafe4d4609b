"""Hyperparameters that follow a schedule over training (R3GAN anneals lr, beta2, gamma, EMA, augmentation).

A config field typed `Scheduled` accepts a plain number (constant) or a mapping

    optim.g_lr: {start: 2e-4, end: 5e-5, kimg: 20000, shape: cosine}

and is read with `value.at(nimg)`. Values are functions of the images shown to D so far (the
run's `nimg`), never of the step or the rank: a resumed run, or one on another world size, gets
the same value at the same kimg. After `kimg` thousand images the value stays at `end`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from distgan.errors import ConfigError

SHAPES: dict[str, Callable[[float], float]] = {
    "cosine": lambda t: 0.5 * (1.0 - math.cos(math.pi * t)),  # as R3GAN's cosine_decay_with_warmup
    "linear": lambda t: t,
}
"""Fraction of the way from `start` to `end` at progress t in [0, 1]."""

_KEYS = ("start", "end", "kimg", "shape")


class Scheduled:
    """A number that may change with images seen; equal to a float when it is a constant."""

    __slots__ = ("start", "end", "kimg", "shape")

    def __init__(self, start: float, end: float | None = None, kimg: float = 0.0, shape: str = "cosine"):
        self.start = float(start)
        self.end = self.start if end is None else float(end)
        self.kimg = float(kimg)
        self.shape = shape

    @property
    def constant(self) -> bool:
        return self.end == self.start or self.kimg <= 0

    def at(self, nimg: float) -> float:
        """The value after `nimg` images shown to D."""
        if self.constant:
            return self.start
        t = min(max(nimg / (self.kimg * 1000.0), 0.0), 1.0)
        return self.start + SHAPES[self.shape](t) * (self.end - self.start)

    def endpoints(self) -> tuple[float, float]:
        return self.start, self.end

    def nonzero(self) -> bool:
        """True if the value is ever non-zero (turns the term it weights on)."""
        return self.start != 0 or (not self.constant and self.end != 0)

    def to_plain(self) -> float | dict[str, Any]:
        """YAML/JSON form: the number for a constant, else the mapping."""
        if self.constant:
            return self.start
        return {"start": self.start, "end": self.end, "kimg": self.kimg, "shape": self.shape}

    @classmethod
    def parse(cls, value: Any, key: str) -> "Scheduled":
        """From a number, a numeric string or a {start, end, kimg, shape} mapping."""
        if isinstance(value, Scheduled):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(_KEYS))
            if unknown or "start" not in value:
                problem = f"unknown keys {unknown}" if unknown else "'start' is missing"
                raise ConfigError(f"{key}: a schedule is {{start, end, kimg, shape}}; {problem} in {value!r}.")
            shape = str(value.get("shape", "cosine"))
            if shape not in SHAPES:
                raise ConfigError(f"{key}: schedule shape {shape!r} is not one of {', '.join(SHAPES)}.")
            try:
                kimg = float(value.get("kimg", 0.0))
                sched = cls(_number(value["start"], key), _number(value.get("end", value["start"]), key), kimg, shape)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: schedule values must be numbers, got {value!r}.") from None
            if (sched.end != sched.start) and kimg <= 0:
                raise ConfigError(f"{key}: a schedule from {sched.start:g} to {sched.end:g} needs kimg > 0 "
                                  "(the thousands of images over which it changes).")
            return sched
        return cls(_number(value, key))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Scheduled):
            return self.to_plain() == other.to_plain()
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self.constant and self.start == other
        return NotImplemented

    def __hash__(self) -> int:
        plain = self.to_plain()
        return hash(plain if isinstance(plain, float) else tuple(plain.items()))

    def __repr__(self) -> str:
        plain = self.to_plain()
        if isinstance(plain, float):
            return repr(plain)
        return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in plain.items()) + "}"


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or isinstance(value, (dict, list, tuple)):
        raise ConfigError(f"{key}: expected a number or a schedule {{start, end, kimg, shape}}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number or a schedule {{start, end, kimg, shape}}, got {value!r}") from None


__all__ = ["Scheduled", "SHAPES"]
