"""distgan: train GANs on one GPU or many nodes.

Python API (notebooks):

    import distgan
    run_dir = distgan.train(overrides={"train.steps": 500})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(config: str | Path | Any = None, overrides: dict[str, Any] | list[str] | None = None) -> Path:
    """Train in this process (or, inside `accelerate.notebook_launcher`, in each launched one).

    `config` is a YAML recipe (default configs/default.yaml) or a Config; `overrides` maps
    `section.key` to values. Returns the run folder.
    """
    # Imported on the first call: every `import distgan.<module>` runs this file first, and the
    # training stack (torch, accelerate, the trainer) must not load, or cycle, for each of them.
    from distgan.run import train as train_run

    return train_run(config, overrides)
