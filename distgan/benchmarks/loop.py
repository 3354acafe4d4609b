"""distgan's trainer against a plain hand-written PyTorch GAN loop doing the same work (same
models, batches, objective and regularizers, augmentation and EMA), in alternating rounds; targets: median ratio
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
from distgan.gan.augpipe import AugmentPipe
from distgan.models import build_models
from distgan.schedules import Scheduled


class PlainLoop:
    """The same GAN step written by hand in plain PyTorch: the logistic or relativistic (R3GAN)
    loss, R1/R2 in the D step or lazily, StyleGAN2's lazy path-length step, DiffAugment and/or the
    bgc pipeline (at its initial p, or adapted by ADA), and the EMA."""

    def __init__(self, cfg: Config, batches: list):
        torch.manual_seed(cfg.train.seed)
        self.G, self.D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        betas = lambda pair: tuple(b.at(0) for b in pair)  # noqa: E731
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.optim.g_lr.at(0), betas=betas(cfg.optim.g_betas))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.optim.d_lr.at(0), betas=betas(cfg.optim.d_betas))
        loss = cfg.loss
        # ADA: p is a device tensor, moved every `ada_interval` D steps by the sign of r_t - target.
        self.p = torch.tensor(loss.augment_p.at(0)) if loss.ada else None
        self.signs, self.ada_step = torch.zeros(2), cfg.data.batch_size * loss.ada_interval / (loss.ada_kimg * 1000)
        p0 = self.p if loss.ada else loss.augment_p.at(0)
        policy, pipe = cfg.loss.diffaugment, AugmentPipe(p0) if cfg.loss.augment else None
        self.augment = lambda x: diff_augment(pipe(x) if pipe else x, policy) if policy else (pipe(x) if pipe else x)
        self.relativistic = cfg.loss.objective == "rpgan"
        self.gammas = (cfg.loss.r1_gamma.at(0), cfg.loss.r2().at(0))
        self.lazy = cfg.loss.r1_interval if cfg.loss.r1_interval > 1 else 0
        self.batches, self.n, self.d_steps, self.i = batches, cfg.data.batch_size, cfg.optim.d_steps, 0
        self.loss, self.g_step, self.pl_mean = loss, 0, torch.zeros(())

    def _adapt(self, real_logits: torch.Tensor) -> None:
        """ADA by hand: count the signs of D(real), adjust p every `ada_interval` D steps."""
        self.signs[0] += real_logits.detach().sign().sum()
        self.signs[1] += real_logits.numel()
        if self.i % self.loss.ada_interval == 0:
            rt = self.signs[0] / self.signs[1]
            self.p.add_(torch.sign(rt - self.loss.ada_target) * self.ada_step).clamp_(0.0, self.loss.augment_p_max)
            self.signs.zero_()

    def _path_length_step(self) -> None:
        """StyleGAN2's lazy path-length regularization step of G, by hand."""
        G, loss = self.G, self.loss
        images, ws = G(torch.randn(max(1, self.n // loss.pl_batch_shrink), G.z_dim), return_ws=True)
        y = torch.randn_like(images) / (images.shape[2] * images.shape[3]) ** 0.5
        (grads,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
        lengths = grads.square().sum(2).mean(1).sqrt()
        self.pl_mean.lerp_(lengths.mean().detach(), loss.pl_decay)
        penalty = (lengths - self.pl_mean).square().mean() * loss.pl_weight * loss.pl_interval
        self.opt_G.zero_grad(set_to_none=True)
        (penalty + images.sum() * 0).backward()
        self.opt_G.step()

    def _penalties(self, real, fake) -> torch.Tensor:
        """gamma/2 E||grad D||^2 on reals (R1) and fakes (R2), from one double backward."""
        pairs = list(zip((real, fake), self.gammas))
        if self.lazy:  # a lazy phase forwards only what its penalties need
            pairs = [(x, g) for x, g in pairs if g != 0]
        parts = [x.detach().requires_grad_(g != 0) for x, g in pairs]
        logits = self.D(self.augment(torch.cat(parts)))
        weighted = [(x, g) for x, (_, g) in zip(parts, pairs) if g != 0]
        grads = torch.autograd.grad(logits.sum(), [x for x, _ in weighted], create_graph=True)
        penalty = sum(g / 2 * grad.square().flatten(1).sum(1).mean() for (_, g), grad in zip(weighted, grads))
        return penalty, logits

    def step(self) -> None:
        G, D, n, augment = self.G, self.D, self.n, self.augment
        penalized = self.gammas != (0.0, 0.0)
        for _ in range(self.d_steps):
            real = self.batches[self.i % len(self.batches)][0]
            self.i += 1
            with torch.no_grad():
                fake = G(torch.randn(n, G.z_dim))
            if penalized and not self.lazy:
                penalty, logits = self._penalties(real, fake)
            else:
                penalty, logits = 0.0, D(augment(torch.cat([real, fake])))
            r, f = logits[:n], logits[n:]
            if self.p is not None:
                self._adapt(r)
            adv = F.softplus(f - r).mean() if self.relativistic else F.softplus(-r).mean() + F.softplus(f).mean()
            self.opt_D.zero_grad(set_to_none=True)
            (adv + penalty).backward()
            self.opt_D.step()
            if penalized and self.lazy and self.i % self.lazy == 0:
                with torch.no_grad():
                    fake = G(torch.randn(n, G.z_dim))
                penalty, _ = self._penalties(real, fake)
                self.opt_D.zero_grad(set_to_none=True)
                (penalty * self.lazy).backward()
                self.opt_D.step()
        D.requires_grad_(False)
        fake = G(torch.randn(n, G.z_dim))
        if self.relativistic:
            logits = D(augment(torch.cat([fake, real])))
            loss = F.softplus(logits[n:] - logits[:n]).mean()
        else:
            loss = F.softplus(-D(augment(fake))).mean()
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        D.requires_grad_(True)
        if self.loss.pl_weight > 0 and self.g_step % self.loss.pl_interval == 0:
            self._path_length_step()
        self.g_step += 1
        with torch.no_grad():
            torch._foreach_lerp_(list(self.G_ema.parameters()), list(G.parameters()), 1 - 0.999)


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
    if cfg.loss.objective not in ("logistic", "rpgan"):
        cfg.loss.objective, cfg.loss.r1_gamma, cfg.loss.r2_gamma = "logistic", Scheduled(0.0), None
    cfg.optim.accumulate, cfg.model.conditional = 1, False
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
