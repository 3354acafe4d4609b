"""W&B offline runs read back from their real `.wandb` files: every scalar, the grids, the config,
FID rows, and a preempt-and-resume that continues the same run id on an increasing step axis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from distgan.checkpoint import read_checkpoint
from distgan.config import ConfigError, load_config
from distgan.tracking import STEP_KEY, resolve_wandb_mode, wandb_credentials
from tests.helpers import REPO, tiny_overrides
from tests.wandb_reader import find_runs, read_run

EXIT_PREEMPTED = 17

# What a training row must carry (R1 on, so the penalty has rows too) and what an eval row adds.
TRAIN_KEYS = ["Dmain/loss", "Dmain/D_real", "Dmain/D_fake", "Gmain/loss", "Gmain/D_fake", "Dreg/r1", "Dreg/loss",
              "G/grad_norm", "D/grad_norm", "lr/G", "lr/D", "img_per_s", "sec_per_kimg", "kimg", "data/skipped"]
EVAL_KEYS = ["eval/fid", "eval/kid", "eval/kid_std", "eval/n_real", "eval/n_fake", "eval/resize", "eval/extractor"]


def _args(shards: Path, run: Path, cache: Path) -> list[str]:
    # 8 images x 2 D steps = 16 images per step: an evaluation every 2 steps (32 images).
    return tiny_overrides(
        shards, run, "logging.wandb=offline", "logging.project=distgan-test", "logging.group=g1", "logging.tags=[t1,t2]",
        "train.name=wbrun", "train.steps=60", "train.log_every=2", "train.sample_every=4", "train.ckpt_every=20",
        "train.signal_check_every=2", "loss.r1_gamma=1", "loss.r1_interval=2", "eval.every_kimg=0.032",
        "eval.n_samples=32", "eval.extractor=tiny", "eval.batch_size=16", f"data.cache_dir={cache}")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _train_until_preempted(args: list[str], run: Path) -> subprocess.CompletedProcess:
    """Start training; once it has logged step 4, drop a PREEMPT file into the run folder."""
    cmd = [sys.executable, str(REPO / "distgan" / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while proc.poll() is None and time.time() < deadline:
        if any(r["step"] >= 4 for r in _rows(run)):
            (run / "PREEMPT").write_text("test\n")
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=150)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _history(runs) -> list[dict]:
    """Scalar rows (not image rows) of all attempts, in order."""
    return [row for r in runs for row in r.history if STEP_KEY in row and not any(isinstance(v, dict) for v in row.values())]


def test_offline_run_logs_everything_and_a_requeue_continues_the_same_run(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_shards, run, tmp_path / "cache")
    first = _train_until_preempted(args, run)
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    stopped_at = max(r["step"] for r in _rows(run))
    assert stopped_at < 60
    second = subprocess.run([sys.executable, str(REPO / "distgan" / "train.py"), *args, "train.resume=auto"],
                            cwd=REPO, capture_output=True, text=True, timeout=170)
    assert second.returncode == 0, second.stderr[-3000:]

    files = find_runs(run)
    assert len(files) == 2, files  # offline: one folder per attempt, both under the run folder
    a, b = (read_run(f) for f in files)

    # Same W&B run: the id went into the checkpoint and came back on resume.
    state = read_checkpoint(run)  # the run folder's latest checkpoint
    assert a.run_id == b.run_id == state.tracker_id != ""
    for r in (a, b):
        assert (r.project, r.name, r.group, r.tags) == ("distgan-test", "wbrun", "g1", ["t1", "t2"])
        # The resolved config, section by section.
        assert r.config["data"]["resolution"] == 16 and r.config["loss"]["r1_gamma"] == 1.0
        assert r.config["train"]["steps"] == 60 and r.config["logging"]["wandb"] == "offline"
        # Every metric is plotted against distgan's own step.
        assert {"glob_name": "*", "name": "", "step_metric": STEP_KEY} in r.metrics

    # The step axis keeps increasing across the requeue (W&B's own _step restarts offline).
    steps_a, steps_b = a.column(STEP_KEY), b.column(STEP_KEY)
    assert steps_a == sorted(steps_a) and steps_b == sorted(steps_b)
    assert max(steps_a) <= stopped_at <= min(steps_b) and max(steps_b) == 60
    # The evaluation due at the preempted step was owed to the resumed run, which ran it first.
    assert all("eval/fid" in r for r in b.history if r.get(STEP_KEY) == stopped_at)

    # Every scalar of metrics.jsonl is in W&B, row for row, with the same value.
    jsonl = _rows(run)
    wb = _history([a, b])
    assert [r["step"] for r in jsonl] == [r[STEP_KEY] for r in wb]
    for mine, theirs in zip(jsonl, wb):
        for key, value in mine.items():
            if key != "step":
                assert theirs[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    for r in (a, b):
        for key in TRAIN_KEYS + EVAL_KEYS:
            assert r.column(key), f"{key} has no rows in {r.path.name}"
        assert set(r.column("eval/extractor")) == {"tiny"} and set(r.column("eval/n_fake")) == {32}

    # Grids of the EMA and the raw generator as images, with the PNG files beside the log.
    for r in (a, b):
        for key in ("samples/ema", "samples/raw"):
            images = r.images(key)
            assert images, f"no {key} images in {r.path.name}"
            png = r.path.parent / "files" / images[-1]["path"]
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size == (images[-1]["width"], images[-1]["height"])
                assert im.size[0] > 16 * 4  # a grid, not a single 16x16 sample
    # The best FID of the whole run is in the summary of the attempt that reached it, and kept on disk.
    best = min(r["eval/fid"] for r in jsonl if "eval/fid" in r)
    assert min(r.summary.get("best/fid", float("inf")) for r in (a, b)) == pytest.approx(best)
    assert json.loads((run / "checkpoints" / "best" / "best.json").read_text())["value"] == pytest.approx(best)


# ---------------------------------------------------------------------------- mode resolution


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_auto_is_offline_with_a_sync_hint_without_credentials(no_credentials):
    assert not wandb_credentials()
    mode, hint = resolve_wandb_mode("auto")
    assert mode == "offline" and "wandb sync" in hint
    mode, hint = resolve_wandb_mode("online")  # never the interactive login prompt, never a main-rank-only crash
    assert mode == "offline" and "no credentials" in hint and "wandb sync" in hint
    assert resolve_wandb_mode("off") == ("off", "")


def test_auto_is_online_with_a_key_or_a_netrc_entry(no_credentials, monkeypatch):
    (no_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    (no_credentials / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == ("online", "")
    (no_credentials / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == ("online", "")
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit environment choice wins in auto
    assert resolve_wandb_mode("auto")[0] == "offline"


def test_wandb_is_not_imported_when_off(tmp_path):
    code = ("import sys; from pathlib import Path; from distgan.config import load_config; "
            "from distgan.tracking import Tracker; "
            f"t = Tracker(load_config(None, {{'logging.wandb': 'off'}}), Path({str(tmp_path)!r}), True); "
            "t.log(1, {'a': 1.0}); t.finish(); print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "a": 1.0}


def test_config_rejects_unknown_wandb_mode():
    with pytest.raises(ConfigError, match="logging.wandb"):
        load_config(None, {"logging.wandb": "maybe"})
