"""Shared fixtures: tiny real image datasets written as real shards (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Tests run several processes on 2 cores: one thread each keeps them from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DISTGAN_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


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


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """64 labelled 16x16 images in 4 shards with dataset.json."""
    from distgan.data.shards import write_shards

    images = make_image_folder(tmp_path_factory.mktemp("images"), n_per_class=32)
    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(str(images), out, resolution=16, channels=3, crop="none", shard_size=16, workers=1, progress=False)
    return out


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A config small enough for a few steps in a couple of seconds on one CPU thread."""
    return [f"data.source={shards}", "data.resolution=16", "data.batch_size=8", "data.workers=0",
            "model.z_dim=16", "model.g_width=8", "model.d_width=8", "train.steps=6", "train.log_every=2",
            "train.sample_every=3", "train.ckpt_every=3", f"train.run_dir={run_dir}", "logging.wandb=off",
            "train.progress=false", "optim.d_steps=2", *extra]
