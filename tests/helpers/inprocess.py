"""Train in the test process (tests whose hooks reach into the live networks, and quick recipe
runs that should not pay an interpreter start each)."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from distgan.config import Config
from distgan.run import run


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_in_process(cfg: Config, hooks=()) -> list[dict]:
    """Train `cfg` to the end in this process; returns its metric rows.

    Accelerate keeps its state in process-wide singletons; they are reset first so that each run
    starts like a fresh `distgan train` (as rank_harness does between the runs of one launch)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    assert run(cfg, hooks=list(hooks)) == "done"
    return metric_rows(cfg.run_dir)


def build_trainer(cfg: Config):
    """A real single-process Trainer for `cfg` (seeded, fresh Accelerate state), not started: for
    tests that drive its steps themselves."""
    import torch

    from distgan.backends import build_backend
    from distgan.data import build_stream
    from distgan.models import build_models
    from distgan.trainer import Trainer

    AcceleratorState._reset_state()
    GradientState._reset_state()
    torch.manual_seed(cfg.train.seed)
    stream = build_stream(cfg.data, cfg.train.seed, 0, 1)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
    return Trainer(cfg, build_backend(cfg), stream, G, D)
