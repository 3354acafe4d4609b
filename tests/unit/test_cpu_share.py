"""How slurm/train.sh splits a node's CPUs between its ranks (data.workers, OMP_NUM_THREADS),
from the variables SLURM sets in a job (values as `sbatch --cpus-per-task` / a whole node give them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distgan.distributed import CpuShare, allocated_cpus, cpu_share
from tests.helpers import REPO


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_CPUS_PER_TASK": "64", "SLURM_CPUS_ON_NODE": "96"}, 64),  # the one task per node holds them
    ({"SLURM_CPUS_ON_NODE": "96"}, 96),  # no --cpus-per-task: what the node gave the job
    ({}, None),  # not under SLURM
    ({"SLURM_CPUS_PER_TASK": ""}, None),
])
def test_allocated_cpus_from_the_slurm_environment(env, expected):
    assert allocated_cpus(env) == expected


def test_gpu_ranks_get_one_cpu_each_for_the_rank_and_the_rest_as_workers():
    assert cpu_share(64, 8, on_gpu=True) == CpuShare(64, 8, 8, workers=7, threads=1)
    assert cpu_share(96, 4, on_gpu=True) == CpuShare(96, 4, 24, workers=8, threads=16)  # workers capped
    # The script's old default: 8 CPUs for 8 GPU ranks is 1 each, no room for a worker.
    assert cpu_share(8, 8, on_gpu=True) == CpuShare(8, 8, 1, workers=0, threads=1)


def test_cpu_ranks_compute_with_threads_and_keep_one_worker():
    assert cpu_share(8, 1, on_gpu=False) == CpuShare(8, 1, 8, workers=1, threads=7)
    assert cpu_share(8, 2, on_gpu=False) == CpuShare(8, 2, 4, workers=1, threads=3)
    assert cpu_share(2, 2, on_gpu=False) == CpuShare(2, 2, 1, workers=0, threads=1)
    assert cpu_share(3, 8, on_gpu=False) == CpuShare(3, 8, 1, workers=0, threads=1)  # never below 1


def test_train_sh_reads_the_split_as_shell_assignments():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run = lambda extra, *args: subprocess.run([sys.executable, "-m", "distgan.distributed", "cpu-share", *args],  # noqa: E731
                                              cwd=REPO, env={**env, **extra}, capture_output=True, text=True)
    done = run({"SLURM_CPUS_PER_TASK": "16", "SLURM_CPUS_ON_NODE": "32"}, "2", "cpu")
    assert done.returncode == 0 and done.stdout.strip() == "NODE_CPUS=16 CPUS_PER_RANK=8 DATA_WORKERS=1 OMP_THREADS=7"
    outside = run({}, "2", "gpu")
    assert outside.returncode == 1 and "SLURM_CPUS_PER_TASK" in outside.stderr
