"""How `distgan` reports a problem the user can fix: one line `distgan: <label>: <message>` on
stderr and the error kind's exit code, no traceback unless asked for (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distgan.errors import ConfigError, DataError
from tests.helpers import REPO

CONSOLE_SCRIPT = Path(sys.executable).parent / "distgan"


def distgan(*args: str, env: dict[str, str] | None = None, entry: str = "module") -> subprocess.CompletedProcess:
    cmd = [str(CONSOLE_SCRIPT)] if entry == "script" else [sys.executable, "-m", "distgan"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("entry", ["module", "script"])
def test_negative_learning_rate_is_one_line_naming_the_key(entry, tmp_path):
    proc = distgan("train", "optim.g_lr=-1", f"train.run_dir={tmp_path / 'r'}", entry=entry)
    assert proc.returncode == ConfigError.exit_code
    assert proc.stderr.splitlines() == ["distgan: config error: optim.g_lr=-1.0: must be greater than 0."]
    assert not (tmp_path / "r").exists()


def test_unknown_builtin_dataset_is_one_line_naming_it(tmp_path):
    proc = distgan("train", "data.source=builtin:nosuch", f"train.run_dir={tmp_path / 'r'}", "logging.wandb=off",
                   f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == DataError.exit_code
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: ") and "'builtin:nosuch'" in lines[0], proc.stderr
    assert "builtin:twemoji" in lines[0]  # says what exists
    assert not (tmp_path / "r").exists()  # a refused run leaves no run folder behind


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(how, tmp_path):
    args = ["train", "optim.g_lr=-1", f"train.run_dir={tmp_path / 'r'}"]
    proc = distgan(*args, env={"DISTGAN_DEBUG": "1"}) if how == "env" else distgan("--debug", *args)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "distgan.errors.ConfigError: optim.g_lr=-1.0: must be greater than 0." in proc.stderr


def test_python_m_distgan_help_lists_every_command():
    proc = distgan("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "shards", "sample", "eval", "report", "bench", "--debug"):
        assert command in proc.stdout


def test_launcher_script_without_the_installed_package_says_how_to_install():
    """`python distgan/train.py` imports the installed distgan (not the folder beside it); `-S`
    (no site-packages) stands for a machine where it was never installed."""
    proc = subprocess.run([sys.executable, "-S", str(REPO / "distgan" / "train.py")], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["distgan/train.py: the distgan package is not installed; run `pip install -e .` "
                                        "in the repository first"]
