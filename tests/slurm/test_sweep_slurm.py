"""`distgan sweep FILE --submit` on the loopback cluster: a 4-trial grid as one SLURM array over
the two nodes (two 4-CPU tasks per node), each task slurm/sweep.sh -> slurm/train.sh -> the real
trainer, one of them preempted with USR1 mid-run.

- every trial completes in its own run folder under the sweep folder, at exactly its target step,
  with its swept values and the sweep's W&B group in its config;
- the preempted task checkpoints, requeues itself alone (Restarts 1) and resumes from that
  checkpoint; the other tasks are never requeued; the tasks ran on both nodes;
- `distgan report <sweep>/*` then compares the four trials.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distgan.checkpoint import read_checkpoint
from distgan.cli import main

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else -1


def test_sweep_array_on_two_nodes_with_one_task_preempted(slurm_cluster, tiny_shards, tmp_path):
    folder = tmp_path / "sweep-lr"
    fixed = {"data.source": str(tiny_shards), "data.resolution": 16, "data.batch_size": 4, "data.workers": 1,
             "data.shuffle_buffer": 8, "model.z_dim": 8, "model.g_width": 8, "model.d_width": 8,
             "logging.wandb": "off", "train.progress": False, "train.steps": STEPS, "train.log_every": 10,
             "train.ckpt_every": 5, "train.sample_every": 1000, "train.signal_check_every": 1}
    spec = {"name": "lr", "folder": str(folder), "method": "grid", "fixed": fixed,
            "parameters": {"optim.g_lr": [1.0e-4, 2.0e-4], "optim.d_lr": [2.0e-4, 4.0e-4]}}
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = slurm_cluster.env(GPUS_PER_NODE="0", DISTGAN_ENV=sys.prefix, OMP_NUM_THREADS="1", DISTGAN_NO_PROGRESS="1",
                            DISTGAN_TRAIN_SCRIPT=str(REPO / "distgan" / "train.py"))
    proc = subprocess.run([sys.executable, "-m", "distgan", "sweep", str(tmp_path / "lr.yaml"), "--submit",
                           "--sbatch", "--cpus-per-task 4"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"submitted array job (\d+): 4 trials", proc.stdout).group(1)
    tasks = [f"{array}_{i}" for i in range(4)]

    # Preempt trial 0 once it has a checkpoint: what --signal=B:USR1@120 does before the time limit.
    trial0, deadline = folder / "trial-000", time.monotonic() + 300
    while latest_step(trial0) < 5:
        assert time.monotonic() < deadline, f"{slurm_cluster.job_info(tasks[0])}\n{slurm_cluster.logs(20)}"
        time.sleep(0.1)
    job0 = slurm_cluster.job_info(tasks[0])["JobId"]
    slurm_cluster.signal_batch(job0, "USR1")
    slurm_cluster.requeue_fast(job0, restarts=1, timeout=180)
    states = [slurm_cluster.wait_job(t, timeout=300) for t in tasks]
    logs = {i: "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"lr-{array}_{i}.*")))
            for i in range(4)}
    assert states == ["COMPLETED"] * 4, f"{states}\n{logs}\n{slurm_cluster.logs(20)}"
    assert [slurm_cluster.job_info(t)["Restarts"] for t in tasks] == ["1", "0", "0", "0"]

    nodes = set()
    for i, (g_lr, d_lr) in enumerate([(1e-4, 2e-4), (1e-4, 4e-4), (2e-4, 2e-4), (2e-4, 4e-4)]):
        run_dir = folder / f"trial-{i:03d}"
        assert (run_dir / "DONE").read_text().strip() == str(STEPS), logs[i]
        info = read_checkpoint(run_dir)
        assert (info.step, info.world_size, info.nimg) == (STEPS, 1, STEPS * 1 * 4)  # d_steps 1 (default recipe) x batch 4
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (cfg["optim"]["g_lr"], cfg["optim"]["d_lr"], cfg["logging"]["group"]) == (g_lr, d_lr, "lr")
        assert cfg["train"]["name"] == f"lr-{i:03d}"
        nodes.add(json.loads((info.path / "rank-00000.json").read_text())["host"]["slurm_node"])
        assert f"array task {i} of job {array}: trial {run_dir}" in logs[i], logs[i]
    assert nodes == {"n1", "n2"}

    saved = set(re.findall(r"Preemption requested: checkpoint saved at step (\d+)", logs[0]))
    assert len(saved) == 1, logs[0]
    k = int(saved.pop())
    assert 5 <= k < STEPS and "requeueing job" in logs[0] and "restart count 1" in logs[0]
    assert f"Resumed from {trial0 / 'checkpoints' / f'step-{k:09d}'} at step {k} " in logs[0], logs[0]
    assert not any("requeueing job" in logs[i] for i in (1, 2, 3))

    result = CliRunner().invoke(main, ["report", *map(str, sorted(folder.iterdir())), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["runs"]) == 4 and report["differing_keys"] == ["optim.d_lr", "optim.g_lr"]
