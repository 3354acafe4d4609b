"""The loopback SLURM cluster, and the mechanics of slurm/train.sh with stand-in trainers.

The stand-ins (written to a temp file by each test, passed through DISTGAN_TRAIN_SCRIPT) check
what train.sh promises without the real trainer: the multi-node accelerate launch (world size,
ranks, one per node) and the preemption cycle (USR1 -> PREEMPT -> exit 17 -> requeue -> resume).
Real-trainer versions of these tests live elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"


def python_env() -> dict[str, str]:
    """Make the jobs use this interpreter's environment (accelerate, torch)."""
    if (Path(sys.prefix) / "bin" / "activate").exists():
        return {"DISTGAN_ENV": sys.prefix}  # exercises train.sh's venv hook
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def read_logs(tmp_path: Path) -> str:
    return "\n".join(f"==> {p.name} <==\n{p.read_text(errors='replace')}"
                     for p in sorted(tmp_path.glob("*.out")) + sorted(tmp_path.glob("*.err")))


def wait_for(cond, timeout: float, what: str, cluster=None, job=None, tmp_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if cluster is not None and job is not None and cluster.job_state(job) in {
                "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            break
        time.sleep(0.2)
    extra = ""
    if cluster is not None and job is not None:
        extra = f"\njob: {cluster.job_info(job)}"
    if tmp_path is not None:
        extra += "\n" + read_logs(tmp_path)
    raise AssertionError(f"timed out waiting for {what}{extra}")


# ------------------------------------------------------------------------------------------------


def test_cluster_two_node_job_completes_on_both_nodes(slurm_cluster, tmp_path):
    # Up within start()'s own waits; 60 s leaves room for a loaded 2-core machine (~1.4 s when idle).
    assert slurm_cluster.startup_seconds < 60, slurm_cluster.startup_seconds
    script = tmp_path / "two_nodes.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name=smoke
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --output=smoke-%j.out
        srun bash -c 'echo "task node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID"'
        """))
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    state = slurm_cluster.wait_job(job, timeout=120)
    out = (tmp_path / f"smoke-{job}.out").read_text()
    assert state == "COMPLETED", out + slurm_cluster.logs()
    tasks = sorted(line for line in out.splitlines() if line.startswith("task "))
    assert tasks == ["task node=n1 nodeid=0 procid=0", "task node=n2 nodeid=1 procid=1"], out
    assert slurm_cluster.hostnames(slurm_cluster.job_info(job)["NodeList"]) == ["n1", "n2"]


STANDIN_WORLD = r'''
"""Stand-in trainer: join the process group accelerate set up, record who we are."""
import json, os, sys
import torch
import torch.distributed as dist
from accelerate import Accelerator

args = sys.argv[1:]
overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
run_dir = overrides["train.run_dir"]
state = Accelerator()  # reads ACCELERATE_USE_CPU (a bare PartialState() would not: world size 1)
t = torch.tensor([float(state.process_index + 1)])
if dist.is_initialized():
    dist.all_reduce(t)
info = {
    "rank": state.process_index, "world_size": state.num_processes,
    "local_rank": state.local_process_index, "backend": dist.get_backend(),
    "distributed_type": str(state.distributed_type), "allreduce": t.item(),
    "node_id": os.environ.get("SLURM_NODEID"), "node": os.environ.get("SLURMD_NODENAME"),
    "restarts": os.environ.get("SLURM_RESTART_COUNT", "0"), "argv": args,
    "env_world_size": os.environ.get("WORLD_SIZE"),
}
with open(os.path.join(run_dir, f"rank{state.process_index}.json"), "w") as f:
    json.dump(info, f)
state.wait_for_everyone()
if state.is_main_process:
    open(os.path.join(run_dir, "DONE"), "w").close()
'''


def test_train_sh_cpu_two_nodes_standin_world_size_2(slurm_cluster, tmp_path):
    standin = tmp_path / "standin_world.py"
    standin.write_text(STANDIN_WORLD)
    (tmp_path / "recipe.yaml").write_text("train:\n  steps: 5\n")
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch(
        TRAIN_SH, "train.steps=5", "model.z_dim=16", sbatch_args=("--nodes", "2", "--job-name", "world"),
        cwd=tmp_path, env={**python_env(), "GPUS_PER_NODE": "0", "DISTGAN_TRAIN_SCRIPT": str(standin),
                           "RUN_DIR": str(run_dir), "CONFIG": "recipe.yaml"})
    state = slurm_cluster.wait_job(job, timeout=240)
    logs = read_logs(tmp_path)
    assert state == "COMPLETED", logs
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["env_world_size"]) for r in ranks] == [(2, "2"), (2, "2")], ranks
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sorted((r["node_id"], r["node"]) for r in ranks) == [("0", "n1"), ("1", "n2")]
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert {r["allreduce"] for r in ranks} == {3.0}  # 1 + 2: the two ranks really talked
    assert all(r["local_rank"] == 0 for r in ranks)
    # Then the loader workers train.sh derived from the allocation (`distributed.cpu_share`), when
    # neither the command line nor the recipe gives data.workers.
    argv = ranks[0]["argv"]
    assert argv[:6] == ["--config", "recipe.yaml", f"train.run_dir={run_dir}", "train.resume=auto", "train.steps=5",
                        "model.z_dim=16"], argv
    assert len(argv) == 7 and argv[6].startswith("data.workers=") and f"per process: {argv[6]}," in logs, (argv, logs)
    assert "world size 2 = 2 node(s) x 1 process(es)" in logs
    assert "head n1 at 127.0.0.1:" in logs
    assert "run complete" in logs


STANDIN_PREEMPT = r'''
"""Stand-in trainer with the preemption contract: a step counter checkpointed in the run dir;
when RUN_DIR/PREEMPT appears, all ranks agree, save at the step boundary and exit 17; resume
from the checkpoint; DONE at the target step."""
import json, os, signal, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from accelerate import Accelerator

overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
run = Path(overrides["train.run_dir"])
target = int(overrides["train.steps"])
assert overrides["train.resume"] == "auto"
state = Accelerator()
rank, main = state.process_index, state.is_main_process
restarts = os.environ.get("SLURM_RESTART_COUNT", "0")

def on_usr1(signum, frame):  # train.sh forwards USR1 through srun: record that it arrived
    (run / f"usr1-rank{rank}-restart{restarts}").touch()
signal.signal(signal.SIGUSR1, on_usr1)

ckpt = run / "ckpt.json"
step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0

def save(step):
    tmp = run / "ckpt.json.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, ckpt)

def append(name, text):
    with open(run / name, "a") as f:
        f.write(text + "\n")

if main:
    append("starts.log", f"{restarts} {step}")
state.wait_for_everyone()
while step < target:
    time.sleep(0.1)  # the "work" of one step
    step += 1
    if main:
        append("steps.log", str(step))
        (run / "progress").write_text(str(step))
    flag = torch.tensor([1.0 if (run / "PREEMPT").exists() else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
    if flag.item() > 0:
        usr1 = run / f"usr1-rank{rank}-restart{restarts}"
        deadline = time.time() + 60  # give train.sh's forwarded USR1 time to arrive, for the test (a loaded machine)
        while not usr1.exists() and time.time() < deadline:
            time.sleep(0.05)
        if main:
            save(step)
            append("starts.log", f"preempted at {step}")
        state.wait_for_everyone()  # nobody exits before the checkpoint is complete
        sys.exit(17)
if main:
    save(step)
    (run / "DONE").write_text(str(step))
state.wait_for_everyone()
'''


def test_train_sh_preemption_requeues_and_resumes_standin(slurm_cluster, tmp_path):
    standin = tmp_path / "standin_preempt.py"
    standin.write_text(STANDIN_PREEMPT)
    run_dir = tmp_path / "run"
    target = 60
    job = slurm_cluster.sbatch(
        TRAIN_SH, f"train.steps={target}", sbatch_args=("--nodes", "2", "--job-name", "preempt"),
        cwd=tmp_path, env={**python_env(), "GPUS_PER_NODE": "0", "DISTGAN_TRAIN_SCRIPT": str(standin),
                           "RUN_DIR": str(run_dir)})
    progress = run_dir / "progress"
    wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 5, 240,
             "first run to make progress", slurm_cluster, job, tmp_path)

    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch shell only.
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.requeue_fast(job, restarts=1, timeout=120)
    state = slurm_cluster.wait_job(job, timeout=240)
    logs = read_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{slurm_cluster.job_info(job)}\n{logs}"
    assert slurm_cluster.job_info(job)["Restarts"] == "1", info

    starts = (run_dir / "starts.log").read_text().split("\n")[:-1]
    assert len(starts) == 3 and starts[0] == "0 0", starts
    saved = int(starts[1].split()[-1])
    assert starts[1] == f"preempted at {saved}" and 5 <= saved < target, starts
    assert starts[2] == f"1 {saved}", starts  # second run (restart 1) resumed from the checkpoint
    steps = [int(s) for s in (run_dir / "steps.log").read_text().split()]
    assert steps == list(range(1, target + 1)), steps  # no step lost, none repeated
    assert (run_dir / "DONE").read_text() == str(target)
    assert not (run_dir / "PREEMPT").exists()
    # The signal path: batch shell trap -> PREEMPT file, and USR1 forwarded via srun to both nodes.
    assert "SIGUSR1 received" in logs
    assert {p.name for p in run_dir.glob("usr1-*")} == {"usr1-rank0-restart0", "usr1-rank1-restart0"}
    assert "restart count 0" in logs and "restart count 1" in logs
    assert "requeueing job" in logs and "run complete" in logs
    # 8 CPUs (--cpus-per-task=8) for one CPU rank per node: one loader worker, passed to the trainer.
    assert "cpus 8 per node, 8 per process: data.workers=1," in logs, logs


STANDIN_STUCK = r"""
import os, sys, time
from pathlib import Path
overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = Path(overrides["train.run_dir"])
restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
(run / f"started-restart{restarts}").touch()
if restarts == "0":
    while True:  # never looks at PREEMPT and ignores USR1 (inherited from train.sh's task)
        time.sleep(0.2)
(run / "DONE").touch()
"""


def test_train_sh_stuck_training_requeued_after_preempt_grace_standin(slurm_cluster, tmp_path):
    standin = tmp_path / "standin_stuck.py"
    standin.write_text(STANDIN_STUCK)
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch(
        TRAIN_SH, sbatch_args=("--job-name", "stuck"), cwd=tmp_path,
        env={**python_env(), "GPUS_PER_NODE": "0", "DISTGAN_TRAIN_SCRIPT": str(standin),
             "RUN_DIR": str(run_dir), "PREEMPT_GRACE": "2"})
    wait_for(lambda: (run_dir / "started-restart0").exists(), 240, "first run to start",
             slurm_cluster, job, tmp_path)
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.requeue_fast(job, restarts=1, timeout=120)
    state = slurm_cluster.wait_job(job, timeout=240)
    logs = read_logs(tmp_path)
    assert state == "COMPLETED", f"{slurm_cluster.job_info(job)}\n{logs}\n{slurm_cluster.logs(60)}"
    assert "did not stop within PREEMPT_GRACE=2s" in logs, logs
    assert (run_dir / "started-restart1").exists() and (run_dir / "DONE").exists()


STANDIN_FAIL = r"""
import os, sys, time
from pathlib import Path
overrides = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
if overrides.get("mode") == "crash":
    sys.exit(3)
(Path(overrides["train.run_dir"]) / "running").touch()
time.sleep(120)
"""


def test_train_sh_crash_and_scancel_are_not_requeued_standin(slurm_cluster, tmp_path):
    standin = tmp_path / "standin_fail.py"
    standin.write_text(STANDIN_FAIL)
    env = {**python_env(), "GPUS_PER_NODE": "0", "DISTGAN_TRAIN_SCRIPT": str(standin)}
    crash = slurm_cluster.sbatch(TRAIN_SH, "mode=crash", sbatch_args=("--job-name", "crash"),
                                 cwd=tmp_path, env={**env, "RUN_DIR": str(tmp_path / "crash")})
    cancel = slurm_cluster.sbatch(TRAIN_SH, "mode=sleep", sbatch_args=("--job-name", "cancel"),
                                  cwd=tmp_path, env={**env, "RUN_DIR": str(tmp_path / "cancel")})
    wait_for(lambda: (tmp_path / "cancel" / "running").exists(), 240, "the job to run",
             slurm_cluster, cancel, tmp_path)
    slurm_cluster.run("scancel", cancel)
    assert slurm_cluster.wait_job(crash, timeout=240) == "FAILED", read_logs(tmp_path)
    assert slurm_cluster.wait_job(cancel, timeout=120) == "CANCELLED", read_logs(tmp_path)
    assert slurm_cluster.job_info(crash)["Restarts"] == "0"
    assert slurm_cluster.job_info(cancel)["Restarts"] == "0"
    logs = read_logs(tmp_path)
    assert "training failed (status 1): not requeueing" in logs, logs
