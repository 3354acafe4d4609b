"""Train a GAN: `accelerate launch distgan/train.py [--config F] [section.key=value ...]`.

The same program as `distgan train`. With no arguments it trains configs/default.yaml's small
GAN on the built-in emoji dataset, on CPU or GPU, and writes sample grids to runs/default/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (accelerate launch distgan/train.py): import the package from the repo
    # root instead of letting distgan/'s own folder shadow top-level module names.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import logging
import os
import random
import types

import numpy as np
import torch

from distgan.config import Config, load_config, parse_override

log = logging.getLogger("distgan")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_summary(G: torch.nn.Module, D: torch.nn.Module) -> str:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return f"G: {count(G) / 1e6:.2f}M parameters, D: {count(D) / 1e6:.2f}M parameters"


def run(cfg: Config, dry_run: bool = False) -> str:
    """Build backend, data, models and trainer from `cfg`; train. Returns "done"/"preempted"/"dry-run"."""
    from distgan.backends import build_backend
    from distgan.data import build_stream
    from distgan.distributed import check_world_size, fail_fast
    from distgan.models import build_models
    from distgan.trainer import Trainer

    if dry_run:
        print(cfg.to_yaml(), end="")
        seed_everything(cfg.train.seed)
        stream = build_stream(cfg.data, cfg.train.seed, 0, 1)
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
        print(f"# {model_summary(G, D)}; data: {stream.info.num_samples} images, {stream.info.num_classes} classes")
        stream.close()
        return "dry-run"

    backend = build_backend(cfg)
    # A rank that fails posts its error; the others stop at their next collective and name it.
    with fail_fast(backend.rank, backend.world_size, cfg.dist.timeout_s):
        _setup_logging(backend.is_main)
        check_world_size(cfg.dist.expect_world_size, backend.world_size)
        run_dir = cfg.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if backend.is_main:  # fail now, not at the first checkpoint (config.yaml is written after resume)
                probe = run_dir / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
        except OSError as e:
            raise SystemExit(f"distgan: error: cannot write to the run folder {run_dir}: {e.strerror or e}") from None
        # Identical initial weights on every rank; then a different stream of latents per rank.
        seed_everything(cfg.train.seed)
        stream = build_stream(cfg.data, cfg.train.seed, backend.rank, backend.world_size)
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
        seed_everything(cfg.train.seed + 1_000_003 * (backend.rank + 1))
        log.info("%s; %d process(es) on %s, mixed precision %s", model_summary(G, D), backend.world_size,
                 backend.device, backend.mixed_precision)
        trainer = Trainer(cfg, backend, stream, G, D)
        try:
            trainer.restore()
            if backend.is_main:  # only once the resume was accepted: a refused one leaves the old file
                (run_dir / "config.yaml").write_text(cfg.to_yaml())
            status = trainer.fit()
        finally:
            stream.close()
        log.info("Finished (%s) at step %d; samples in %s", status, trainer.state.step, run_dir / "samples")
    backend.close()
    return status


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by this script and `distgan train`."""
    from distgan.cli import train_command

    return train_command.main(args=argv, prog_name="distgan/train.py", standalone_mode=True)


def load_from_args(config: str | None, overrides: tuple[str, ...]) -> Config:
    """--config F (else configs/default.yaml when present) plus overrides."""
    return load_config(_recipe(config), list(overrides))


def _recipe(config: str | Path | None) -> str | Path | None:
    """The given YAML recipe, else configs/default.yaml when it exists (a source checkout)."""
    return config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)


def train_api(config=None, overrides=None) -> Path:
    """`distgan.train(...)`: see distgan/__init__.py."""
    if isinstance(config, Config):
        flat = {f"{s}.{k}": v for s, sec in config.to_dict().items() for k, v in sec.items()}
        extra = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides or {})
        cfg = load_config(None, {**flat, **extra})  # re-validated, and the caller's Config stays untouched
    else:
        cfg = load_config(_recipe(config), overrides)
    run(cfg)
    return cfg.run_dir


class _CallableModule(types.ModuleType):
    """`distgan.train` names both this module (the script `accelerate launch distgan/train.py`)
    and the Python API function. Importing a submodule rebinds the package attribute of the same
    name to the module, so, whatever the import order, the module itself calls the API."""

    def __call__(self, config=None, overrides=None) -> Path:
        return train_api(config, overrides)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
