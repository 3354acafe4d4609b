"""What every golden fixture maker shares: its command line and how fixtures are written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reference", type=Path, required=True, help="checkout of the reference repository")
    parser.add_argument("--commit", required=True, help="the reference checkout's commit")
    parser.add_argument("--out", type=Path, required=True, help="fixture folder (tests/fixtures/golden/<part>)")
    return parser.parse_args()


def write_fixture(path: Path, tensors: dict[str, torch.Tensor], reference: str, commit: str, **meta) -> None:
    """Write `tensors` (contiguous, on CPU) as safetensors whose metadata names the reference
    (`owner/name`), its commit, torch and numpy versions, plus `meta` (JSON-encoded values)."""
    metadata = {"reference": reference, "commit": commit, "torch": torch.__version__, "numpy": np.__version__}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
