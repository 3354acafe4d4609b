"""Runs that survive: exact resume, preemption, crashes while saving, full disks, bad input.

Real training on CPU with a tiny GAN (16x16, widths 8, batch 4) over a 64-image shard set. Most
runs happen in this process (`distgan.train.run`, or the click command for user-facing
messages); multi-process runs use `ranks.py` (forked gloo ranks, the same environment torchrun
sets) and one uses the real `accelerate launch`.

The config turns on everything that carries state across a resume: lazy R1 (phase counter),
DiffAugment (torch RNG), flips and shuffle buffers (data position), a DataLoader worker, EMA
(kimg counter), and 10 steps cross an epoch of the stream.
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
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distgan.checkpoint import BestRecord, Checkpointer, verify
from distgan.cli import main
from distgan.config import load_config
from distgan.errors import CheckpointError, NonFiniteLossError
from distgan.run import run
from tests.helpers import free_port
from tests.helpers.resume import (NETS, assert_identical, ckpt, latest_step, make_shards, max_diff, wait_for,
                                              weights)

REPO = Path(__file__).resolve().parents[2]
RANKS = REPO / "tests" / "helpers" / "ranks.py"
N = 10  # steps of the reference run; checkpoints every 5
BASE = {
    "data.resolution": 16, "data.batch_size": 4, "data.workers": 1, "data.shuffle_buffer": 8,
    "model.z_dim": 8, "model.g_width": 8, "model.d_width": 8,
    "loss.r1_gamma": 1.0, "loss.r1_interval": 3, "loss.diffaugment": "color,translation,cutout",
    # Pinned: `distgan train` starts from the default recipe, the Python API from the dataclass
    # defaults, and these tests use both on one run folder.
    "loss.objective": "logistic", "optim.d_steps": 2, "optim.g_betas": "[0.5,0.999]", "optim.d_betas": "[0.5,0.999]",
    "logging.wandb": "off", "train.progress": False, "train.log_every": 2, "train.sample_every": 1000,
    "train.ckpt_every": 5, "train.signal_check_every": 1,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("resume-data"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DISTGAN_NO_PROGRESS", "1")
    # A preempted in-process run keeps its signal handlers (as a real process would until exit).
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def overrides(shards: Path, run_dir: Path, **kw) -> dict:
    return {**BASE, "data.source": str(shards), "train.run_dir": str(run_dir),
            **{k.replace("__", "."): v for k, v in kw.items()}}


def train(shards: Path, run_dir: Path, **kw) -> str:
    return run(load_config(None, overrides(shards, run_dir, **kw)))


def cli(shards: Path, run_dir: Path, **kw):
    """The `distgan train` command in this process: (exit code, stdout + stderr)."""
    args = [f"{k}={v}" for k, v in overrides(shards, run_dir, **kw).items()]
    result = CliRunner().invoke(main, ["train", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output  # stdout and stderr, as a user sees them


_REFS: dict[tuple, Path] = {}


def reference(shards: Path, tmp_path_factory, steps: int = N, **kw) -> Path:
    """Final checkpoint of an uninterrupted in-process run (cached per config)."""
    key = (steps, tuple(sorted(kw.items())))
    if key not in _REFS:
        run_dir = tmp_path_factory.mktemp("reference")
        assert train(shards, run_dir, train__steps=steps, **kw) == "done"
        _REFS[key] = ckpt(run_dir, steps)
    return _REFS[key]


def ranks(n: int, pid_dir: Path, shards: Path, run_dir: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    args = [f"{k}={v}" for k, v in overrides(shards, run_dir, dist__expect_world_size=n, **kw).items()]
    return subprocess.Popen([sys.executable, str(RANKS), str(n), str(pid_dir), "--", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


# ---------------------------------------------------------------------------- exactness


def test_exact_resume_single_process_is_bit_identical(shards, tmp_path, tmp_path_factory):
    ref = reference(shards, tmp_path_factory)
    assert train(shards, tmp_path, train__steps=5) == "done"
    assert train(shards, tmp_path, train__steps=N) == "done"  # resume=auto, more steps allowed
    assert_identical(ckpt(tmp_path, N), ref)
    info = json.loads((ckpt(tmp_path, N) / "rank-00000.json").read_text())
    assert info["data"]["position"]["epoch"] == 1 and info["data"]["position"]["batches"] == 2 * N - 16  # crossed an epoch


def test_preempt_file_checkpoints_and_resumes_exactly(shards, tmp_path, tmp_path_factory):
    def touch_after_first_checkpoint():
        wait_for(lambda: latest_step(tmp_path) >= 5, 120, "the first checkpoint")
        (tmp_path / "PREEMPT").touch()

    toucher = threading.Thread(target=touch_after_first_checkpoint, daemon=True)
    toucher.start()
    assert train(shards, tmp_path, train__steps=400) == "preempted"
    toucher.join()
    k = latest_step(tmp_path)
    assert k > 5 and verify(ckpt(tmp_path, k)) is None
    assert f"preempted at step {k}" in (tmp_path / "PREEMPTED").read_text()  # marker for wrappers
    assert not (tmp_path / "PREEMPT").exists()  # the request was consumed
    assert not (tmp_path / "DONE").exists()
    steps = max(N, k + 2)
    assert train(shards, tmp_path, train__steps=steps) == "done"
    assert not (tmp_path / "PREEMPTED").exists() and (tmp_path / "DONE").read_text().strip() == str(steps)
    assert_identical(ckpt(tmp_path, steps), reference(shards, tmp_path_factory, steps))


@pytest.mark.slow
def test_two_processes_resume_after_signals_to_ranks(shards, tmp_path):
    """SIGUSR1 to rank 1, later SIGTERM to rank 0: every rank saves at the same step and exits 17;
    the resumed run equals an uninterrupted one and the ranks hold identical weights."""
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    kw = dict(train__ckpt_every=4)
    resumed_from = []
    for leg, (rank, sig) in enumerate(((1, signal.SIGUSR1), (0, signal.SIGTERM))):
        before = latest_step(run_dir)
        proc = ranks(2, pids, shards, run_dir, train__steps=400, **kw)
        wait_for(lambda: latest_step(run_dir) > before, 120, f"a checkpoint of leg {leg}", proc)
        os.kill(int((pids / f"rank-{rank}.pid").read_text()), sig)
        rc, out = finish(proc)
        assert rc == 17, out[-3000:]
        assert f"Rank {rank} received {sig.name}" in out
        resumed_from.append(latest_step(run_dir))
        assert verify(ckpt(run_dir, resumed_from[-1])) is None
    assert resumed_from[1] > resumed_from[0]
    steps = resumed_from[1] + 3
    rc, out = finish(ranks(2, pids, shards, run_dir, train__steps=steps, **kw))
    assert rc == 0 and f"Resumed from {ckpt(run_dir, resumed_from[1])}" in out, out[-3000:]
    rc, out = finish(ranks(2, pids, shards, tmp_path / "ref", train__steps=steps, **kw))
    assert rc == 0, out[-3000:]
    assert max_diff(ckpt(run_dir, steps), ckpt(tmp_path / "ref", steps)) <= 1e-6
    for path in (ckpt(run_dir, steps), ckpt(tmp_path / "ref", steps)):
        prints = [json.loads((path / f"rank-{r:05d}.json").read_text())["fingerprint"] for r in (0, 1)]
        assert prints[0] == prints[1], f"ranks diverged in {path}"


@pytest.mark.slow
def test_accelerate_launch_forwards_sigterm_and_reports_failure(shards, tmp_path):
    """SIGTERM to `accelerate launch` reaches both ranks (and their DataLoader workers, which must
    not crash the ranks); they checkpoint and exit 17, which the launcher reports as 1 (accelerate
    <= 1.15) or as 128 + SIGTERM (1.16 re-raises the signal it got): wrappers go by the DONE /
    PREEMPTED markers, never by the launcher's code."""
    args = [f"{k}={v}" for k, v in overrides(shards, tmp_path, train__steps=400, dist__expect_world_size=2).items()]
    launcher = subprocess.Popen(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "distgan/train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1"})
    wait_for(lambda: latest_step(tmp_path) >= 5, 180, "the first checkpoint", launcher)
    launcher.send_signal(signal.SIGTERM)
    rc, out = finish(launcher)
    k = latest_step(tmp_path)
    assert rc in (1, 128 + signal.SIGTERM), out[-3000:]
    assert "Rank 0 received SIGTERM" in out and "Rank 1 received SIGTERM" in out, out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
    assert f"checkpoint saved at step {k}" in out and verify(ckpt(tmp_path, k)) is None
    assert "(SIGTERM)" in (tmp_path / "PREEMPTED").read_text() and not (tmp_path / "DONE").exists()


