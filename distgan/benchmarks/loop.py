"""distgan's trainer against a plain hand-written PyTorch GAN loop doing the same work (same
models, batches, objective, DiffAugment and EMA), in alternating rounds; targets: median ratio
<= 1.02 and at most 1 ms per generator step more than the plain loop."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from distgan.benchmarks.timing import InMemoryStream, random_batches, time_distgan
from distgan.config import Config
from distgan.gan.augment import diff_augment
from distgan.models import build_models


def time_plain(cfg: Config, batches: list, steps: int) -> float:
    """The same GAN step written by hand in plain PyTorch (logistic loss, DiffAugment, EMA)."""
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


def loop_overhead(cfg: Config, steps: int = 40, rounds: int = 7) -> dict:
    """distgan vs plain seconds per step in alternating rounds (plain, then distgan, each round).

    Reports the median ratio and the median absolute difference per step (the host work distgan
    adds: on a GPU, where a small GAN's step takes milliseconds, the difference is what matters),
    with every round, since single rounds on a shared machine swing by 10-30%.
    """
    cfg = copy.deepcopy(cfg)
    cfg.loss.objective, cfg.loss.r1_gamma, cfg.optim.accumulate, cfg.model.conditional = "logistic", 0.0, 1, False
    batches = random_batches(cfg, 16)
    per_round = []
    for _ in range(rounds):
        plain = time_plain(cfg, batches, steps)
        ours = time_distgan(cfg, InMemoryStream(batches), steps)
        per_round.append({"plain_ms": round(plain * 1e3, 3), "distgan_ms": round(ours * 1e3, 3),
                          "ratio": round(ours / plain, 4), "diff_ms": round((ours - plain) * 1e3, 3)})
    median = lambda key: statistics.median(r[key] for r in per_round)  # noqa: E731
    return {"benchmark": "loop", "ratio": median("ratio"), "diff_ms_per_step": median("diff_ms"),
            "plain_ms_per_step": median("plain_ms"), "distgan_ms_per_step": median("distgan_ms"),
            "steps": steps, "rounds": per_round}
