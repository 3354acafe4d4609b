"""`distgan report RUN1 RUN2 ...`: runs ranked by their best FID (not their last), the config keys
that differ, overlaid curves in one PNG, and `--json`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner
from PIL import Image

from distgan.cli import main
from distgan.compare import compare, table


def write_run(run: Path, fids: list[float] | None, g_lr: float, loss: float = 1.0) -> Path:
    """metrics.jsonl with a training row every 2 steps and an eval row every 10, and config.yaml."""
    rows = []
    for step in range(2, 41, 2):
        rows.append({"step": step, "kimg": step * 0.016, "Dmain/loss": loss - step / 100, "Gmain/loss": loss + step / 100})
        if fids and step % 10 == 0:
            rows.append({"step": step, "kimg": step * 0.016, "eval/fid": fids[step // 10 - 1]})
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"optim": {"g_lr": g_lr, "d_lr": 2e-4}, "train": {"name": run.name, "run_dir": str(run), "steps": 40}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_runs_are_ranked_by_best_fid_with_their_differing_keys(tmp_path):
    # b's last FID (30) is worse than c's (25), but its best (20) is the best of all.
    a = write_run(tmp_path / "sweep" / "trial-000", [90, 60, 45, 40], 1e-4)
    b = write_run(tmp_path / "sweep" / "trial-001", [80, 20, 25, 30], 2e-4, loss=2.0)
    c = write_run(tmp_path / "sweep" / "trial-002", [70, 50, 28, 25], 4e-4)
    none = write_run(tmp_path / "sweep" / "trial-003", None, 8e-4)
    result = compare([a, none, c, b])
    assert [Path(r["run"]).name for r in result["runs"]] == ["trial-001", "trial-002", "trial-000", "trial-003"]
    assert [r["best_fid"] for r in result["runs"]] == [20, 25, 40, None]
    assert result["runs"][0]["best_fid_kimg"] == 20 * 0.016 and result["runs"][0]["final"] == {
        "Dmain/loss": 2.0 - 0.4, "Gmain/loss": 2.0 + 0.4}
    assert result["differing_keys"] == ["optim.g_lr"]  # train.name/run_dir differ by construction
    assert [r["config"] for r in result["runs"]] == [{"optim.g_lr": v} for v in (2e-4, 4e-4, 1e-4, 8e-4)]
    png = Path(result["png"])
    assert png == (tmp_path / "sweep" / "compare.png").resolve() and Image.open(png).size == (1400, 550)
    lines = table(result).splitlines()
    assert lines[0].split() == ["#", "best", "FID", "@kimg", "kimg", "Dmain", "Gmain", "optim.g_lr", "run"]
    assert lines[1].split()[:3] == ["1", "20", "0.32"] and lines[-1].split()[:2] == ["4", "-"]


def test_report_command_compares_a_sweep_folder_glob(tmp_path):
    for i, fids in enumerate(([50, 40], [30, 35])):
        write_run(tmp_path / "sweep" / f"trial-{i:03d}", fids + [60, 70], 1e-4 * (i + 1))
    (tmp_path / "sweep" / "sweep.json").write_text("{}")  # a shell glob's non-run entry is skipped
    runner = CliRunner()
    entries = sorted(str(p) for p in (tmp_path / "sweep").iterdir())
    result = runner.invoke(main, ["report", *entries, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [Path(r["run"]).name for r in data["runs"]] == ["trial-001", "trial-000"]
    result = runner.invoke(main, ["report", *entries, "--out", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0 and result.output.splitlines()[1].split()[:2] == ["1", "30"]
    assert (tmp_path / "cmp.png").is_file()
    result = runner.invoke(main, ["report", str(tmp_path / "sweep" / "trial-000"), str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output
