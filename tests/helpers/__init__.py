"""The one home of test helpers: paths, tiny image folders, the tiny training config, free ports.

Fixtures live in tests/conftest.py and build on these; scripts started by tests (ranks.py,
rank_harness.py) import them too, with the repository root on sys.path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from distgan.distributed import free_port  # one definition, shared with the package's launcher code

REPO = Path(__file__).resolve().parents[2]


def make_image_folder(root: Path, n_per_class: int = 16, classes=("circles", "squares"), size: int = 16, seed: int = 0) -> Path:
    """Class subfolders of simple, distinct PNG images (shapes on noise)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            lo, hi = size // 4, 3 * size // 4
            img[lo:hi, lo:hi, c % 3] = 200 + i % 50
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A config small enough for a few steps in a couple of seconds on one CPU thread."""
    return [f"data.source={shards}", "data.resolution=16", "data.batch_size=8", "data.workers=0",
            "model.z_dim=16", "model.g_width=8", "model.d_width=8", "train.steps=6", "train.log_every=2",
            "train.sample_every=3", "train.ckpt_every=3", f"train.run_dir={run_dir}", "logging.wandb=off",
            "train.progress=false", "optim.d_steps=2", *extra]


__all__ = ["REPO", "free_port", "make_image_folder", "tiny_overrides"]


DEEPSPEED_CPU_PRELUDE = r"""
import json, os
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
import deepspeed
from deepspeed.accelerator import get_accelerator
from distgan.backends.deepspeed import _skip_shm_comm_op
_skip_shm_comm_op()
get_accelerator().is_fp16_supported = lambda: True
"""
"""The start of a one-process DeepSpeed script on the CPU accelerator (a `python -c` subprocess, so
that DeepSpeed's device choice is fixed at import). DeepSpeed's CPU accelerator answers the fp16
capability query from mkldnn (False on CPUs without fp16 hardware), so it is answered True here:
fp16 engines then build and step on the CPU, passing the same config checks a GPU run does."""
