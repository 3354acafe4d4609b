"""A preemption during an evaluation is answered within SLURM's grace period (issue 19 item 1).

Two real gloo ranks (forked by tests/helpers/ranks.py) reach their final step and start the final
FID evaluation (tiny extractor, ~1,200 images at 16x16: seconds of feature passes, one loader
worker per rank). Once the run's log says the evaluation has started, SIGTERM goes to rank 1 and
its loader worker, as SLURM signals every process of a step. Both ranks must give up the
evaluation at the same poll, save, and exit 17 well within the 30 s before SLURM's SIGKILL; the
checkpoint must be whole and owe the evaluation; a relaunch must resume from it, run the
evaluation it owed, and finish.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from distgan.checkpoint import read_checkpoint, verify
from distgan.data.shards import write_shards
from distgan.preemption import MARKER_FILE, PREEMPT_FILE
from tests.helpers import make_image_folder
from tests.helpers.resume import ckpt, latest_step, wait_for
from tests.integration.test_chaos import Leg

pytestmark = pytest.mark.slow
STEPS = 4
GRACE_S = 30  # SLURM's default KillWait: SIGKILL follows SIGTERM after this


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    """1,200 labelled 16x16 images: enough real images for an evaluation that lasts seconds."""
    images = make_image_folder(tmp_path_factory.mktemp("eval-images"), n_per_class=600)
    out = tmp_path_factory.mktemp("eval-shards") / "shards"
    write_shards(str(images), out, resolution=16, channels=3, crop="none", shard_size=300, workers=1, progress=False)
    return out


def args(shards: Path, run_dir: Path) -> list[str]:
    overrides = {
        "data.source": shards, "data.resolution": 16, "data.batch_size": 8, "data.workers": 1,
        "data.cache_dir": run_dir.parent / "cache", "model.z_dim": 8, "model.g_width": 8, "model.d_width": 8,
        "logging.wandb": "off", "train.progress": False, "train.steps": STEPS, "train.log_every": 2,
        "train.run_dir": run_dir, "train.signal_check_every": 2, "dist.timeout_s": 60,
        # Only the final evaluation; an odd n gives the ranks shares of unequal length (the polls
        # must still pair up), a small eval batch gives it many batches.
        "eval.every_kimg": 1000, "eval.extractor": "tiny", "eval.n_samples": 599, "eval.batch_size": 2}
    return [f"{k}={v}" for k, v in overrides.items()]


def children(pid: int) -> list[int]:
    """The processes `pid` forked (its DataLoader workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def eval_owed(path: Path) -> bool:
    return bool(json.loads((path / "state.json").read_text())["state"]["train"]["eval_owed"])


def test_sigterm_during_the_final_evaluation_checkpoints_exits_17_and_the_relaunch_evaluates(eval_shards, tmp_path):
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    leg = Leg(2, pids, args(eval_shards, run_dir))
    wait_for(lambda: any("Evaluating the EMA generator" in line for line in leg.lines), 240,
             "the final evaluation to start", leg.proc)
    rank1 = leg.pid(1)
    targets = [rank1, *children(rank1)]  # the rank and its loader worker(s), as SLURM signals a step
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    rc = leg.wait(timeout=120)
    took = time.monotonic() - signalled
    out = leg.output
    assert rc == 17, out
    assert took < GRACE_S, f"ranks exited {took:.1f} s after SIGTERM\n{out}"
    assert f"Rank 1 received SIGTERM during the evaluation at step {STEPS}" in out, out
    assert "FID " not in out, out  # given up, not finished first
    assert "DataLoader worker" not in out, out
    assert f"checkpoint saved at step {STEPS}; exiting with code 17" in out, out
    assert not (run_dir / "DONE").exists() and not (run_dir / PREEMPT_FILE).exists()
    marker = (run_dir / MARKER_FILE).read_text()
    assert marker.startswith(f"preempted at step {STEPS} (") and "during the evaluation" in marker, marker
    path = ckpt(run_dir, STEPS)
    assert latest_step(run_dir) == STEPS and verify(path) is None
    assert read_checkpoint(path).step == STEPS and eval_owed(path)

    again = Leg(2, pids, args(eval_shards, run_dir))
    assert again.wait(timeout=240) == 0, again.output
    out = "".join(again.lines)
    assert f"Resumed from {path} at step {STEPS} " in out, out[-4000:]
    assert f"Running the evaluation of step {STEPS} that a preemption interrupted" in out, out[-4000:]
    assert (run_dir / "DONE").read_text().strip() == str(STEPS) and not (run_dir / MARKER_FILE).exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in evals] == [STEPS] and evals[0]["eval/n_real"] == 599, evals
    assert verify(ckpt(run_dir, STEPS)) is None and not eval_owed(ckpt(run_dir, STEPS))  # saved as done
    print(f"\npreempt-eval: ranks exited {took:.1f} s after SIGTERM to rank 1 and its worker(s) {targets}")
