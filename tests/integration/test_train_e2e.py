"""The real entry points in a subprocess on a tiny config: run folder contents, determinism, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distgan.data.shards import write_shards
from distgan.errors import DistganError
from tests.helpers import REPO, make_image_folder, tiny_overrides

ENTRIES = {
    "script": [sys.executable, str(REPO / "distgan" / "train.py")],
    "cli": [sys.executable, "-m", "distgan", "train"],
    "module": [sys.executable, "-m", "distgan.train"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                 "distgan.train"],
}
"""Every way to start `distgan train` (accelerate launch runs the script or module the same way)."""


def run_train(args: list[str], entry: str = "script", timeout: int = 180,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(ENTRIES[entry] + args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **env} if env else None)


def test_train_script_writes_a_complete_run_folder(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_shards, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_text = (run / "config.yaml").read_text()
    assert "batch_size: 8" in cfg_text and str(tiny_shards) in cfg_text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("Dmain/loss", "Gmain/loss", "Dmain/D_real", "Dmain/D_fake", "G/grad_norm", "D/grad_norm", "img_per_s", "kimg"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["kimg"] == pytest.approx(6 * 2 * 8 / 1000)
    grid = Image.open(run / "samples" / "ema-000000006.png")
    assert grid.size[0] > 16 * 8 and grid.mode == "RGB"
    ckpt = run / "checkpoints" / "step-000000006"
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    weights = load_file(ckpt / "G_ema.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert (run / "DONE").exists()


def test_same_seed_same_weights_and_other_seed_differs(tiny_shards, tmp_path):
    def final_weights(name: str, seed: int) -> dict:
        run = tmp_path / name
        proc = run_train(tiny_overrides(tiny_shards, run, f"train.seed={seed}", "loss.diffaugment=color,translation,cutout",
                                        "data.workers=1"), entry="cli")
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = run / "checkpoints" / "step-000000006"
        return {n: load_file(ckpt / f"{n}.safetensors") for n in ("G", "D", "G_ema")}

    a, b, c = final_weights("a", 1), final_weights("b", 1), final_weights("c", 2)
    for net in a:
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), f"{net} differs for the same seed"
    assert not all(torch.equal(a["G"][k], c["G"][k]) for k in a["G"]), "a different seed gave identical weights"


def test_unknown_key_fails_before_work(tmp_path):
    proc = run_train(["train.step=5", f"train.run_dir={tmp_path / 'r'}"], entry="cli")
    assert proc.returncode == 2
    assert "Did you mean 'train.steps'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_config_and_sizes(tiny_shards, tmp_path):
    proc = run_train(tiny_overrides(tiny_shards, tmp_path / "r") + ["--dry-run"], entry="cli")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resolution: 16" in proc.stdout and "parameters" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_conditional_without_labels_is_refused(tmp_path):
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "imgs", n_per_class=8, classes=("only",))
    write_shards(str(tmp_path / "imgs" / "only"), flat, resolution=16, crop="none", shard_size=8, progress=False)
    proc = run_train(tiny_overrides(flat, tmp_path / "r", "model.conditional=true"), entry="cli")
    assert proc.returncode != 0
    assert "model.conditional=true needs labelled data" in proc.stderr


def test_sample_command_grid_and_folder(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert run_train(tiny_overrides(tiny_shards, run, "model.conditional=true")).returncode == 0
    grid = tmp_path / "grid.png"
    out = subprocess.run([sys.executable, "-m", "distgan", "sample", "--ckpt", str(run), "--n", "8", "--out", str(grid)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert Image.open(grid).size[0] > 16
    folder = tmp_path / "many"
    out = subprocess.run([sys.executable, "-m", "distgan", "sample", "--ckpt", str(run), "--n", "5", "--class", "1",
                          "--out", str(folder)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    files = sorted(folder.glob("*.png"))
    assert len(files) == 5 and Image.open(files[0]).size == (16, 16)
    bad = subprocess.run([sys.executable, "-m", "distgan", "sample", "--ckpt", str(run), "--n", "2", "--class", "9",
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == DistganError.exit_code and "out of range" in bad.stderr


def test_every_command_help_has_an_example():
    """`--help` of the group and of every command it registers (in-process through click; the
    entry point itself is run as a subprocess by the tests above)."""
    from click.testing import CliRunner

    from distgan.cli import main

    commands = [[]] + [[name] for name in main.list_commands(None)]
    assert len(commands) > 6, commands
    for cmd in commands:
        out = CliRunner().invoke(main, [*cmd, "--help"])
        assert out.exit_code == 0, (cmd, out.output)
        assert "Example" in out.output, cmd


@pytest.mark.parametrize("entry", ["module", "torchrun"])
def test_module_entry_points_dry_run(entry, tiny_shards, tmp_path):
    """`python -m distgan.train` and `torchrun -m distgan.train` (what `accelerate launch -m` runs)."""
    proc = run_train(tiny_overrides(tiny_shards, tmp_path / "r") + ["--dry-run"], entry=entry)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resolution: 16" in proc.stdout and "parameters" in proc.stdout


def test_torchrun_module_trains_a_few_steps(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_shards, run, "train.steps=2", "train.log_every=1"), entry="torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


IMPORT_EVERYTHING = """
import importlib, pathlib, sys
import distgan
api = distgan.train
root = pathlib.Path(distgan.__file__).parent
names = sorted(".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py"))
entry_points = ("distgan.train", "distgan.__main__")  # run when imported; nothing imports them
names = [n for n in names if n not in entry_points]
for name in (reversed(names) if sys.argv[1] == "reversed" else names):
    importlib.import_module(name)
    assert distgan.train is api, f"importing {name} replaced distgan.train by {distgan.train!r}"
