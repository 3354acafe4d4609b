"""Benchmarks as ratios measured in one run (these machines are noisy; absolute times are not).

* `loop`: distgan's trainer against a plain hand-written PyTorch GAN loop doing the same work
  (same models, batches, objective, DiffAugment and EMA), alternating rounds; target <= 1.03.
* `data`: distgan's trainer fed by the sharded stream against the same trainer fed by the
  same batches already in memory; target <= 1.05 (data loading never starves the step).

Each measurement runs 2N steps and times the second N (the first N warm up allocators, the
loader workers and the autotuner). Ratios are medians over rounds.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distgan.config import Config
from distgan.gan.augment import diff_augment


@dataclasses.dataclass
class _Info:
    num_samples: int
    resolution: int
    channels: int
    class_names: list
    source: str = "memory"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class InMemoryStream:
    """The stream interface over batches already in memory (no decoding, no workers)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], class_names: list | None = None):
        self.batches = batches
        images = batches[0][0]
        self.info = _Info(len(batches) * images.shape[0], images.shape[-1], images.shape[1], class_names or [])
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


def time_distgan(cfg: Config, stream, steps: int) -> float:
    """Seconds per generator step of distgan's Trainer over the second half of 2*steps."""
    from distgan.backends import build_backend
    from distgan.models import build_models
    from distgan.trainer import Trainer
    from distgan.tracking import read_metrics

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = copy.deepcopy(cfg)
        cfg.train.run_dir, cfg.train.resume, cfg.train.progress = run_dir, "none", False
        cfg.train.steps, cfg.train.log_every = 2 * steps, steps
        cfg.train.sample_every = cfg.train.ckpt_every = 10 * steps  # only at the end, after timing
        cfg.logging.wandb, cfg.eval.every_kimg = "off", 0.0
        torch.manual_seed(cfg.train.seed)
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
        trainer = Trainer(cfg, build_backend(cfg), stream, G, D)
        trainer.fit()
        return read_metrics(run_dir)[-1]["sec_per_step"]


def time_plain(cfg: Config, batches: list, steps: int) -> float:
    """The same GAN step written by hand in plain PyTorch (logistic loss, DiffAugment, EMA)."""
    from distgan.models import build_models

    torch.manual_seed(cfg.train.seed)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.g_betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.d_betas)
    policy, n, i = cfg.loss.diffaugment, cfg.data.batch_size, 0
    augment = (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)
    start = 0.0
    for step in range(2 * steps):
        if step == steps:
            start = time.perf_counter()
        for _ in range(cfg.optim.d_steps):
            real = batches[i % len(batches)][0]
            i += 1
            with torch.no_grad():
                fake = G(torch.randn(n, G.z_dim))
            logits = D(augment(torch.cat([real, fake])))
            loss = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
            opt_D.zero_grad(set_to_none=True)
            loss.backward()
            opt_D.step()
        D.requires_grad_(False)
        loss = F.softplus(-D(augment(G(torch.randn(n, G.z_dim))))).mean()
        opt_G.zero_grad(set_to_none=True)
        loss.backward()
        opt_G.step()
        D.requires_grad_(True)
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - 0.999)
    return (time.perf_counter() - start) / steps


def loop_overhead(cfg: Config, steps: int = 40, rounds: int = 3) -> dict:
    """distgan / plain seconds per step (median over alternating rounds)."""
    cfg = copy.deepcopy(cfg)
    cfg.loss.objective, cfg.loss.r1_gamma, cfg.optim.accumulate, cfg.model.conditional = "logistic", 0.0, 1, False
    batches = random_batches(cfg, 16)
    ratios, plain, ours = [], [], []
    for _ in range(rounds):
        plain.append(time_plain(cfg, batches, steps))
        ours.append(time_distgan(cfg, InMemoryStream(batches), steps))
        ratios.append(ours[-1] / plain[-1])
    return {"benchmark": "loop", "ratio": statistics.median(ratios), "ratios": ratios,
            "plain_s_per_step": statistics.median(plain), "distgan_s_per_step": statistics.median(ours)}


def data_overhead(cfg: Config, steps: int = 40, rounds: int = 3) -> dict:
    """Step time fed by shards / fed by the same batches in memory (median over rounds)."""
    from distgan.data import build_stream

    cfg = copy.deepcopy(cfg)
    ratios, fed, mem = [], [], []
    for r in range(rounds):
        stream = build_stream(cfg.data, cfg.train.seed + r, 0, 1)
        it = iter(stream)
        count = min(stream.batches_per_epoch, 2 * steps * (cfg.optim.d_steps + 1))
        batches = [tuple(t.clone() for t in next(it)) for _ in range(count)]
        stream.close()
        mem.append(time_distgan(cfg, InMemoryStream(batches, list(stream.info.class_names)), steps))
        stream = build_stream(cfg.data, cfg.train.seed + r, 0, 1)
        try:
            fed.append(time_distgan(cfg, stream, steps))
        finally:
            stream.close()
        ratios.append(fed[-1] / mem[-1])
    return {"benchmark": "data", "ratio": statistics.median(ratios), "ratios": ratios,
            "shards_s_per_step": statistics.median(fed), "memory_s_per_step": statistics.median(mem)}


def data_throughput(cfg: Config, batches: int = 60) -> dict:
    """Images per second of the stream alone, for 1 and 2 loader workers."""
    from distgan.data import build_stream

    out = {"benchmark": "data_throughput"}
    for workers in (1, 2):
        data_cfg = dataclasses.replace(cfg.data, workers=workers)
        stream = build_stream(data_cfg, cfg.train.seed, 0, 1)
        it = iter(stream)
        for _ in range(5):
            next(it)
        start = time.perf_counter()
        n = sum(next(it)[0].shape[0] for _ in range(batches))
        out[f"img_per_s_{workers}_workers"] = n / (time.perf_counter() - start)
        stream.close()
    return out


def default_config(path: str | Path | None, overrides: list[str]) -> Config:
    from distgan.train import load_from_args

    cfg = load_from_args(str(path) if path else None, tuple(overrides))
    cfg.data.workers = max(cfg.data.workers, 1)
    return cfg
