"""`sbatch slurm/train.sh` with the real trainer on the loopback cluster: two nodes, one CPU
process each (gloo), a tiny GAN on a 64-image shard set.

- a two-node job completes with world size 2 and both nodes writing their part of the checkpoint;
- `scancel --signal=USR1 --batch` mid-run: the trainer checkpoints and stops, the job requeues
  itself (SLURM_RESTART_COUNT 1), resumes from that checkpoint and ends at exactly the target;
- the same with the requeued job shrunk from 2 nodes to 1 while pending: it resumes the 2-process
  checkpoint with world size 1 and ends at exactly the target, counters continuous.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from cluster import TERMINAL_STATES  # tests/slurm/cluster.py (conftest puts its folder on sys.path)
from distgan.checkpoint import read_checkpoint, verify

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
TINY = ["data.resolution=16", "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=8", "model.z_dim=8",
        "model.g_width=8", "model.d_width=8", "logging.wandb=off", "train.progress=false", "train.log_every=2",
        "train.sample_every=1000", "train.signal_check_every=1", "dist.expect_world_size=2"]
START_S = 480
"""Upper bound for a run to start and reach its first checkpoint; COMPLETE_S for a job to finish after
a requeue. Limits, not expectations: on an idle machine a run starts in ~10 s, but with other test
sessions on the same 2 cores (load ~5) each `accelerate launch` + torch import took ~2 minutes, and a
preempted job ran 6.5 minutes in all."""
COMPLETE_S = 600


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    """The suite's shared tiny dataset (tests/conftest.py)."""
    return tiny_shards


def job_env(run_dir: Path) -> dict[str, str]:
    with socket.socket() as s:  # another test session's cluster may hand out the same job ids
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"GPUS_PER_NODE": "0", "RUN_DIR": str(run_dir), "DISTGAN_TRAIN_SCRIPT": str(REPO / "distgan" / "train.py"),
           "MAIN_PROCESS_PORT": str(port), "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1"}
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["DISTGAN_ENV"] = sys.prefix
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def read_logs(folder: Path) -> str:
    return "\n".join(f"==> {p.name} <==\n{p.read_text(errors='replace')}"
                     for p in sorted(folder.glob("*.out")) + sorted(folder.glob("*.err")))


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else -1


def wait_for_checkpoint(cluster, job: str, run_dir: Path, logs: Path, step: int) -> None:
    """Until the running job has saved a checkpoint at `step` or later (fails if it ends first)."""
    deadline = time.monotonic() + START_S
    while latest_step(run_dir) < step:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{cluster.job_info(job)}\n{read_logs(logs)}"
        time.sleep(0.1)


