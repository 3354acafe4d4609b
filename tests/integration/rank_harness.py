"""Entry script of the multi-process tests: the real `distgan/train.py` CLI plus test hooks.

Launched like the real script (`accelerate launch ... tests/integration/rank_harness.py
section.key=value ...`, or torchrun). Hooks, each off unless its variable is set:

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
                             one launch (one process group), dumping run i into DUMP/i/.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

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
        from distgan.data.stream import DatasetInfo

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

    def latents(self, objective, n: int):
        phase_call, micro = divmod(self.calls, self.plan.A)
        self.calls += 1
        self.current = (phase_call, micro)
        g = torch.Generator().manual_seed(50_000 + phase_call)
        z = torch.randn(self.plan.total, objective.z_dim, generator=g)
        off = self.plan.offset(micro)
        assert n == self.plan.B, (n, self.plan.B)
        return z[off:off + n].to(objective.backend.device), None

    def uniform(self, shape, like, generator=None):
        phase_call, micro = self.current
        g = torch.Generator().manual_seed(90_000 + phase_call)
        u = torch.rand(self.plan.total, generator=g)
        off = self.plan.offset(micro)
        return u[off:off + shape[0]].view(shape).to(device=like.device, dtype=like.dtype)


def install_indexed(cfg, rank: int, world: int) -> None:
    import distgan.data.stream as stream_mod
    import distgan.gan.losses as losses
    from distgan.gan.objective import GANObjective

    plan = IndexedPlan(cfg.data.batch_size, cfg.optim.accumulate, rank, world)
    noise = IndexedNoise(plan)
    stream_mod.build_stream = lambda data_cfg, seed, rank=0, world_size=1: IndexedStream(data_cfg, plan)
    GANObjective.latents = lambda self, n: noise.latents(self, n)
    losses._uniform = noise.uniform


# ---------------------------------------------------------------------------- dump and faults


_ORIGINALS: dict = {}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def install_hooks(dump_dir: Path | None) -> None:
    from safetensors.torch import save_file

    from distgan.trainer import Trainer

    # Wrap the originals, also when called again for the next run of DISTGAN_TEST_MULTI.
    originals = _ORIGINALS.setdefault("trainer", (Trainer.fit, Trainer._next_batch, Trainer._iteration))
    fit, next_batch, iteration = originals
    fail = os.environ.get("DISTGAN_TEST_FAIL", "")

    def _next_batch(self, data):
        batch = next_batch(self, data)
        self.__dict__.setdefault("_seen", []).append(_digest(batch[0]))
        return batch

    def _iteration(self, data):
        if fail:
            rank, step, mode = fail.split(":")
            if self.backend.rank == int(rank) and self.state.step == int(step):
                if mode == "raise":
                    raise RuntimeError(f"injected failure on rank {rank} at step {step}")
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                # hang: like a stuck process, except that the launcher's SIGTERM ends it
                # (distgan's preemption handler would otherwise keep it until SIGKILL, 30 s later).
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(3600)
        return iteration(self, data)

    def _fit(self):
        status = fit(self)
        if dump_dir is not None:
            b, r = self.backend, self.backend.rank
            dump_dir.mkdir(parents=True, exist_ok=True)
            tensors = {}
            for name, module in (("G", b.module("G")), ("D", b.module("D")), ("G_ema", self.G_ema)):
                tensors.update({f"{name}.{k}": v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()})
            save_file(tensors, str(dump_dir / f"rank-{r}.safetensors"))
            info = {"rank": r, "world_size": b.world_size, "batches": self.__dict__.get("_seen", []),
                    "mixed_precision": b.mixed_precision, "backend": type(b).__name__, "step": self.state.step}
            (dump_dir / f"rank-{r}.json").write_text(json.dumps(info))
        return status

    Trainer.fit, Trainer._next_batch, Trainer._iteration = _fit, _next_batch, _iteration


# ---------------------------------------------------------------------------- main


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str]) -> int:
    from distgan.train import main as train_main

    dump = os.environ.get("DISTGAN_TEST_DUMP")
    multi = os.environ.get("DISTGAN_TEST_MULTI")
    if not multi:
        install_hooks(Path(dump) if dump else None)
        if os.environ.get("DISTGAN_TEST_INDEXED") == "1":
            from distgan.config import load_config

            rank, world = _world()
            install_indexed(load_config(None, [a for a in argv if "=" in a and not a.startswith("-")]), rank, world)
        return train_main(argv)

    # Several configs in one launch: same process group, so the backends are not closed between runs.
    from accelerate.state import AcceleratorState, GradientState

    from distgan.backends.accelerate import AccelerateBackend
    from distgan.config import load_config
    from distgan.train import run

    close = AccelerateBackend.close
    AccelerateBackend.close = lambda self: None
    runs = json.loads(Path(multi).read_text())
    rank, world = _world()
    for i, overrides in enumerate(runs):
        cfg = load_config(None, list(argv) + list(overrides))
        cfg.train.run_dir = str(cfg.run_dir / str(i))  # each run its own folder (no resume across them)
        install_hooks(Path(dump) / str(i) if dump else None)
        if os.environ.get("DISTGAN_TEST_INDEXED") == "1":
            install_indexed(cfg, rank, world)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        backend_holder = run(cfg)
        del backend_holder
    AccelerateBackend.close = close
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
