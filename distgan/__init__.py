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

    `config` is a YAML recipe (default configs/default.yaml); `overrides` maps `section.key`
    to values. Returns the run folder.
    """
    from distgan.config import Config
    from distgan.train import DEFAULT_CONFIG, load_config, run

    if isinstance(config, Config):
        cfg = config
    else:
        path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = load_config(path, overrides)
    run(cfg)
    return cfg.run_dir
