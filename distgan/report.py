"""One PNG with the loss curves, FID/KID and the latest sample grid of a run (`distgan report RUN`).

For users without W&B: everything comes from the run folder (`metrics.jsonl`, `samples/`).
matplotlib is imported only when drawing, with the Agg backend (no display needed on a cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from distgan.errors import DistganError
from distgan.optional import require
from distgan.tracking import read_metrics


class ReportError(DistganError, ValueError):
    """The run folder has nothing to report (no metrics.jsonl, unreadable rows)."""


def clean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the final history: a resumed run restarts at its checkpoint's step, so rows that
    a crashed attempt wrote after that step are dropped (the resumed run rewrote them)."""
    out: list[dict[str, Any]] = []
    for row in rows:
        step = row.get("step", 0)
        if out and step < out[-1].get("step", 0):  # a restart: this row replaces the rows from `step` on
            out = [r for r in out if r.get("step", 0) < step]
        out.append(row)  # rows of one step (a training row, an eval row) stay side by side
    return out


EVALS_FILE = "evals.jsonl"
"""Evaluations of a run's checkpoints made after training (`distgan eval --log`), one JSON row each."""


def load_rows(run: Path) -> list[dict[str, Any]]:
    """The run's metrics rows, with the rows of later evaluations (`evals.jsonl`) merged in by step."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run} has no metrics.jsonl: is it a distgan run folder (train.run_dir)?")
    rows = clean_rows(read_metrics(run))
    evals = run / EVALS_FILE
    if evals.is_file():
        extra = [json.loads(line) for line in evals.read_text().splitlines() if line.strip()]
        rows = sorted(rows + extra, key=lambda r: r.get("step", 0))  # stable: training rows of a step first
    return rows


def log_evaluation(run: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Append a checkpoint's scores to `run`/evals.jsonl as a row the reports draw: eval/<score>,
    its step and kimg, and the training minutes the run had logged by then (if it logs them)."""
    step = int(result["step"])
    trained = [r for r in clean_rows(read_metrics(run)) if r.get("step", 0) <= step and "minutes" in r]
    row: dict[str, Any] = {"step": step, "kimg": result.get("kimg")}
    if trained:
        row["minutes"] = trained[-1]["minutes"]
    row.update({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and k not in ("step", "kimg")})
    with open(run / EVALS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the rows that have a finite number for `key`."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf") and x in row:
            xs.append(row[x])
            ys.append(value)
    return xs, ys


def latest_grid(run: Path) -> Path | None:
    """The newest EMA sample grid (else the newest grid of any kind)."""
    grids = sorted((run / "samples").glob("ema-*.png")) or sorted((run / "samples").glob("*.png"))
    return grids[-1] if grids else None


def render(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the report of run folder `run` into `out` (default RUN/report.png); returns the path."""
    # Imported here, not at the top: only reports need it (~0.5 s). A base dependency; `require`
    # turns an environment that lacks it anyway into one line naming the install command.
    matplotlib = require("matplotlib", "distgan report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = load_rows(run)
    out = Path(out) if out else run / "report.png"
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (ax_loss, ax_d), (ax_fid, ax_img) = axes

    loss_keys = sorted({k for r in rows for k in r if k.endswith("/loss")})
    for key in loss_keys:
        ax_loss.plot(*series(rows, key), label=key)
    _finish(ax_loss, "Losses", "step", loss_keys, "no loss rows yet")

    d_keys = [k for k in ("Dmain/D_real", "Dmain/D_fake", "Gmain/D_fake") if series(rows, k)[0]]
    for key in d_keys:
        ax_d.plot(*series(rows, key), label=key)
    reg_keys = [k for k in ("Dreg/r1", "Dmain/gp") if series(rows, k)[0]]
    for key in reg_keys:
        ax_d.plot(*series(rows, key), label=key, linestyle="--")
    _finish(ax_d, "D outputs (mean logits) and penalties", "step", d_keys + reg_keys, "no D statistics yet")

    fx, fy = series(rows, "eval/fid", x="kimg")
    kx: list[float] = []
    if fx:
        ax_fid.plot(fx, fy, marker="o", color="tab:red", label="FID")
        best = min(range(len(fy)), key=fy.__getitem__)
        ax_fid.annotate(f"best {fy[best]:.2f}", (fx[best], fy[best]), textcoords="offset points", xytext=(5, 8))
        kx, ky = series(rows, "eval/kid", x="kimg")
        if kx:
            ax_kid = ax_fid.twinx()
            ax_kid.plot(kx, ky, marker="s", color="tab:blue", label="KID", alpha=0.7)
            ax_kid.set_ylabel("KID", color="tab:blue")
        extractor = next((r["eval/extractor"] for r in reversed(rows) if "eval/extractor" in r), "")
        ax_fid.set_ylabel(f"FID ({extractor})" if extractor else "FID", color="tab:red")
    _finish(ax_fid, "FID / KID of the EMA generator", "kimg", ["FID"] if fx else [],
            "no FID yet (set eval.every_kimg, or run `distgan eval`)")
    if fx and kx:  # one legend for both y axes
        handles = ax_fid.get_legend_handles_labels()[0] + ax_kid.get_legend_handles_labels()[0]
        ax_fid.legend(handles, [h.get_label() for h in handles], loc="best", fontsize="small")

    grid = latest_grid(run)
    ax_img.axis("off")
    if grid is not None:
        image = Image.open(grid)
        ax_img.imshow(image, cmap="gray" if image.mode == "L" else None, interpolation="nearest")
        ax_img.set_title(f"Latest samples: {grid.name}")
    else:
        ax_img.text(0.5, 0.5, "no sample grid yet", ha="center", va="center", transform=ax_img.transAxes)

    last = rows[-1] if rows else {}
    speed = next((r["img_per_s"] for r in reversed(rows) if isinstance(r.get("img_per_s"), (int, float))), None)
    title = f"{run.name}: step {last.get('step', 0)}, {last.get('kimg', 0):.1f} kimg"
    if speed is not None:
        title += f", {speed:.0f} img/s"
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _finish(ax, title: str, xlabel: str, labels: list[str], empty: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if labels:
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
