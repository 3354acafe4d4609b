"""`distgan report`: one PNG with loss and FID curves and the latest grid, from a run folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from distgan.report import ReportError, clean_rows, latest_grid, render
from distgan.sampling import save_grid
from tests.helpers import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run, steps: int = 40, restart_at: int | None = 20):
    """A run folder as training leaves it: metrics.jsonl (with a requeue that repeats steps) and grids."""
    import torch

    rows = []
    for step in range(2, steps + 1, 2):
        rows.append({"step": step, "Dmain/loss": 1.4 - step / 100, "Gmain/loss": 0.7 + step / 200,
                     "Dmain/D_real": step / 50, "Dmain/D_fake": -step / 50, "Dreg/r1": 0.1, "kimg": step * 0.016,
                     "img_per_s": 150.0})
        if step % 10 == 0:
            rows.append({"step": step, "eval/fid": 300 / math.sqrt(step), "eval/kid": 0.3 / step, "kimg": step * 0.016,
                         "eval/extractor": "tiny"})
    if restart_at:  # a crashed attempt had written rows up to restart_at + 6 that the resumed run rewrites
        crashed = [dict(r, **{"Dmain/loss": 99.0}) for r in rows if restart_at < r["step"] <= restart_at + 6]
        cut = max(i for i, r in enumerate(rows) if r["step"] <= restart_at) + 1
        rows = rows[:cut] + crashed + rows[cut:]
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = torch.Generator().manual_seed(0)
    for step in (20, steps):
        save_grid(torch.rand(16, 3, 16, 16, generator=g) * 2 - 1, run / "samples" / f"ema-{step:09d}.png", nrow=4)
        save_grid(torch.zeros(16, 3, 16, 16), run / "samples" / f"raw-{step:09d}.png", nrow=4)
    return rows


def test_clean_rows_drops_what_a_resumed_run_rewrote(tmp_path):
    rows = write_run(tmp_path / "run")
    cleaned = clean_rows(rows)
    assert all(r["Dmain/loss"] != 99.0 for r in cleaned if "Dmain/loss" in r)
    steps = [r["step"] for r in cleaned]
    assert steps == sorted(steps) and steps.count(20) == 2  # the training row and the eval row of step 20


def test_report_renders_curves_and_the_latest_grid(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert latest_grid(run).name == "ema-000000040.png"
    out = render(run)
    assert out == run / "report.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and 20_000 < len(data) < 2_000_000
    with Image.open(out) as im:
        assert im.size == (1200, 900)
        pixels = np.asarray(im.convert("RGB")).astype(float)
    # Not a blank canvas: the curves and the grid put many distinct colours on it.
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def test_report_without_fid_or_samples_still_renders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "Dmain/loss": 1.0, "Gmain/loss": 0.7, "kimg": 0.1}) + "\n"
                                       + '{"step": 4, "Dmain/lo')  # a torn last line (killed writer)
    out = render(run, tmp_path / "elsewhere" / "r.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_report_of_a_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        render(tmp_path)


def test_report_command(tmp_path):
    run = tmp_path / "run"
    write_run(run, restart_at=None)
    out = tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "distgan", "report", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # a loaded 2-core CI box
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}" and out.read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run([sys.executable, "-m", "distgan", "report", str(tmp_path / "samples-only")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert bad.returncode == 2 and "does not exist" in bad.stderr  # click checks the folder


def test_later_evaluations_are_merged_and_compared_by_minutes(tmp_path):
    """`distgan eval --log` rows (evals.jsonl) join the training rows by step; the comparison can
    put training minutes on its x axis."""
    import json

    from distgan.compare import compare
    from distgan.report import load_rows, log_evaluation

    runs = []
    for name, speed in (("fast", 1.0), ("slow", 3.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "kimg": s / 10, "minutes": s * speed, "Dmain/loss": 1.0, "Gmain/loss": 1.0} for s in (10, 20, 30)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for step, fid in ((20, 90.0 * speed), (10, 120.0 * speed)):  # evaluated out of order
            row = log_evaluation(run, {"step": step, "kimg": step / 10, "fid": fid, "kid": 0.1, "ckpt": "x"})
            assert row["minutes"] == step * speed and "eval/ckpt" not in row
        merged = load_rows(run)
        assert [r["step"] for r in merged] == [10, 10, 20, 20, 30]
        assert [r["eval/fid"] for r in merged if "eval/fid" in r] == [120.0 * speed, 90.0 * speed]
        runs.append(run)
    result = compare(runs, tmp_path / "by-minutes.png", x="minutes")
    assert [r["best_fid"] for r in result["runs"]] == [90.0, 270.0]
    assert (tmp_path / "by-minutes.png").stat().st_size > 0
