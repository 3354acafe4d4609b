"""distgan's trainer against a plain hand-written PyTorch GAN loop doing the same work (same
models, batches, objective, DiffAugment and EMA), in alternating rounds; targets: median ratio
<= 1.02 and at most 1 ms per generator step more than the plain loop."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from distgan.benchmarks.timing import InMemoryStream, bench_trainer, random_batches
from distgan.config import Config
from distgan.gan.augment import diff_augment
from distgan.models import build_models


class PlainLoop:
    """The same GAN step written by hand in plain PyTorch (logistic loss, DiffAugment, EMA)."""

    def __init__(self, cfg: Config, batches: list):
        torch.manual_seed(cfg.train.seed)
        self.G, self.D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.g_betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.d_betas)
        policy = cfg.loss.diffaugment
        self.augment = (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)
        self.batches, self.n, self.d_steps, self.i = batches, cfg.data.batch_size, cfg.optim.d_steps, 0

    def step(self) -> None:
        G, D, n, augment = self.G, self.D, self.n, self.augment
        for _ in range(self.d_steps):
            real = self.batches[self.i % len(self.batches)][0]
            self.i += 1
            with torch.no_grad():
                fake = G(torch.randn(n, G.z_dim))
            logits = D(augment(torch.cat([real, fake])))
            loss = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
            self.opt_D.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_D.step()
        D.requires_grad_(False)
        loss = F.softplus(-D(augment(G(torch.randn(n, G.z_dim))))).mean()
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        D.requires_grad_(True)
        with torch.no_grad():
            for pe, p in zip(self.G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - 0.999)


def loop_overhead(cfg: Config, steps: int = 40, rounds: int = 7) -> dict:
    """distgan vs plain seconds per generator step, measured in pairs.

    The two loops run side by side in this process and alternate step by step (which one goes
    first alternates too), so the drift of a shared machine hits both alike; distgan's steps are
    `Trainer.advance()`, i.e. the whole loop body with its cadence checks, one log row per round
    and the data prefetch thread. A round is `steps` pairs after as many warm-up pairs; reported
    are the median ratio and the median milliseconds per step that distgan adds (the host work: on
    a GPU, where a small GAN's step takes milliseconds, that difference is what matters), with
    every round.
    """
    cfg = copy.deepcopy(cfg)
    cfg.loss.objective, cfg.loss.r1_gamma, cfg.optim.accumulate, cfg.model.conditional = "logistic", 0.0, 1, False
    cfg.train.log_every = steps
    batches = random_batches(cfg, 16)
    plain = PlainLoop(cfg, batches)
    per_round = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = bench_trainer(cfg, InMemoryStream(batches), run_dir, steps * (rounds + 1) + 1)
        trainer.start()
        try:
            for r in range(rounds + 1):
                times = {"plain": 0.0, "distgan": 0.0}
                for i in range(steps):
                    for name in (("plain", "distgan") if i % 2 == 0 else ("distgan", "plain")):
                        start = time.perf_counter()
                        plain.step() if name == "plain" else trainer.advance()
                        times[name] += time.perf_counter() - start
                if r == 0:
                    continue  # warm-up round
                p, d = times["plain"] / steps, times["distgan"] / steps
                per_round.append({"plain_ms": round(p * 1e3, 3), "distgan_ms": round(d * 1e3, 3),
                                  "ratio": round(d / p, 4), "diff_ms": round((d - p) * 1e3, 3)})
        finally:
            trainer.finish("done")
    median = lambda key: statistics.median(r[key] for r in per_round)  # noqa: E731
    return {"benchmark": "loop", "ratio": median("ratio"), "diff_ms_per_step": median("diff_ms"),
            "plain_ms_per_step": median("plain_ms"), "distgan_ms_per_step": median("distgan_ms"),
            "steps": steps, "rounds": per_round}