def check_final(run_dir: Path, steps: int) -> None:
    """The run ended at `steps` with a complete checkpoint written by two ranks on two nodes."""
    final = ckpt(run_dir, steps)
    assert (run_dir / "DONE").read_text().strip() == str(steps)
    assert latest_step(run_dir) == steps and verify(final) is None
    state = read_checkpoint(final)
    # 2 ranks x batch 4 x 2 D steps per G step: no step counted twice or lost across a resume.
    assert (state.step, state.world_size, state.nimg) == (steps, 2, steps * 1 * 4 * 2)  # d_steps 1 (default recipe) x batch 4 x 2 ranks
    ranks = [json.loads((final / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert sorted(r["host"]["slurm_node"] for r in ranks) == ["n1", "n2"]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]  # DDP kept the ranks identical
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] == steps, rows


def test_sbatch_two_nodes_real_trainer(slurm_cluster, shards, tmp_path):
    run_dir, steps = tmp_path / "run", 4
    job = slurm_cluster.sbatch(TRAIN_SH, f"data.source={shards}", *TINY, f"train.steps={steps}",
                               sbatch_args=("--nodes", "2", "--job-name", "real2"), cwd=tmp_path, env=job_env(run_dir))
    state = slurm_cluster.wait_job(job, timeout=COMPLETE_S)
    logs = read_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{logs}\n{slurm_cluster.logs(30)}"
    assert "world size 2 = 2 node(s) x 1 process(es)" in logs
    assert "2 process(es) on cpu" in logs and "run complete" in logs, logs
    # The node's 8 CPUs (--cpus-per-task=8) for its one rank; the job's own settings win over the split.
    assert "cpus 8 per node, 8 per process: data.workers as given, OMP_NUM_THREADS=1" in logs, logs
    check_final(run_dir, steps)
    assert (run_dir / "samples" / f"ema-{steps:09d}.png").is_file()


def test_sbatch_preempted_by_usr1_requeues_and_resumes(slurm_cluster, shards, tmp_path):
    run_dir, target = tmp_path / "run", 80
    job = slurm_cluster.sbatch(TRAIN_SH, f"data.source={shards}", *TINY, f"train.steps={target}", "train.ckpt_every=5",
                               sbatch_args=("--nodes", "2", "--job-name", "preempt"), cwd=tmp_path,
                               env=job_env(run_dir))
    wait_for_checkpoint(slurm_cluster, job, run_dir, tmp_path, step=5)
    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch shell only.
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.requeue_fast(job, restarts=1, timeout=START_S)
    state = slurm_cluster.wait_job(job, timeout=COMPLETE_S)
    logs = read_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{slurm_cluster.job_info(job)}\n{logs}"
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    assert "restart count 0" in logs and "restart count 1" in logs and "requeueing job" in logs, logs

    saved = {int(k) for k in re.findall(r"Preemption requested: checkpoint saved at step (\d+)", logs)}
    assert len(saved) == 1, logs  # both ranks stopped at the same step
    k = saved.pop()
    assert 5 <= k < target
    assert f"Resumed from {ckpt(run_dir, k)} at step {k} " in logs, logs  # from the preemption checkpoint
    assert logs.count("Resumed from") == 1
    check_final(run_dir, target)
    assert not (run_dir / "PREEMPT").exists() and not (run_dir / "PREEMPTED").exists()  # request consumed, marker cleared


def test_two_node_job_requeued_onto_one_node_resumes_on_the_other_world_size(slurm_cluster, shards, tmp_path):
    """Issue 12 item 4: the allocation shrinks across a requeue. A 2-node job (1 process per node)
    is preempted with USR1, requeues itself, and is held while pending and shrunk to 1 node (what a
    busy cluster does to a `--nodes=1-2` job, made deterministic): train.sh must launch world size 1
    (no stale world size from the first allocation), the trainer must resume the 2-process checkpoint
    and end at exactly train.steps with step and images-seen continuous (train.global_batch=8 keeps
    8 images per step: batch 4 on 2 ranks, then batch 4 x 2 accumulation steps on 1)."""
    run_dir, target, global_batch = tmp_path / "run", 40, 8
    tiny = [o for o in TINY if not o.startswith("dist.expect_world_size")]  # the world size changes
    job = slurm_cluster.sbatch(TRAIN_SH, f"data.source={shards}", *tiny, f"train.steps={target}", "train.ckpt_every=5",
                               f"train.global_batch={global_batch}",
                               sbatch_args=("--nodes", "2", "--job-name", "shrink"), cwd=tmp_path, env=job_env(run_dir))
    wait_for_checkpoint(slurm_cluster, job, run_dir, tmp_path, step=5)
    slurm_cluster.signal_batch(job, "USR1")
    # train.sh requeues the job; it is eligible again only after the credential expiry (cred_expire=10),
    # so it is still pending when held here. Shrink it, then let it start.
    info = slurm_cluster.wait_state(job, {"PENDING", *TERMINAL_STATES}, timeout=START_S, min_restarts=1)
    assert info["JobState"] == "PENDING", f"{info}\n{read_logs(tmp_path)}"
    slurm_cluster.scontrol("hold", job)
    # NumCPUs too: it still counts both nodes' CPUs (2 x --cpus-per-task), which one node cannot hold
    # (the job would stay pending with BadConstraints).
    slurm_cluster.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1", f"NumCPUs={info['CPUs/Task']}")
    slurm_cluster.scontrol("release", job)
    slurm_cluster.scontrol("update", f"JobId={job}", "StartTime=now+2")  # see requeue_fast
    state = slurm_cluster.wait_job(job, timeout=COMPLETE_S)
    logs = read_logs(tmp_path)
    info = slurm_cluster.job_info(job)
    assert state == "COMPLETED", f"{state}\n{info}\n{logs}\n{slurm_cluster.logs(30)}"
    assert info["Restarts"] == "1" and info["NumNodes"] == "1" and len(slurm_cluster.hostnames(info["NodeList"])) == 1, info
    assert "restart count 0" in logs and "restart count 1" in logs and "requeueing job" in logs, logs
    assert "world size 2 = 2 node(s) x 1 process(es)" in logs and "world size 1 = 1 node(s) x 1 process(es)" in logs, logs
    assert "2 process(es) on cpu" in logs and "1 process(es) on cpu" in logs, logs  # the trainers' own view

    saved = {int(k) for k in re.findall(r"Preemption requested: checkpoint saved at step (\d+)", logs)}
    assert len(saved) == 1, logs  # both ranks of the 2-node run stopped at the same step
    k = saved.pop()
    assert 5 <= k < target
    assert f"Resumed from {ckpt(run_dir, k)} at step {k} ({k * global_batch / 1000:.1f} kimg)" in logs, logs
    assert logs.count("Resumed from") == 1, logs
    assert f"{ckpt(run_dir, k)} was written by 2 processes, this run has 1" in logs, logs  # (pruned since)

    final = ckpt(run_dir, target)
    assert (run_dir / "DONE").read_text().strip() == str(target)
    assert latest_step(run_dir) == target and verify(final) is None
    state = read_checkpoint(final)
    assert (state.step, state.world_size, state.nimg) == (target, 1, target * global_batch)
    assert (final / "rank-00000.json").is_file() and not (final / "rank-00001.json").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # One row every log_every=2 steps across both runs, none repeated or lost, images seen continuous.
    assert [r["step"] for r in rows] == list(range(2, target + 1, 2)), [r["step"] for r in rows]
    assert all(abs(r["kimg"] - r["step"] * global_batch / 1000) < 1e-9 for r in rows), [(r["step"], r["kimg"]) for r in rows]
    assert not (run_dir / "PREEMPT").exists() and not (run_dir / "PREEMPTED").exists()  # request consumed, marker cleared
