"""Entry script of the multi-process tests: real training through `distgan.run.run` with the
trainer's public seams (stream factory, noise source, hooks) instead of patched internals.

Launched like the real script (`accelerate launch ... tests/integration/rank_harness.py
section.key=value ...`, or torchrun). Behaviours, each off unless its variable is set:

  DISTGAN_TEST_DUMP=DIR      at the end every rank writes DIR/rank-R.safetensors (G., D., G_ema.
                             weights as the rank holds them) and DIR/rank-R.json (a digest of
                             every real batch it trained on).
  DISTGAN_TEST_INDEXED=1     data and noise keyed by the GLOBAL sample index instead of the rank:
                             W processes x batch B x accumulation A see exactly the images,
                             latents and WGAN-GP mixing weights of any other split of the same
                             global batch (the core of the gradient-averaging proof).
  DISTGAN_TEST_FAIL=R:S:MODE rank R, at generator step S: `raise`, `kill` (SIGKILL itself) or
                             `hang` (sleeps; dies of the launcher's SIGTERM).
  DISTGAN_TEST_MULTI=FILE    FILE holds a JSON list of override lists: train each in turn in this
                             one launch (one process group), dumping run i into DUMP/i/. An entry
                             may be a dict with per-run options (SGD instead of Adam, a planted
                             bug): see tests/helpers/linear_steps.py.
  DISTGAN_TEST_SLOW_SAVE=SECONDS[@STEP]  sleep once every part of a checkpoint (of that step only,
                             with @STEP) is written, before its manifest and rename, so that a
                             test can SIGKILL the process in the middle of a save.
  DISTGAN_TEST_RESAVE=1      save a checkpoint right after the resume, before the first step (the
                             loaded state as this backend and world size write it back).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file

from distgan.backends import build_backend
from distgan.config import load_config
from distgan.data.stream import DatasetInfo
from distgan.errors import DistganError
from distgan.global_batch import apply_global_batch
from distgan.run import run
from distgan.trainer import EXIT_PREEMPTED, TrainerHooks

# Run as a script (by a launcher or tests/helpers/ranks.py), its folder is on sys.path, not the
# repository: make `tests.helpers` importable whatever PYTHONPATH the caller set.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.linear_steps import run_options  # noqa: E402

# ---------------------------------------------------------------------------- indexed data/noise


class IndexedPlan:
    """Where this rank's samples sit in the global batch: micro-step m of rank r holds global
    positions [(r * A + m) * B, + B) of each phase's W * A * B samples."""

    def __init__(self, batch: int, accumulate: int, rank: int, world: int):
        self.B, self.A, self.rank, self.W = batch, accumulate, rank, world
        self.total = batch * accumulate * world

    def offset(self, micro: int) -> int:
        return (self.rank * self.A + micro) * self.B


class IndexedStream:
    """Batches whose image i is a pure function of its global index (no shards, no rank)."""

    def __init__(self, data_cfg, plan: IndexedPlan):
        self.cfg, self.plan = data_cfg, plan
        self.info = DatasetInfo(10**6, data_cfg.resolution, data_cfg.channels, [], "indexed")
        self.k = 0

    @staticmethod
    def image(index: int, channels: int, res: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 + index)
        return torch.rand(channels, res, res, generator=g) * 2 - 1

    def __iter__(self):
        while True:
            step, micro = divmod(self.k, self.plan.A)
            self.k += 1
            start = step * self.plan.total + self.plan.offset(micro)
            images = torch.stack([self.image(start + j, self.cfg.channels, self.cfg.resolution) for j in range(self.plan.B)])
            yield images, torch.zeros(self.plan.B, dtype=torch.long)

    def stats(self):
        return {"skipped": 0}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = int(state["k"])

    def close(self):
        pass


class IndexedNoise:
    """Latents and WGAN-GP alphas: phase call p draws the whole global batch from seed p and
    this rank/micro-step takes its slice."""

    def __init__(self, plan: IndexedPlan):
        self.plan, self.calls, self.current = plan, 0, (0, 0)

    def latents(self, n: int, z_dim: int, num_classes: int, device):
        phase_call, micro = divmod(self.calls, self.plan.A)
        self.calls += 1
        self.current = (phase_call, micro)
        g = torch.Generator().manual_seed(50_000 + phase_call)
        z = torch.randn(self.plan.total, z_dim, generator=g)
        off = self.plan.offset(micro)
        assert n == self.plan.B, (n, self.plan.B)
        return z[off:off + n].to(device), None

    def uniform(self, shape, like):
        phase_call, micro = self.current
        g = torch.Generator().manual_seed(90_000 + phase_call)
        u = torch.rand(self.plan.total, generator=g)
        off = self.plan.offset(micro)
        return u[off:off + shape[0]].view(shape).to(device=like.device, dtype=like.dtype)

    def normal(self, like):
        """Path-length directions: one per sample of the global batch, like the latents."""
        phase_call, micro = self.current
        g = torch.Generator().manual_seed(70_000 + phase_call)
        y = torch.randn(self.plan.total, *like.shape[1:], generator=g)
        off = self.plan.offset(micro)
        return y[off:off + like.shape[0]].to(device=like.device, dtype=like.dtype)


