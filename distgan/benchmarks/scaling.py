"""Data-parallel scaling on CPU: 2 processes (1 thread each) vs 1 process (1 thread), the same
per-process batch, in one run; plus per-rank optimizer-state bytes for DDP vs ZeRO-1/2 vs FSDP.

    OMP_NUM_THREADS=1 distgan bench scaling [--steps 40 --rounds 2 --warmup 5 --batch 32 --width 32]
        [--skip-zero] [section.key=value ...]

Each run trains warmup + steps + 1 generator steps and times the `steps` after the warm-up (any
steps >= 1 gives a rate; fewer than 20 add a notice that the efficiency is noisy).

`measure_scaling` yields a summary and the optimizer sizes:
  {"efficiency": img/s(2 procs) / (2 x img/s(1 proc)), ...}     target >= 0.85
  {"optimizer_bytes_per_rank": {"ddp": ..., "zero1": ..., "zero2": ..., "fsdp": ...}}
Both runs train the real loop (`distgan.run.run`) on the same shards (random 32x32 PNGs
written once to a temp folder), 2 processes via torchrun on gloo; each process runs this module
(`python -m distgan.benchmarks.scaling --worker ...`). Throughput counts real images shown to D
after `warmup` generator steps. Needs 2 idle cores for a meaningful efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from distgan.config import load_config
from distgan.data.shards import write_shards
from distgan.run import run
from distgan.trainer import Trainer, TrainerHooks

WORKER_MODULE = "distgan.benchmarks.scaling"
"""Each launched process runs this module's `_worker_main`."""


