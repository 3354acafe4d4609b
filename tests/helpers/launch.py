"""Launch real multi-process training runs from tests and read back what each rank dumped.

Every run goes through a real launcher (`accelerate launch` or torchrun) on CPU with gloo, one
thread per process, on a free port (other test sessions may run next to this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import REPO, free_port

HARNESS = REPO / "tests" / "helpers" / "rank_harness.py"
TRAIN = REPO / "distgan" / "train.py"
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: CPU, one thread per process, no W&B, no progress bar."""
    e = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(key, None)
    e.update({"OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    e.update(extra)
    return e


def accelerate_cmd(nproc: int, script: Path, args: list[str], mixed_precision: str = "no") -> list[str]:
    """The documented CPU multi-process command (launch/README.md)."""
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--dynamo_backend", "no", "--mixed_precision", mixed_precision, "--main_process_port", str(free_port()),
            str(script), *args]


def torchrun_cmd(nproc: int, script: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), str(script), *args]


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float


def launch(cmd: list[str], extra_env: dict[str, str] | None = None, timeout: float = 180) -> Result:
    """Run a launcher to completion; stdout and stderr together (ranks interleave)."""
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, time.monotonic() - start)


def tail(result: Result, n: int = 4000) -> str:
    return result.output[-n:]


def tiny_args(run_dir: Path, *extra: str, source: Path | None = None) -> list[str]:
    """A config that trains a few steps in seconds per process."""
    args = [f"train.run_dir={run_dir}", "data.resolution=16", "data.batch_size=4", "data.workers=0", "model.z_dim=8",
            "model.g_width=8", "model.d_width=8", "train.steps=4", "train.log_every=2", "train.sample_every=1000",
            "train.ckpt_every=1000", "logging.wandb=off", "train.progress=false", "optim.d_steps=2"]
    if source is not None:
        args.append(f"data.source={source}")
    return args + list(extra)


def read_dumps(folder: Path) -> list[tuple[dict, dict]]:
    """[(tensors, info)] per rank, in rank order, from DISTGAN_TEST_DUMP."""
    ranks = sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [(load_file(str(p.with_suffix(".safetensors"))), json.loads(p.read_text())) for p in ranks]
