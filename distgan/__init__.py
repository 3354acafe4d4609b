"""distgan: train GANs on one GPU or many nodes.

Python API (notebooks):

    import distgan
    run_dir = distgan.train(overrides={"train.steps": 500})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(config: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Path:
    """Train in this process (or, inside `accelerate.notebook_launcher`, in each launched one).

    `config` is a YAML recipe (default configs/default.yaml) or a Config; `overrides` maps
    `section.key` to values. Returns the run folder.
    """
    from distgan.train import train_api

    return train_api(config, overrides)
