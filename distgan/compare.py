"""Several runs side by side (`distgan report RUN1 RUN2 ...`, e.g. the trials of a sweep).

One PNG overlays their FID curves and their D/G loss curves (x axis kimg, so runs with other
batch sizes line up, or the minutes of training they logged, to compare recipes by cost); a table ranks them by best FID (runs without one last) and shows the config
keys on which they differ. Everything comes from the run folders (`metrics.jsonl`, `config.yaml`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distgan.optional import require
from distgan.report import ReportError, load_rows, series

LOSSES = ("Dmain/loss", "Gmain/loss")
"""The loss curves drawn and the final values tabled (the main D and G phases)."""
IGNORED_KEYS = ("train.name", "train.run_dir")
"""Keys that differ between any two runs by construction: not listed as differences."""


@dataclass
class RunSummary:
    run: Path
    rows: list[dict[str, Any]] = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    """Flat `section.key -> value` of the run's config.yaml ({} when it has none)."""
    best_fid: float | None = None
    best_kimg: float | None = None
    steps: int = 0
    kimg: float = 0.0
    final: dict[str, float] = field(default_factory=dict)
    """The last logged value of each of LOSSES."""


def summarize(run: str | Path) -> RunSummary:
    run = Path(run)
    rows = load_rows(run)  # ReportError naming the folder when it has no metrics.jsonl
    config_file = run / "config.yaml"
    tree = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    config = {f"{s}.{k}": v for s, sec in (tree or {}).items() if isinstance(sec, dict) for k, v in sec.items()}
    summary = RunSummary(run, rows, config)
    kimg, fid = series(rows, "eval/fid", x="kimg")
    if fid:
        best = min(range(len(fid)), key=fid.__getitem__)
        summary.best_fid, summary.best_kimg = fid[best], kimg[best]
    summary.steps = max((int(r.get("step", 0)) for r in rows), default=0)
    summary.kimg = max((float(r.get("kimg", 0)) for r in rows), default=0.0)
    for key in LOSSES:
        values = series(rows, key)[1]
        if values:
            summary.final[key] = values[-1]
    return summary


def rank(summaries: list[RunSummary]) -> list[RunSummary]:
    """Best FID first; runs without an FID last, in the order given."""
    return sorted(summaries, key=lambda s: (s.best_fid is None, s.best_fid if s.best_fid is not None else 0.0))


def differing_keys(summaries: list[RunSummary]) -> list[str]:
    """Config keys whose value is not the same in every run (a key a run lacks counts as differing)."""
    keys = sorted({k for s in summaries for k in s.config} - set(IGNORED_KEYS))
    return [k for k in keys if len({repr(s.config.get(k)) for s in summaries}) > 1]


def compare(runs: list[str | Path], out: str | Path | None = None, x: str = "kimg") -> dict[str, Any]:
    """Summaries ranked, the differing keys and the PNG (default: compare.png in the runs' common
    folder). Returns what `--json` prints."""
    if len(runs) < 2:
        raise ReportError("comparing needs at least two run folders")
    ranked = rank([summarize(r) for r in runs])
    keys = differing_keys(ranked)
    out = Path(out) if out else Path(os.path.commonpath([str(Path(r).resolve()) for r in runs])) / "compare.png"
    draw(ranked, out, x)
    return {"png": str(out), "differing_keys": keys, "runs": [
        {"rank": i + 1, "run": str(s.run), "best_fid": s.best_fid, "best_fid_kimg": s.best_kimg, "steps": s.steps,
         "kimg": s.kimg, "final": s.final, "config": {k: s.config.get(k) for k in keys}}
        for i, s in enumerate(ranked)]}


def table(result: dict[str, Any]) -> str:
    """The ranked table as text: rank, best FID, kimg, final losses, differing keys, run."""
    keys = result["differing_keys"]
    head = ["#", "best FID", "@kimg", "kimg", *(k.split("/")[0] for k in LOSSES), *keys, "run"]
    lines = [head]
    for r in result["runs"]:
        lines.append([str(r["rank"]), _num(r["best_fid"]), _num(r["best_fid_kimg"]), _num(r["kimg"]),
                      *(_num(r["final"].get(k)) for k in LOSSES), *(_num(r["config"][k]) for k in keys), r["run"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


X_AXES = {"kimg": "kimg", "minutes": "minutes of training (evaluations excluded)"}
"""Horizontal axes of the comparison: images shown to D, or the training time the runs logged."""


OVERFITTING = ("Dmain/D_real_sign", "ada/p")
"""The third panel, when the runs logged them: r_t = E[sign D(real)], D's overfitting signal, and
ADA's augmentation probability p."""


def draw(ranked: list[RunSummary], out: Path, x: str = "kimg") -> Path:
    """FID (left) and D/G losses (middle, G dashed) of every run against `x` (see X_AXES), one
    colour per run; then r_t (solid) and ADA's p (dashed) when logged."""
    matplotlib = require("matplotlib", "distgan report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overfitting = any(series(s.rows, OVERFITTING[0])[0] for s in ranked)
    fig, axes = plt.subplots(1, 3 if overfitting else 2, figsize=(21 if overfitting else 14, 5.5))
    ax_fid, ax_loss = axes[0], axes[1]
    for i, s in enumerate(ranked):
        colour, label = f"C{i % 10}", f"#{i + 1} {s.run.name}"
        xs, fid = series(s.rows, "eval/fid", x=x)
        if fid:
            ax_fid.plot(xs, fid, marker="o", color=colour, label=label)
        for key, style in zip(LOSSES, ("-", "--")):
            xs, y = series(s.rows, key, x=x)
            if y:
                ax_loss.plot(xs, y, style, color=colour, label=f"{label} {key.split('/')[0]}", alpha=0.85)
        for key, style in zip(OVERFITTING, ("-", "--")) if overfitting else ():
            xs, y = series(s.rows, key, x=x)
            if y:
                axes[2].plot(xs, y, style, color=colour, label=f"{label} {'r_t' if style == '-' else 'ADA p'}")
    if overfitting:
        axes[2].axhline(0.6, color="gray", linewidth=0.8, linestyle=":")  # ADA's usual target
        axes[2].set_title("Overfitting r_t = E[sign D(real)] (solid), ADA p (dashed)")
        axes[2].set_xlabel(X_AXES[x])
        axes[2].legend(loc="best", fontsize="small")
        axes[2].grid(alpha=0.3)
    for ax, title, ylabel in ((ax_fid, "FID of the EMA generator (lower is better)", "FID"),
                              (ax_loss, "Losses (D solid, G dashed)", "loss")):
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no FID measured (eval.every_kimg)" if ax is ax_fid else "no losses logged",
                    ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{len(ranked)} runs, ranked by best FID")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["RunSummary", "summarize", "rank", "differing_keys", "compare", "table", "draw"]
