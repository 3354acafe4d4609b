"""The files of an export folder and reading them back.

    model.safetensors   the EMA generator's state dict (the Hub's conventional weights name)
    config.json         what the generator is: format, training config, class names, kimg,
                        the sample grid's latents, measured metrics, data source and license
    samples.png         a grid from fixed latents (`sampling.fixed_latents(n, ..., seed)`)
    README.md           the model card (`card.model_card`), with a Hub YAML header

Only JSON and safetensors: loading an export never unpickles code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distgan.checkpoint import CheckpointError, CheckpointInfo

FORMAT = "distgan-generator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GRID_FILE = "samples.png"
CARD_FILE = "README.md"
FILES = (WEIGHTS_FILE, CONFIG_FILE, GRID_FILE, CARD_FILE)
RAW_WEIGHT_FILES = {"G": "G.safetensors", "D": "D.safetensors"}
"""Optional: the raw generator and the discriminator, which an export of `distgan import` also
carries (the foreign pickle had them), so `train.init_from` can fine-tune all three networks."""


def is_export(path: str | Path) -> bool:
    """True for a folder whose config.json says it is a distgan export."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_meta(path: str | Path) -> dict[str, Any]:
    """The export's config.json; CheckpointError naming the file when it is unusable."""
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e}): not a usable distgan export") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file}: export format {meta.get('format_version')} is newer than this distgan reads "
                              f"({FORMAT_VERSION}); upgrade distgan")
    if not (Path(path) / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{Path(path) / WEIGHTS_FILE} is missing: the export is incomplete")
    return meta


def read_export(path: str | Path) -> CheckpointInfo:
    """An export's facts in the shape a checkpoint's have (no optimizer or per-rank state)."""
    meta = read_meta(path)
    try:
        return CheckpointInfo(Path(path), int(meta["step"]), int(meta.get("d_step", 0)), int(meta["nimg"]),
                              int(meta.get("world_size", 1)), meta["config"], list(meta["generator"]["class_names"]),
                              "", {})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} lacks {e}: not a usable distgan export") from None


__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE", "GRID_FILE", "CARD_FILE", "FILES",
           "RAW_WEIGHT_FILES", "is_export",
           "read_meta", "read_export"]