# ---------------------------------------------------------------------------- faults


def test_sigkill_while_saving_keeps_previous_checkpoint(shards, tmp_path, tmp_path_factory):
    proc = ranks(1, tmp_path / "pids", shards, tmp_path / "run", train__steps=N,
                 env={"DISTGAN_TEST_SLOW_SAVE": f"120@{N}"})
    partial = ckpt(tmp_path / "run", N).with_suffix(".tmp")
    wait_for(lambda: (partial / "state.json").is_file(), 120, "the half-written checkpoint", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, as a node failure would
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    assert partial.is_dir() and not ckpt(tmp_path / "run", N).exists()
    assert Checkpointer(tmp_path / "run", _Main()).find_valid() == ckpt(tmp_path / "run", 5)
    # The resumed run continues from step 5, replaces the partial folder and ends exactly as
    # an uninterrupted run.
    assert train(shards, tmp_path / "run", train__steps=N) == "done"
    assert not partial.exists()
    assert_identical(ckpt(tmp_path / "run", N), reference(shards, tmp_path_factory))


def test_sigkill_at_random_moments_never_leaves_a_bad_latest(shards, tmp_path):
    """Checkpoint every step and SIGKILL at random moments: whatever the moment, `latest` names a
    complete checkpoint, every `step-*` folder verifies, and the next run resumes from `latest`."""
    rng = random.Random(0)
    run_dir, seen = tmp_path / "run", []
    for attempt in range(3):
        before = latest_step(run_dir)
        proc = ranks(1, tmp_path / "pids", shards, run_dir, train__steps=400, train__ckpt_every=1, train__keep_ckpts=2)
        wait_for(lambda: latest_step(run_dir) > before, 120, "a checkpoint", proc)
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, as a node failure would
        finish(proc)
        seen.append(latest_step(run_dir))
        assert verify(ckpt(run_dir, seen[-1])) is None
        assert all(verify(p) is None for p in Checkpointer(run_dir, _Main()).completed())
    assert seen == sorted(seen) and seen[0] > 0


class _Main:
    """Enough of a Backend for Checkpointer's file logic outside a run."""

    is_main, rank, world_size, device = True, 0, 1, torch.device("cpu")


def test_corrupt_latest_falls_back_to_previous(shards, tmp_path, tmp_path_factory):
    assert train(shards, tmp_path, train__steps=N) == "done"
    bad = ckpt(tmp_path, N) / "G.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated, as by a crash of the storage
    junk = ckpt(tmp_path, 15)
    junk.mkdir()
    (junk / "G.safetensors").write_bytes(b"partial")  # a folder without manifest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(shards, tmp_path, train__steps=N) == "done"
    messages = " ".join(str(w.message) for w in caught)
    assert "G.safetensors does not match its checksum" in messages and "no manifest.json" in messages
    assert_identical(ckpt(tmp_path, N), reference(shards, tmp_path_factory))


def test_best_slot_keeps_the_best_checkpoint_past_pruning(shards, tmp_path):
    assert train(shards, tmp_path, train__steps=N, train__keep_ckpts=1) == "done"
    ck, record = Checkpointer(tmp_path, _Main(), keep=1), BestRecord("fid")
    assert ck.best() is None
    assert record.offer(12.5, step=N) is True  # the record decides ...
    ck.keep_best(record)  # ... and the checkpointer files its checkpoint
    assert record.offer(13.0, step=N) is False and record.offer(float("nan"), step=N) is False  # lower is better
    best = tmp_path / "checkpoints" / "best"
    assert json.loads((best / "best.json").read_text()) == {
        "metric": "fid", "value": 12.5, "lower_is_better": True, "checkpoint": ckpt(tmp_path, N).name, "step": N}
    assert verify(best) is None
    assert (best / "G.safetensors").stat().st_ino == (ckpt(tmp_path, N) / "G.safetensors").stat().st_ino  # a hard link
    # Training on prunes step 10 (keep 1); the best slot stays complete and loadable.
    assert train(shards, tmp_path, train__steps=N + 5, train__keep_ckpts=1) == "done"
    assert not ckpt(tmp_path, N).exists() and verify(best) is None
    assert record.offer(11.0, step=N + 5) is True
    ck.keep_best(record)
    assert ck.best()["step"] == N + 5 and ck.best()["value"] == 11.0
    assert record.offer(1.0, step=3) is True
    with pytest.raises(CheckpointError, match="no checkpoint step-000000003"):
        ck.keep_best(record)


def test_resume_errors_name_the_problem(shards, tmp_path):
    for target, expected in ((tmp_path / "missing", "does not exist"),
                             (tmp_path, "is not a distgan checkpoint")):
        code, out = cli(shards, tmp_path / "run", train__resume=target, train__steps=2)
        assert code == CheckpointError.exit_code and expected in out and str(target) in out, out
    assert cli(shards, tmp_path / "run", train__steps=5)[0] == 0
    broken = ckpt(tmp_path / "run", 5)
    (broken / "D.safetensors").write_bytes(b"not weights")
    code, out = cli(shards, tmp_path / "run2", train__resume=broken, train__steps=6)
    assert code == CheckpointError.exit_code and "not a usable checkpoint: D.safetensors does not match its checksum" in out, out


def test_resume_path_rolls_back_and_sets_newer_checkpoints_aside(shards, tmp_path, tmp_path_factory):
    assert train(shards, tmp_path, train__steps=N) == "done"
    assert train(shards, tmp_path, train__steps=N, train__resume=ckpt(tmp_path, 5)) == "done"
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".superseded-" in p.name]
    assert len(aside) == 1 and aside[0].startswith(ckpt(tmp_path, N).name)
    assert_identical(ckpt(tmp_path, N), reference(shards, tmp_path_factory))


