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


@pytest.fixture
def fresh_accelerator():
    """Accelerate's process-wide state (AcceleratorState, GradientState), reset around the test,
    as tests/helpers/inprocess.py does before each in-process run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state()
    GradientState._reset_state()


class _FileScheduling:
    """pytest-xdist plugin (`make test` runs `-n 2`): whole test files as work units, so module
    fixtures and the README commands' order hold, and every SLURM test in one unit, so one loopback
    cluster serves the run instead of one per worker. (xdist's own `--dist loadgroup` marks are
    lost under pytest 9: the group suffix it puts on node ids never reaches the scheduler.)"""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class FileScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return "tests/slurm" if path.startswith("tests/slurm/") else path

        return FileScheduling(config, log)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_FileScheduling(), "distgan-file-scheduling")
