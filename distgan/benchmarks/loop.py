"""distgan's trainer against a plain hand-written PyTorch GAN loop doing the same work (same
models, batches, objective and regularizers, augmentation and EMA), in alternating rounds; targets: median ratio
<= 1.02 and at most 1 ms per generator step more than the plain loop.

Runs where the trainer runs: on a GPU both loops live on the device distgan's backend picked, the
plain loop under the same autocast precision, each timed step ends with a device synchronization
(CUDA runs asynchronously: a host clock read without one times only the kernel launches), and
each loop's peak memory is read from torch.cuda.max_memory_allocated around its own steps.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from distgan.benchmarks.timing import InMemoryStream, bench_trainer, random_batches
from distgan.config import Config
from distgan.device import adam_kwargs
from distgan.errors import ConfigError
from distgan.gan.augment import diff_augment
from distgan.gan.augment_presets import multipliers
from distgan.gan.augpipe import AugmentPipe
from distgan.models import build_models
from distgan.schedules import Scheduled


class PlainLoop:
    """The same GAN step written by hand in plain PyTorch: the logistic or relativistic (R3GAN)
    loss, R1/R2 in the D step or lazily, StyleGAN2's lazy path-length step, DiffAugment and/or the
    bgc pipeline (at its initial p, or adapted by ADA), and the EMA."""

    def __init__(self, cfg: Config, batches: list, device: torch.device = torch.device("cpu"), precision: str = "no"):
        if precision not in ("no", "bf16"):  # fp16 would need loss scaling through the double backward
            raise ConfigError(f"distgan bench loop compares fp32 or bf16 loops; dist.mixed_precision resolved to "
                              f"{precision!r} here: pass dist.mixed_precision=bf16 or dist.mixed_precision=no.")
        torch.manual_seed(cfg.train.seed)
        self.device = device
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
        self.G, self.D = G.to(device), D.to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        betas = lambda pair: tuple(b.at(0) for b in pair)  # noqa: E731
        # The Adam implementation distgan's backend picks (fused on CUDA under `auto`; torch's own
        # default there is foreach): else the comparison times two different optimizers.
        impl = adam_kwargs(cfg.optim.adam_impl, cuda=device.type == "cuda")
        adam = lambda net, lr, pair: torch.optim.Adam(net.parameters(), lr=lr.at(0), betas=betas(pair), **impl)  # noqa: E731
        self.opt_G = adam(self.G, cfg.optim.g_lr, cfg.optim.g_betas)
        self.opt_D = adam(self.D, cfg.optim.d_lr, cfg.optim.d_betas)
        loss = cfg.loss
        # ADA: p is a device tensor, moved every `ada_interval` D steps by the sign of r_t - target.
        self.p = torch.tensor(loss.augment_p.at(0), device=device) if loss.ada else None
        self.signs = torch.zeros(2, device=device)
        self.ada_step = cfg.data.batch_size * loss.ada_interval / (loss.ada_kimg * 1000)
        p0 = self.p if loss.ada else loss.augment_p.at(0)
        pipe = (AugmentPipe(p0, multipliers(loss.augment, loss.augment_ops), supersample=loss.augment_supersample)
                if loss.augment else None)
        policy = cfg.loss.diffaugment
        self.augment = lambda x: diff_augment(pipe(x) if pipe else x, policy) if policy else (pipe(x) if pipe else x)
        self.relativistic = cfg.loss.objective == "rpgan"
        self.gammas = (cfg.loss.r1_gamma.at(0), cfg.loss.r2().at(0))
        self.lazy = cfg.loss.r1_interval if cfg.loss.r1_interval > 1 else 0
        self.batches, self.n, self.d_steps, self.i = batches, cfg.data.batch_size, cfg.optim.d_steps, 0
        self.loss, self.g_step, self.pl_mean = loss, 0, torch.zeros((), device=device)

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.G.z_dim, device=self.device)

    def _adapt(self, real_logits: torch.Tensor) -> None:
        """ADA by hand: count the signs of D(real), adjust p every `ada_interval` D steps."""
        self.signs[0] += real_logits.detach().sign().sum()
        self.signs[1] += real_logits.numel()
        if self.i % self.loss.ada_interval == 0:
            rt = self.signs[0] / self.signs[1]
            step = torch.sign(rt - self.loss.ada_target) * self.ada_step
            self.p.add_(step).clamp_(0.0, self.loss.augment_p_max or None)  # augment_p_max 0: no upper bound
            self.signs.zero_()

    def _path_length_step(self) -> None:
        """StyleGAN2's lazy path-length regularization step of G, by hand."""
        G, loss = self.G, self.loss
        images, ws = G(self._noise(max(1, self.n // loss.pl_batch_shrink)), return_ws=True)
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
        with self.autocast():
            self._step()

    def _step(self) -> None:
        G, D, n, augment = self.G, self.D, self.n, self.augment
        penalized = self.gammas != (0.0, 0.0)
        for _ in range(self.d_steps):
            real = self.batches[self.i % len(self.batches)][0].to(self.device, non_blocking=True)
            self.i += 1
            with torch.no_grad():
                fake = G(self._noise(n))
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
                    fake = G(self._noise(n))
                penalty, _ = self._penalties(real, fake)
                self.opt_D.zero_grad(set_to_none=True)
                (penalty * self.lazy).backward()
                self.opt_D.step()
        D.requires_grad_(False)
        fake = G(self._noise(n))
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


class StepClock:
    """Seconds and peak memory of one loop's steps on `device`: the device is synchronized before
    the clock starts and before it is read, and CUDA's peak-memory counter is reset per step, so
    each loop's peak is its own step's (it includes both loops' weights and optimizer state, which
    stay allocated; `resident_mib` is what was allocated when its steps began)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds, self.peak, self.resident = 0.0, 0, 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, step) -> None:
        self._sync()
        if self.cuda:
            self.resident = max(self.resident, torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        step()
        self._sync()
        self.seconds += time.perf_counter() - start
        if self.cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    def memory(self) -> dict:
        """Peak and resident MiB on a GPU; None on the CPU (not measured there)."""
        mib = lambda b: round(b / 2**20, 1) if self.cuda else None  # noqa: E731
        return {"peak_mib": mib(self.peak), "resident_mib": mib(self.resident)}


def loop_overhead(cfg: Config, steps: int = 40, rounds: int = 7) -> dict:
    """distgan vs plain seconds per generator step, measured in pairs.

    The two loops run side by side in this process and alternate step by step (which one goes
    first alternates too), so the drift of a shared machine hits both alike; distgan's steps are
    `Trainer.advance()`, i.e. the whole loop body with its cadence checks, one log row per round
    and the data prefetch thread. A round is `steps` pairs after as many warm-up pairs; reported
    are the median ratio and the median milliseconds per step that distgan adds (the host work: on
    a GPU, where a small GAN's step takes milliseconds, that difference is what matters), with
    every round. Also per loop: images per second, seconds per kimg and (on a GPU) peak memory,
    from the timed rounds together.
    """
    cfg = copy.deepcopy(cfg)
    if cfg.loss.objective not in ("logistic", "rpgan"):
        cfg.loss.objective, cfg.loss.r1_gamma, cfg.loss.r2_gamma = "logistic", Scheduled(0.0), None
    cfg.optim.accumulate, cfg.model.conditional = 1, False
    cfg.train.log_every = steps
    batches = random_batches(cfg, 16)
    per_round, total = [], {}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = bench_trainer(cfg, InMemoryStream(batches), run_dir, steps * (rounds + 1) + 1)
        device = trainer.backend.device
        if device.type == "cuda":
            # Pinned, as the real loader's batches are: from pageable memory both loops' `non_blocking`
            # copies would be synchronous, and the timings would include a host wait a run never has.
            # In place: the trainer's stream holds this same list.
            batches[:] = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
        plain = PlainLoop(cfg, batches, device, trainer.backend.mixed_precision)
        run = {"plain": plain.step, "distgan": trainer.advance}
        trainer.start()
        try:
            for r in range(rounds + 1):
                clocks = {"plain": StepClock(device), "distgan": StepClock(device)}
                for i in range(steps):
                    for name in (("plain", "distgan") if i % 2 == 0 else ("distgan", "plain")):
                        clocks[name].time(run[name])
                if r == 0:
                    continue  # warm-up round (allocator, autotuner, compilation)
                total = {name: _merge(total.get(name), clock) for name, clock in clocks.items()}
                p, d = clocks["plain"].seconds / steps, clocks["distgan"].seconds / steps
                per_round.append({"plain_ms": round(p * 1e3, 3), "distgan_ms": round(d * 1e3, 3),
                                  "ratio": round(d / p, 4), "diff_ms": round((d - p) * 1e3, 3)})
        finally:
            trainer.finish("done")
    median = lambda key: statistics.median(r[key] for r in per_round)  # noqa: E731
    images = cfg.data.batch_size * cfg.optim.d_steps  # real images one generator step trains D on
    return {"benchmark": "loop", "ratio": median("ratio"), "diff_ms_per_step": median("diff_ms"),
            "plain_ms_per_step": median("plain_ms"), "distgan_ms_per_step": median("distgan_ms"),
            "steps": steps, "device": str(device), "precision": trainer.backend.mixed_precision,
            "compile": cfg.dist.compile, "batch": cfg.data.batch_size, "images_per_step": images,
            **{name: _throughput(clock, images, steps * rounds) for name, clock in total.items()},
            "rounds": per_round}


def _merge(into: StepClock | None, clock: StepClock) -> StepClock:
    """Seconds add up over rounds; peak and resident memory keep their highest."""
    if into is None:
        return clock
    into.seconds += clock.seconds
    into.peak, into.resident = max(into.peak, clock.peak), max(into.resident, clock.resident)
    return into


def _throughput(clock: StepClock, images_per_step: int, steps: int) -> dict:
    img_per_s = images_per_step * steps / clock.seconds
    return {"img_per_s": round(img_per_s, 2), "sec_per_kimg": round(1000 / img_per_s, 3), **clock.memory()}
