"""The GPU suite: `make test-gpu` (= `pytest -m gpu tests/gpu`) on a machine with a CUDA GPU.

`make test` collects these files too, so an import or syntax error fails CI, and reports every
test skipped with the reason "CUDA is not available". The CPU-reachable part of each check runs
in the normal suite (tests/unit/test_gpu_suite_cpu.py, through tests/helpers/gpu_suite.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="CUDA is not available"))


def pytest_terminal_summary(terminalreporter):
    """The benchmark table at the end of the run, where `make test-gpu` shows it."""
    from tests.helpers.gpu_suite import output_dir

    table = output_dir() / "gpu-benchmark.md"
    if torch.cuda.is_available() and table.is_file():
        terminalreporter.write_sep("=", f"GPU benchmark ({table})")
        terminalreporter.write(table.read_text())