def indexed_parts(cfg, rank: int, world: int) -> dict:
    """run()'s stream factory and noise source for DISTGAN_TEST_INDEXED."""
    plan = IndexedPlan(cfg.data.batch_size, cfg.optim.accumulate, rank, world)
    return {"stream_factory": lambda data_cfg, seed, rank=0, world_size=1: IndexedStream(data_cfg, plan),
            "noise": IndexedNoise(plan)}


# ---------------------------------------------------------------------------- dump and faults


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class TestHooks(TrainerHooks):
    """Records the batches trained on, injects a failure, dumps every rank's weights at the end."""

    def __init__(self, dump_dir: Path | None, fail: str, slow_save: str = "", resave: bool = False):
        self.dump_dir, self.fail, self.slow_save, self.seen = dump_dir, fail, slow_save, []
        self.resave = resave

    def checkpoint_written(self, folder: Path) -> None:
        if not self.slow_save:
            return
        seconds, _, step = self.slow_save.partition("@")
        if step and folder.name != f"step-{int(step):09d}.tmp":
            return
        print(f"DISTGAN_TEST_SLOW_SAVE: pausing {float(seconds):g}s inside {folder}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))

    def batch(self, trainer, images, labels) -> None:
        self.seen.append(_digest(images))

    def step_start(self, trainer) -> None:
        if self.resave:
            self.resave = False
            trainer.save()
        if not self.fail:
            return
        rank, step, mode = self.fail.split(":")
        if trainer.backend.rank != int(rank) or trainer.state.step != int(step):
            return
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        # hang: like a stuck process, except that the launcher's SIGTERM ends it
        # (distgan's preemption handler would otherwise keep it until SIGKILL, 30 s later).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(3600)

    def fit_end(self, trainer, status: str) -> None:
        if self.dump_dir is None:
            return
        b, r = trainer.backend, trainer.backend.rank
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", trainer.ema.module)):
            tensors.update({f"{name}.{k}": v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()})
        save_file(tensors, str(self.dump_dir / f"rank-{r}.safetensors"))
        info = {"rank": r, "world_size": b.world_size, "batches": self.seen, "mixed_precision": b.mixed_precision,
                "backend": type(b).__name__, "step": trainer.state.step}
        (self.dump_dir / f"rank-{r}.json").write_text(json.dumps(info))


# ---------------------------------------------------------------------------- main


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _parts(cfg, dump: Path | None) -> dict:
    env = os.environ.get
    parts = {"hooks": [TestHooks(dump, env("DISTGAN_TEST_FAIL", ""), env("DISTGAN_TEST_SLOW_SAVE", ""),
                                 env("DISTGAN_TEST_RESAVE") == "1")]}
    if os.environ.get("DISTGAN_TEST_INDEXED") == "1":
        parts.update(indexed_parts(cfg, *_world()))
    return parts


def main(argv: list[str]) -> int:
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    dump = os.environ.get("DISTGAN_TEST_DUMP")
    multi = os.environ.get("DISTGAN_TEST_MULTI")
    try:
        if not multi:
            cfg = load_config(None, overrides)
            status = run(cfg, **_parts(cfg, Path(dump) if dump else None))
            return EXIT_PREEMPTED if status == "preempted" else 0
        # Several configs in one launch: one process group, so one backend after another on it.
        for i, entry in enumerate(json.loads(Path(multi).read_text())):
            spec = entry if isinstance(entry, dict) else {"overrides": entry}
            cfg = load_config(None, overrides + list(spec["overrides"]))
            cfg.train.run_dir = str(cfg.run_dir / str(i))  # each run its own folder (no resume across them)
            AcceleratorState._reset_state()
            GradientState._reset_state()
            apply_global_batch(cfg, _world()[1])  # run() does this before the backend it builds
            backend, run_dump = build_backend(cfg), Path(dump) / str(i) if dump else None
            parts = _parts(cfg, run_dump)
            with run_options(spec, backend, parts["hooks"], run_dump):
                run(cfg, backend=backend, **parts)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    except DistganError as e:
        print(f"distgan: {e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
