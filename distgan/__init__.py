"""distgan: train GANs on one GPU or many nodes.

Python API (notebooks):

    import distgan
    run_dir = distgan.train(overrides={"train.steps": 500})
    G = distgan.load_generator("exports/emoji")   # an export, run or checkpoint folder
    images = G(torch.randn(16, G.z_dim))          # [-1, 1], NCHW
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


def load_generator(path: str | Path, device: Any = "cpu", raw: bool = False) -> Any:
    """The generator of a `distgan export` folder, run folder or checkpoint, ready to sample:
    on `device`, in eval mode, without gradients. `G(z, labels)` takes `z` of shape
    (N, G.z_dim) and, for a conditional model (G.num_classes > 0), class indices. `raw` picks the
    raw G instead of the EMA one (checkpoints only). For its config and facts as well, use
    `distgan.sampling.load_generator`."""
    from distgan.sampling import load_generator as load  # lazily, like `train` above

    return load(path, raw=raw, device=device)[0]
