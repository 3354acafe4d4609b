"""Chaos: a 2-process run interrupted over and over at seeded random moments, restarted each time
with train.resume=auto as SLURM's requeue would, ends bit-identical to an uninterrupted run.

Interruptions (a seeded mix): SIGKILL of one rank (the other must stop within the no-hang
bound), SIGUSR1 preemption of one rank (both checkpoint and exit 17), and SIGKILL of the whole
launch in the middle of a checkpoint write (its temporary folder is left behind). A second run
moves between world sizes (2 -> 1 -> 2) under a constant train.global_batch and must end at
exactly the target step with its counters and data position continuous.

Real processes (forked gloo ranks, tests/helpers/ranks.py), real shards, tiny models.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.checkpoint import read_checkpoint, verify
from tests.helpers import REPO
from tests.helpers.resume import NETS, ckpt, latest_step, wait_for

pytestmark = pytest.mark.slow
RANKS = REPO / "tests" / "helpers" / "ranks.py"
STEPS = 120
INTERRUPTIONS = 11
NO_HANG_S = 60  # a rank whose peer died must be gone within this (gloo sees the closed socket at once)
SAMPLES = 64  # tiny_shards


def args(shards: Path, run_dir: Path, **kw) -> list[str]:
    base = {"data.source": shards, "data.resolution": 16, "data.batch_size": 8, "train.global_batch": 8,
            "data.workers": 0, "data.shuffle_buffer": 8, "model.z_dim": 8, "model.g_width": 8, "model.d_width": 8,
            "loss.r1_gamma": 1.0, "loss.r1_interval": 3, "loss.diffaugment": "color,translation",
            "logging.wandb": "off", "train.progress": False, "train.log_every": 5, "train.sample_every": 1000,
            "train.ckpt_every": 5, "train.keep_ckpts": 2, "train.signal_check_every": 1, "train.steps": STEPS,
            "train.run_dir": run_dir, "dist.timeout_s": NO_HANG_S}
    base.update({k.replace("__", "."): v for k, v in kw.items()})
    return [f"{k}={v}" for k, v in base.items()]


class Leg:
    """One launch of `world` forked ranks; its output is collected in a thread (with the time the
    resume was logged)."""

    def __init__(self, world: int, pids: Path, argv: list[str], env: dict | None = None):
        for old in pids.glob("rank-*.pid"):
            old.unlink()
        self.pids, self.start, self.resumed_after, self.lines = pids, time.monotonic(), None, []
        self.proc = subprocess.Popen([sys.executable, str(RANKS), str(world), str(pids), "--", *argv], cwd=REPO,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1",
                                          "PYTHONPATH": str(REPO), **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.resumed_after is None and "Resumed from" in line:
                self.resumed_after = time.monotonic() - self.start
            self.lines.append(line)

    def pid(self, rank: int) -> int:
        wait_for(lambda: (self.pids / f"rank-{rank}.pid").is_file(), 60, "the rank's pid file", self.proc)
        return int((self.pids / f"rank-{rank}.pid").read_text())

    def wait(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._reader.join(10)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)[-4000:]


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(path / f"{n}.safetensors")) for n in NETS}


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("chaos-reference")
    leg = Leg(2, run_dir / "pids", args(tiny_shards, run_dir))
    assert leg.wait() == 0, leg.output
    return ckpt(run_dir, STEPS)


def test_interrupted_run_ends_bit_identical(tiny_shards, tmp_path, uninterrupted):
    rng = random.Random(12)
    kinds = ["kill-rank"] * 2 + ["usr1"] * 2 + ["kill-in-save"] * 2  # each kind more than once, in a random order
    rng.shuffle(kinds)
    run_dir, survived = tmp_path / "run", []
    for kind in kinds:
        before = latest_step(run_dir)
        env = {}
        if kind == "kill-in-save":  # the checkpoint after the next one stalls once its parts are written
            target = (max(before, 0) // 5 + 2) * 5
            env["DISTGAN_TEST_SLOW_SAVE"] = f"60@{target}"
        leg = Leg(2, tmp_path / "pids", args(tiny_shards, run_dir), env)
        wait_for(lambda: latest_step(run_dir) > before, 300, f"a checkpoint before {kind}", leg.proc)
        if kind == "kill-in-save":
            partial = ckpt(run_dir, target).with_name(f"step-{target:09d}.tmp")
            wait_for(lambda: (partial / "state.json").is_file(), 300, "the half-written checkpoint", leg.proc)
            os.killpg(leg.proc.pid, signal.SIGKILL)  # the node dies in the middle of the write
            leg.wait()
            assert partial.is_dir() and not ckpt(run_dir, target).exists()
        else:
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment of the step loop
            rank = rng.randrange(2)
            if kind == "kill-rank":
                os.kill(leg.pid(rank), signal.SIGKILL)
                killed = time.monotonic()
                rc = leg.wait()
                assert rc != 0 and time.monotonic() - killed < NO_HANG_S, leg.output
            else:
                os.kill(leg.pid(rank), signal.SIGUSR1)
                assert leg.wait() == 17, leg.output
        assert verify(ckpt(run_dir, latest_step(run_dir))) is None
        survived.append((kind, latest_step(run_dir)))
    assert len(survived) == len(kinds) and latest_step(run_dir) < STEPS, survived
    last = Leg(2, tmp_path / "pids", args(tiny_shards, run_dir))
    assert last.wait() == 0, last.output
    final, ref = weights(ckpt(run_dir, STEPS)), weights(uninterrupted)
    diff = max((final[n][k].double() - ref[n][k].double()).abs().max().item() for n in NETS for k in ref[n])
    print(f"\nchaos: {len(survived)} interruptions survived {survived}; max weight difference {diff:g}")
    for n in NETS:
        assert all(torch.equal(final[n][k], ref[n][k]) for k in ref[n]), f"{n} differs from the uninterrupted run"
    a, b = read_checkpoint(ckpt(run_dir, STEPS)), read_checkpoint(uninterrupted)
    assert (a.step, a.d_step, a.nimg) == (b.step, b.d_step, b.nimg)


def test_world_size_changes_keep_counters_and_data_position_continuous(tiny_shards, tmp_path):
    """2 -> 1 -> 2 processes, each leg preempted (PREEMPT file) after a checkpoint; the last leg runs
    to the target. Every checkpoint's data position (epoch, samples) matches its image count: no
    batch was repeated or dropped across the changes (64 samples, global batch 8: no epoch tail)."""
    run_dir, seconds = tmp_path / "run", {}
    steps = 40
    for i, world in enumerate((2, 1, 2, 1)):
        before = latest_step(run_dir)
        leg = Leg(world, tmp_path / "pids", args(tiny_shards, run_dir, train__steps=steps, dist__expect_world_size=world))
        if i < 3:
            wait_for(lambda: latest_step(run_dir) > before, 300, f"a checkpoint of leg {i}", leg.proc)
            (run_dir / "PREEMPT").touch()
            assert leg.wait() == 17, leg.output
        else:
            assert leg.wait() == 0, leg.output
        if i:
            seconds[f"{(2, 1, 2, 1)[i - 1]}->{world}"] = leg.resumed_after
    assert latest_step(run_dir) == steps and (run_dir / "DONE").read_text().strip() == str(steps)
    for path in sorted((run_dir / "checkpoints").glob("step-*[0-9]")):
        info = read_checkpoint(path)
        assert info.step == int(path.name.split("-")[1])
        assert info.d_step == 2 * info.step and info.nimg == 8 * info.d_step  # optim.d_steps=2, global batch 8
        position = json.loads((path / "rank-00000.json").read_text())["data"]["position"]
        assert position["epoch"] * SAMPLES + position["samples"] == info.nimg, (path.name, position, info.nimg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "kimg" in r]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # no step logged twice, none after the target
    print(f"\nresume seconds (launch to resumed): {seconds}")
