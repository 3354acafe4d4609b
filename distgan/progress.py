"""The training progress bar (main process): steps done, and when the run is expected to end.

A run ends at `train.steps` or, with `train.max_minutes`, at the first log step after that many
minutes of training (evaluations excluded), whichever comes first. A bar whose total is always
`train.steps` promises the wrong end when the time budget binds (a default run showed 12,000 steps
and a 33-minute ETA for a run that stopped after 19 minutes). So at every log step the total is
re-estimated from the measured training rate of this launch: the steps the time left allows,
rounded up to the log step where the stop is decided, capped at `train.steps`. tqdm's ETA is then
the earlier of the two ends.

Only host clocks and host counters are read here (the trainer's `train_seconds` and step): the bar
adds no host-device synchronisation to a step.
"""

from __future__ import annotations

import math
import os

from tqdm.auto import tqdm

from distgan.config import Config

NO_PROGRESS_ENV = "DISTGAN_NO_PROGRESS"


def expected_total(step: int, steps_budget: int, launch_steps: int, train_seconds: float, max_seconds: float,
                   log_every: int) -> int:
    """The step the run is expected to stop at.

    `step`: steps done so far; `launch_steps` of them trained by this launch in `train_seconds`
    (its training time, the clock `train.max_minutes` is checked against); `max_seconds` the time
    budget (<= 0: none). Without a budget or before any measured step, `steps_budget`. Otherwise
    the steps the remaining time allows at the measured rate, rounded up to the next multiple of
    `log_every` (the budget is checked at log steps only), never below `step` nor above
    `steps_budget`."""
    if max_seconds <= 0 or launch_steps <= 0 or train_seconds <= 0:
        return steps_budget
    seconds_left = max(0.0, max_seconds - train_seconds)
    if seconds_left == 0:
        return min(step, steps_budget)  # the budget is spent: this log step is the last
    by_time = step + seconds_left * launch_steps / train_seconds
    by_time = math.ceil(by_time / log_every) * log_every
    return max(step, min(steps_budget, by_time))


def postfix(row: dict[str, float]) -> str:
    """The bar's short summary of a log row: kimg, img/s and the main losses."""
    parts = [f"kimg {row['kimg']:.1f}", f"{row['img_per_s']:.0f} img/s"]
    for key in ("Dmain/loss", "Gmain/loss"):
        if key in row:
            parts.append(f"{key.split('/')[0][0]} {row[key]:.3f}")
    return ", ".join(parts)


class TrainingProgress:
    """The bar of one launch: `update()` every step, `log_step()` at log steps (re-estimates the
    total), `close()` at the end. Disabled off the main process, with `train.progress=false` or
    DISTGAN_NO_PROGRESS=1."""

    def __init__(self, cfg: Config, is_main: bool, initial: int, file=None):
        self.steps_budget, self.initial = cfg.train.steps, initial
        self.max_seconds, self.log_every = cfg.train.max_minutes * 60, cfg.train.log_every
        disable = not (is_main and cfg.train.progress) or os.environ.get(NO_PROGRESS_ENV) == "1"
        self.bar = tqdm(total=self.steps_budget, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                        desc="train", file=file)  # file: None is stderr
        self.time_bound = False
        """The time budget, not train.steps, is expected to end the run (the total shows its estimate)."""

    @property
    def total(self) -> int:
        return int(self.bar.total)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log_step(self, step: int, train_seconds: float, row: dict[str, float]) -> None:
        """At a log step: show the row's summary and move the total to the expected end."""
        total = expected_total(step, self.steps_budget, step - self.initial, train_seconds, self.max_seconds,
                               self.log_every)
        self.time_bound = total < self.steps_budget
        self.bar.total = total
        minutes = f"{self.max_seconds / 60:g} min" if self.time_bound else ""
        self.bar.set_description_str(f"train (ends by time: {minutes})" if minutes else "train", refresh=False)
        self.bar.set_postfix_str(postfix(row), refresh=False)

    def close(self) -> None:
        self.bar.close()
