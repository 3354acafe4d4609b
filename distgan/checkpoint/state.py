"""The run's small state objects, each saving and loading itself for the checkpointer.

A checkpoint is a set of named objects with `state_dict()` / `load_state_dict()` (`Stateful`).
Where each one is stored depends on its `Scope`: full network weights as safetensors, state that
is the same on every rank in state.json, state of each rank in that rank's files, and state that
the backend writes itself in a collective (sharded optimizers).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from distgan.checkpoint.legacy import older_checkpoint_changes
from distgan.config import frozen_keys
from distgan.errors import ConfigError
from distgan.schedules import Scheduled

log = logging.getLogger("distgan")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Scope(enum.Enum):
    WEIGHTS = "weights"
    """An nn.Module with full weights: `<name>.safetensors`, written by the main process."""
    SHARED = "shared"
    """The same on every rank (JSON, tensors allowed): `state.json`, written by the main process."""
    PER_RANK = "per_rank"
    """Different on each rank: `rank-RRRRR.json` + `.safetensors`, written by every rank."""
    COLLECTIVE = "collective"
    """Saved by the object itself into the checkpoint folder, on every rank (`save(folder)` /
    `load(folder)`): optimizer state that a backend may shard."""


@dataclass
class TrainState:
    """Counters of a run."""

    step: int = 0
    """Generator steps done."""
    d_step: int = 0
    """Discriminator steps done (each a fresh real batch)."""
    nimg: int = 0
    """Real images shown to D, summed over ranks (kimg = nimg / 1000)."""
    eval_owed: bool = False
    """The evaluation due at this step was given up for a preemption: a run resumed from this
    checkpoint runs it before training on (the final evaluation is not lost to a requeue)."""

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "d_step": self.d_step, "nimg": self.nimg, "eval_owed": int(self.eval_owed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.d_step, self.nimg = int(state["step"]), int(state["d_step"]), int(state["nimg"])
        self.eval_owed = bool(state.get("eval_owed", 0))  # absent from checkpoints written before it existed


@dataclass
class RunFacts:
    """What the run is, besides its numbers: the W&B run id (a requeued job logs into the same run)
    and the class names of its data (sample grids and `distgan sample` label rows with them)."""

    tracker_id: str = ""
    class_names: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {"tracker_id": self.tracker_id, "class_names": list(self.class_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker_id = state.get("tracker_id", "")
        self.class_names = tuple(state.get("class_names", ()))


class BestRecord:
    """The one owner of "best": the best value of a metric so far and the step that reached it.

    Saved with every checkpoint (a requeued run keeps comparing against it); identical on every
    rank because every rank offers the same (all-reduced) metric, so all agree without a collective.
    """

    def __init__(self, metric: str = "fid", lower_is_better: bool = True):
        self.metric, self.lower_is_better = metric, lower_is_better
        self.value: float | None = None
        self.step: int | None = None

    def offer(self, value: float, step: int) -> bool:
        """Record `value` if it beats the best so far; NaN never wins."""
        if value != value:
            return False
        if self.value is not None and not (value < self.value if self.lower_is_better else value > self.value):
            return False
        self.value, self.step = float(value), step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step, "lower_is_better": self.lower_is_better}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step = state.get("value"), state.get("step")


# ---------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch CPU (+ current CUDA device) generator states."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngStreams:
    """This process's random generators as checkpoint state.

    A loaded state is held back and applied by the trainer right before its next step
    (`apply_loaded`), so that whatever draws random numbers while the loop is being set up
    (tracker, data iterator) cannot shift the resumed run away from the uninterrupted one.
    A checkpoint of another world size has no state for this rank: `rederive` seeds the streams
    from (this process's seed, the step), so a resumed run on a new world size is reproducible
    and never replays the latents of the run's first steps.
    """

    carries_over_world_change = False

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def rederive(self, rank: int, step: int) -> None:
        """Streams for `rank` at `step` of a run resumed on another world size: a pure function of
        the per-rank seed that `run.py` set (torch.initial_seed()) and the step."""
        seed = int.from_bytes(hashlib.sha256(f"{torch.initial_seed()}:{rank}:{step}".encode()).digest()[:8], "little")
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self._loaded = capture_rng()

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def apply_loaded(self) -> None:
        if self._loaded is not None:
            restore_rng(self._loaded)
            self._loaded = None


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the training RNG streams: whatever it draws (a DataLoader
    starting its workers seeds them from torch's global RNG; an evaluation builds its own data
    loader) is undone afterwards, so a resumed run, which starts such things at other times than
    an uninterrupted one, still draws exactly the same numbers for training."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


# ---------------------------------------------------------------------------- resume compatibility

# Keys besides config.frozen_keys() that change the networks. The backend (dist.backend,
# dist.zero_stage, dist.fsdp) and the world size may change: optimizer state is stored whole and
# keyed by parameter name (checkpoint.format.write_optimizer).
_ALSO_FROZEN = ("model.g_norm",)


def check_resume_compatible(saved: dict, current: dict) -> None:
    """Run-length, logging, data and loss-weight keys may change on resume; keys that define the
    networks or the optimizers may not (the optimizer's lr/betas come back from the checkpoint,
    so a changed value would be silently ignored)."""

    def get(cfg: dict, key: str):
        section, name = key.split(".")
        return cfg.get(section, {}).get(name)

    changed = []
    for key in (*frozen_keys(), *_ALSO_FROZEN):
        old, new = get(saved, key), get(current, key)
        if old is not None and old != new:
            changed.append(f"{key}: checkpoint has {old!r}, config has {new!r}")
    # R1 on/off switches D's Adam to lazy-regularization lr/betas (its value alone may change).
    old_r1, new_r1 = get(saved, "loss.r1_gamma"), get(current, "loss.r1_gamma")
    if old_r1 is not None and Scheduled.parse(old_r1, "loss.r1_gamma").nonzero() != Scheduled.parse(new_r1, "loss.r1_gamma").nonzero():
        changed.append(f"loss.r1_gamma: checkpoint has {old_r1!r}, config has {new_r1!r} (turns lazy R1 on/off)")
    # A checkpoint saved before a key existed trained with that key's old behaviour (checkpoint/legacy.py).
    errors, warnings = older_checkpoint_changes(saved, current)
    changed += errors
    for line in warnings:
        log.warning("Resuming: %s", line)
    if changed:
        raise ConfigError("Cannot resume with a config that changes the networks or optimizers:\n  " + "\n  ".join(changed)
                          + "\nStart a new run (train.run_dir=...) or set train.resume=none.")
