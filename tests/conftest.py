"""Shared fixtures: tiny real image datasets written as real shards (no downloads). The helpers
they use live in tests/helpers."""

from __future__ import annotations

import os

# Tests run several processes on 2 cores: one thread each keeps them from oversubscribing. Set
# before torch is imported (below, through distgan), which reads OMP_NUM_THREADS once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DISTGAN_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from distgan.data.shards import write_shards  # noqa: E402
from tests.helpers import make_image_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """64 labelled 16x16 images in 4 shards with dataset.json."""
    images = make_image_folder(tmp_path_factory.mktemp("images"), n_per_class=32)
    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(str(images), out, resolution=16, channels=3, crop="none", shard_size=16, workers=1, progress=False)
    return out


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), keep each test file on one
    worker (module fixtures and the README commands' order depend on it) and every SLURM test on
    the same one: one loopback cluster per run, not one per worker."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        group = "slurm" if "slurm" in path.parent.name else str(path.relative_to(Path(__file__).parent))
        item.add_marker(pytest.mark.xdist_group(group))