def test_config_changes_on_resume(shards, tmp_path):
    assert cli(shards, tmp_path, train__steps=2)[0] == 0
    code, out = cli(shards, tmp_path, train__steps=3, model__g_width=16)
    assert code == 2 and "model.g_width: checkpoint has 8, config has 16" in out, out
    assert "g_width: 8" in (tmp_path / "config.yaml").read_text()  # a refused resume changes nothing
    code, out = cli(shards, tmp_path, train__steps=3, loss__r1_gamma=0.0, optim__g_betas="[0.5,0.9]")
    assert code == 2 and "loss.r1_gamma" in out and "optim.g_betas" in out, out
    code, out = cli(shards, tmp_path, train__resume="none", train__steps=3)
    assert code == CheckpointError.exit_code and "train.resume=none" in out and "already holds checkpoints" in out, out
    # Run length, logging, loss weights, clipping and data loading may change.
    code, out = cli(shards, tmp_path, train__steps=3, train__log_every=1, loss__r1_gamma=2.0, optim__grad_clip=1.0,
                    data__workers=0)
    assert code == 0, out
    assert latest_step(tmp_path) == 3


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (a disk that can really fill up); root only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root and mount for a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_with_clear_message_and_last_checkpoint_intact(shards, tmpfs, tmp_path_factory):
    run_dir = tmpfs / "run"
    assert cli(shards, run_dir, train__steps=5)[0] == 0
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # room for metrics rows, not a checkpoint
    code, out = cli(shards, run_dir, train__steps=400)
    assert code == CheckpointError.exit_code, out
    assert "Could not write checkpoint step-000000010" in out and "the disk is full" in out, out
    assert f"the previous checkpoint {ckpt(run_dir, 5)} is intact" in out
    assert verify(ckpt(run_dir, 5)) is None and not list((run_dir / "checkpoints").glob("*.tmp"))
    # Full while writing something else (the sample grid at the last step): the same kind of message.
    with open(tmpfs / "filler", "ab") as f:
        f.write(b"\0" * (os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize - 8 * 1024))
    code, out = cli(shards, run_dir, train__steps=6)
    assert code == 1 and "No space left on device" in out and "Checkpoints already written are intact" in out, out
    assert verify(ckpt(run_dir, 5)) is None
    # With space again the run continues from the intact checkpoint as if nothing happened.
    (tmpfs / "filler").unlink()
    assert train(shards, run_dir, train__steps=N) == "done"
    assert_identical(ckpt(run_dir, N), reference(shards, tmp_path_factory))


