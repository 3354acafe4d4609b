"""Helpers of test_resume.py: a tiny shard set, checkpoint comparisons, waiting on a process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from distgan.checkpoint import read_checkpoint
from distgan.data.shards import write_shards

NETS = ("G", "D", "G_ema")


def make_shards(root: Path) -> Path:
    """64 random 16x16 RGB images in 4 shards of 16 (with dataset.json)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i:03d}.png")
    write_shards(str(root / "img"), root / "shards", resolution=16, channels=3, shard_size=16, workers=1, progress=False)
    return root / "shards"


def ckpt(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:09d}"


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(path / f"{n}.safetensors")) for n in NETS}


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    diffs = [(wa[n][k].double() - wb[n][k].double()).abs().max().item() for n in NETS for k in wa[n]]
    assert all(set(wa[n]) == set(wb[n]) for n in NETS)
    return max(diffs)


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for n in NETS:
        for k in wa[n]:
            assert torch.equal(wa[n][k], wb[n][k]), f"{n}.{k} differs between {a} and {b}"
    for net in ("G", "D"):  # optimizer state too (Adam moments and step counts)
        oa = torch.load(a / f"optim_{net}.pt", weights_only=True)["state"]
        ob = torch.load(b / f"optim_{net}.pt", weights_only=True)["state"]
        for i in oa:
            for key in oa[i]:
                assert torch.equal(oa[i][key], ob[i][key]), f"optim_{net} {i}.{key} differs"
    sa, sb = read_checkpoint(a), read_checkpoint(b)
    assert (sa.step, sa.d_step, sa.nimg) == (sb.step, sb.d_step, sb.nimg)


def latest_step(run_dir: Path) -> int:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else -1


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) while waiting for {what}:\n{out[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