print(len(names))
"""


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_python_api_is_callable_whatever_the_import_order(order):
    """Importing every library module and the CLI, in either order, leaves `distgan.train` the
    API function (only `import distgan.train`, the launcher, would rebind it: nothing does)."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING, order], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout) > 40


def test_python_api_trains(tiny_shards, tmp_path):
    import distgan
    import distgan.cli  # noqa: F401 - the CLI and the library it loads leave the API function in place
    from distgan.config import load_config
    from distgan.tracking import read_metrics

    assert callable(distgan.train) and distgan.train.__module__ == "distgan"
    cfg = load_config(None, tiny_overrides(tiny_shards, tmp_path / "api"))
    run_dir = distgan.train(cfg, {"train.steps": 2, "train.log_every": 1})
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]
    assert cfg.train.steps == 6  # the caller's Config is not modified


def test_time_budget_ends_the_run_as_finished(tiny_shards, tmp_path):
    """train.max_minutes stops a run with far more steps than it can do, as a finished run:
    the last step logged, sampled and checkpointed, DONE written; `minutes` is logged each row.
    The progress bar (on here) ends at that step, not at train.steps."""
    run = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_shards, run, "train.steps=100000", "train.max_minutes=0.02",
                                    "train.log_every=1", "train.ckpt_every=100000", "train.sample_every=100000",
                                    "train.progress=true"), env={"DISTGAN_NO_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert 1 <= last < 100000 and rows[-1]["minutes"] >= 0.02  # stopped at the first log step past the budget
    assert all(row["minutes"] < 0.02 for row in rows[:-1])
    assert all(a["minutes"] <= b["minutes"] for a, b in zip(rows, rows[1:]))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{last:09d}"
    assert (run / "samples" / f"ema-{last:09d}.png").is_file() and (run / "DONE").read_text().strip() == str(last)
    final_bar = proc.stderr.replace("\r", "\n").split("train (ends by time")[-1]
    assert f"{last}/{last} [" in final_bar and "/100000" not in final_bar, proc.stderr[-2000:]
