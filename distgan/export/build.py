"""`export_run`: write an export folder (see `folder`) from a checkpoint or run folder.

The folder is written under a temporary name and renamed when complete, so a half-written export
is never mistaken for one. The weights are the checkpoint's `G_ema.safetensors`, copied byte for
byte: what `load_generator(export)` returns is the EMA generator that training sampled from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import distgan
from distgan.errors import CheckpointError
from distgan.export.card import data_terms, model_card
from distgan.export.folder import CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, GRID_FILE, WEIGHTS_FILE
from distgan.report import clean_rows
from distgan.sampling import fixed_latents, generate, grid_layout, load_generator, save_grid
from distgan.tracking import read_metrics
from distgan.weights import open_weights

METRIC_SKIP = ("eval/seconds",)
"""Evaluation-row keys that describe the run, not the model (left out of the card)."""


def export_run(ckpt: str | Path, out: str | Path, n: int = 64, seed: int = 0, force: bool = False) -> Path:
    """Export the EMA generator of `ckpt` (checkpoint or run folder) into folder `out`.

    `n` images from latents of `seed` make the sample grid. An existing non-empty `out` is
    refused unless `force` (then replaced once the new export is complete)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out} already exists and is not empty: choose another --out, or --force to replace it.")
    source = open_weights(ckpt)
    G, cfg, info = load_generator(ckpt)
    n, per_row = grid_layout(n, G.num_classes)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "distgan_version": distgan.__version__,
        "generator": {"arch": cfg.model.arch, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
                      "z_dim": G.z_dim, "num_classes": G.num_classes, "class_names": list(info.class_names)},
        "step": info.step, "d_step": info.d_step, "nimg": info.nimg, "kimg": info.nimg / 1000,
        "world_size": info.world_size, "source_checkpoint": str(info.path),
        "samples": {"file": GRID_FILE, "n": n, "per_row": per_row, "seed": seed},
        "metrics": measured_metrics(info.path, info.step) if source.kind == "checkpoint" else _carried(info.path),
        "data": {}, "config": info.config,
    }
    terms = data_terms(cfg.data.source)
    meta["data"] = {"source": terms.source, "license": terms.license, "license_id": terms.license_id}

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(source.file("G_ema"), tmp / WEIGHTS_FILE)
        publish_export(tmp, out, G, n, per_row, seed, meta, model_card(meta, terms, out.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def publish_export(tmp: Path, out: Path, G: Any, n: int, per_row: int, seed: int, meta: dict[str, Any],
                   card: str) -> None:
    """Finish an export folder being written at `tmp` (weights already there): the sample grid
    from fixed latents, config.json and the card; then move it into place at `out` in one rename."""
    z, c = fixed_latents(n, G.z_dim, G.num_classes, seed, "cpu")
    save_grid(generate(G, z, c), tmp / GRID_FILE, nrow=per_row)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    (tmp / CARD_FILE).write_text(card)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def measured_metrics(ckpt: Path, step: int) -> dict[str, Any]:
    """The last evaluation row of the run at or before `step` (FID, KID, precision/recall when
    measured, with the extractor and sample counts), from the run's metrics.jsonl; {} if none."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run is None or not (run / "metrics.jsonl").is_file():
        return {}
    rows = [r for r in clean_rows(read_metrics(run)) if "eval/fid" in r and r.get("step", 0) <= step]
    if not rows:
        return {}
    row = rows[-1]
    metrics = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/") and k not in METRIC_SKIP}
    return {**metrics, "at_step": row.get("step"), "at_kimg": row.get("kimg")}


def _carried(export: Path) -> dict[str, Any]:
    """Re-exporting an export keeps the metrics it recorded."""
    return json.loads((export / CONFIG_FILE).read_text()).get("metrics", {})


__all__ = ["export_run", "measured_metrics"]