def test_unwritable_run_folder_is_a_clear_error(shards, tmpfs):
    assert cli(shards, tmpfs / "run", train__steps=5)[0] == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    code, out = cli(shards, tmpfs / "run", train__steps=N)
    assert code == 1 and "cannot write to the run folder" in out and "Read-only file system" in out, out
    assert verify(ckpt(tmpfs / "run", 5)) is None


# ---------------------------------------------------------------------------- non-finite losses


def test_nonfinite_stop_names_step_and_phase_and_keeps_last_checkpoint(shards, tmp_path):
    # g_lr=1e30: G's weights explode in its first step; its BatchNorm turns them into NaN images
    # in step 2, so D's loss is NaN there.
    # (No R1 here: it trains D on real images alone, which stays finite.)
    kw = dict(optim__g_lr=1e30, loss__r1_gamma=0.0, train__ckpt_every=1, train__log_every=1, data__workers=0,
              train__steps=4)
    code, out = cli(shards, tmp_path / "stop", **kw)
    assert code == NonFiniteLossError.exit_code, out
    assert "Loss became NaN/inf at step 2, phase Dmain" in out, out
    assert f"the last good checkpoint {ckpt(tmp_path / 'stop', 1)} is intact" in out
    assert latest_step(tmp_path / "stop") == 1 and verify(ckpt(tmp_path / "stop", 1)) is None
    good = weights(ckpt(tmp_path / "stop", 1))
    assert all(torch.isfinite(t).all() for n in NETS for t in good[n].values())

    assert train(shards, tmp_path / "skip", train__on_nonfinite="skip", **kw) == "done"
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("train/nonfinite_skips")] == [2, 3, 4]
    final = weights(ckpt(tmp_path / "skip", 4))
    # Every D update after step 1 was skipped: D is exactly the step-1 D of the stopped run.
    assert all(torch.equal(final["D"][k], good["D"][k]) for k in good["D"])