def make_shards(root: Path, n: int = 512, resolution: int = 32) -> Path:
    """`n` random PNGs written as shards (the same data for every measurement)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    out = root / "shards"
    write_shards(str(images), out, resolution=resolution, channels=3, crop="none", shard_size=128, workers=1, progress=False)
    return out


def optimizer_state_bytes(backend) -> int:
    """Bytes of optimizer state this rank holds for G and D (Adam moments; for ZeRO also the
    fp32 master partition when the engine keeps one)."""
    total = 0
    for net in ("G", "D"):
        opt = backend.optimizer(net)
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    v = v.to_local() if hasattr(v, "to_local") else v  # FSDP: this rank's shard (DTensor)
                    total += v.numel() * v.element_size()
    return total


class ScalingProbe(TrainerHooks):
    """Times generator steps after the warm-up; when training ends, writes this rank's numbers
    (img/s and optimizer-state bytes) to `out/rank-R.json`.

    A timed step is the interval between two step starts (the step plus the loop's own per-step
    work; no grids or checkpoints fall due inside it), so `measure_scaling` runs one step more
    than warm-up + timed steps. Images count what the loop really showed D (`state.nimg`, all
    ranks) in those intervals."""

    def __init__(self, out: Path, warmup: int):
        self.out, self.warmup, self.stamps = out, warmup, []

    def step_start(self, trainer: Trainer) -> None:
        self.stamps.append((time.perf_counter(), trainer.state.nimg))

    def fit_end(self, trainer: Trainer, status: str) -> None:
        b, cfg = trainer.backend, trainer.cfg
        timed = self.stamps[self.warmup:]
        steps = max(len(timed) - 1, 0)
        seconds = timed[-1][0] - timed[0][0] if steps else 0.0
        images = timed[-1][1] - timed[0][1] if steps else 0
        row = {"rank": b.rank, "world_size": b.world_size, "backend": cfg.dist.backend, "zero_stage": cfg.dist.zero_stage,
               "timed_steps": steps, "timed_seconds": seconds, "timed_images": images,
               "img_per_s": images / seconds if seconds > 0 else 0.0, "optimizer_bytes": optimizer_state_bytes(b)}
        (self.out / f"rank-{b.rank}.json").write_text(json.dumps(row))


def worker(out: Path, overrides: list[str], warmup: int) -> None:
    """One rank: train with a ScalingProbe."""
    run(load_config(None, overrides), hooks=[ScalingProbe(out, warmup)])


def launch(nproc: int, run_dir: Path, overrides: list[str], warmup: int) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", "WANDB_MODE": "disabled",
           "ACCELERATE_USE_CPU": "1"}
    script = ["-m", WORKER_MODULE, "--worker", str(run_dir), "--warmup", str(warmup), "--",
              *overrides, f"train.run_dir={run_dir / 'run'}"]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank-*.json"))]


MEANINGFUL_STEPS = 20
"""Fewer timed steps than this still give a rate, with a notice that the efficiency is noisy."""


def measure_scaling(steps: int = 40, warmup: int = 5, batch: int = 32, width: int = 32, rounds: int = 2,
                    skip_zero: bool = False, overrides: tuple[str, ...] = ()) -> Iterator[dict]:
    """The scaling summary, then (unless `skip_zero`) the optimizer bytes per rank.

    Each run trains `warmup + steps + 1` generator steps and times the `steps` whole steps after
    the warm-up, so any `steps >= 1` gives a rate, however small the model. A run that could not
    be timed (it stopped early) gives no efficiency and says why, never a division by zero."""
    if steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"bench scaling needs --steps >= 1, --warmup >= 0 and --rounds >= 1 (got {steps}, {warmup}, {rounds})")
    with tempfile.TemporaryDirectory(prefix="distgan-scaling-") as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        base = [f"data.source={shards}", "data.resolution=32", f"data.batch_size={batch}", "data.workers=0",
                f"model.g_width={width}", f"model.d_width={width}", f"train.steps={warmup + steps + 1}",
                "train.log_every=1000", "train.sample_every=100000", "train.ckpt_every=100000", "logging.wandb=off",
                "train.progress=false", "loss.diffaugment=", *overrides]
        # Alternate 1 and 2 processes and keep each one's best round: on a shared machine other
        # jobs steal cores at random, and the best round is the closest to an idle machine.
        rate1 = rate2 = 0.0
        for r in range(rounds):
            one = launch(1, root / f"one{r}", base, warmup)[0]
            two = launch(2, root / f"two{r}", base, warmup)
            rate1 = max(rate1, one["img_per_s"])
            rate2 = max(rate2, min(x["img_per_s"] for x in two))  # every rank sees the global throughput
        timed = min([one["timed_steps"], *(x["timed_steps"] for x in two)])
        row = {"benchmark": "scaling", "img_per_s_1proc": round(rate1, 1), "img_per_s_2proc": round(rate2, 1),
               "efficiency": round(rate2 / (2 * rate1), 3) if rate1 > 0 and rate2 > 0 else None,
               "batch_per_process": batch, "width": width, "steps": steps, "timed_steps": timed, "warmup": warmup,
               "rounds": rounds}
        if row["efficiency"] is None:
            row["notice"] = (f"no step rate: a run timed {timed} steps (it stopped before warm-up + steps + 1 = "
                             f"{warmup + steps + 1}; check train.* overrides such as train.steps or train.max_minutes)")
        elif timed < MEANINGFUL_STEPS:
            row["notice"] = f"only {timed} timed steps: the efficiency is noisy (use --steps {MEANINGFUL_STEPS} or more)"
        yield row
        if skip_zero:
            return
        short = [o for o in base if not o.startswith("train.steps")] + [f"train.steps={warmup + 2}"]
        sizes = {"ddp_1proc": one["optimizer_bytes"], "ddp": two[0]["optimizer_bytes"]}
        for name, extra in (("zero1", ["dist.backend=deepspeed", "dist.zero_stage=1"]),
                            ("zero2", ["dist.backend=deepspeed", "dist.zero_stage=2"]), ("fsdp", ["dist.fsdp=true"])):
            ranks = launch(2, root / name, short + extra, warmup)
            sizes[name] = max(r["optimizer_bytes"] for r in ranks)
        yield {"benchmark": "optimizer_state", "optimizer_bytes_per_rank": sizes, "world_size": 2,
               "zero2_vs_ddp": round(sizes["zero2"] / sizes["ddp"], 3) if sizes["ddp"] else None}


def _worker_main() -> None:
    """`python -m distgan.benchmarks.scaling --worker DIR --warmup N -- OVERRIDES`: one rank."""
    parser = argparse.ArgumentParser(description="One rank of `distgan bench scaling` (started by it).")
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    worker(args.worker, args.overrides, args.warmup)


if __name__ == "__main__":
    _worker_main()
