"""What every in-process benchmark shares: batches held in memory, a stream over them, distgan's
Trainer set up for timing (and its seconds per step), and the benchmark config.

`time_distgan` runs 2N steps and times the second N (the first N warm up allocators, the loader
workers and the autotuner).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from distgan.backends import build_backend
from distgan.config import Config
from distgan.data.stream import DatasetInfo
from distgan.models import build_models
from distgan.run import load_from_args
from distgan.tracking import read_metrics
from distgan.trainer import Trainer


class InMemoryStream:
    """The stream interface over batches already in memory (no decoding, no workers)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], class_names: list | None = None):
        self.batches = batches
        images = batches[0][0]
        self.info = DatasetInfo(len(batches) * images.shape[0], images.shape[-1], images.shape[1], class_names or [],
                                "memory")
        self.position = 0

    def __iter__(self):
        while True:
            yield self.batches[self.position % len(self.batches)]
            self.position += 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def stats(self) -> dict:
        return {"skipped": 0}

    def close(self) -> None:
        pass


def random_batches(cfg: Config, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return [(torch.rand(shape, generator=g) * 2 - 1, torch.zeros(shape[0], dtype=torch.long)) for _ in range(count)]


def bench_trainer(cfg: Config, stream, run_dir: str, steps: int) -> Trainer:
    """distgan's Trainer as a benchmark runs it: `steps` steps in `run_dir`, one log row every
    `log_every` steps, no W&B, no evaluation, samples and checkpoints only after the last step."""
    cfg = copy.deepcopy(cfg)
    cfg.train.run_dir, cfg.train.resume, cfg.train.progress = run_dir, "none", False
    cfg.train.steps = steps
    cfg.train.sample_every = cfg.train.ckpt_every = 10 * steps  # only at the end, after timing
    cfg.logging.wandb, cfg.eval.every_kimg = "off", 0.0
    torch.manual_seed(cfg.train.seed)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
    return Trainer(cfg, build_backend(cfg), stream, G, D)


def time_distgan(cfg: Config, stream, steps: int) -> float:
    """Seconds per generator step of distgan's Trainer over the second half of 2*steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = copy.deepcopy(cfg)
        cfg.train.log_every = steps
        bench_trainer(cfg, stream, run_dir, 2 * steps).fit()
        return read_metrics(run_dir)[-1]["sec_per_step"]


def default_config(path: str | Path | None, overrides: list[str]) -> Config:
    """The recipe (default configs/default.yaml) with overrides, and at least one loader worker."""
    cfg = load_from_args(str(path) if path else None, tuple(overrides))
    cfg.data.workers = max(cfg.data.workers, 1)
    return cfg
