"""Build and run one training run from a Config: the library behind `distgan train`,
`distgan/train.py` and the Python API `distgan.train(...)`."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distgan.backends import build_backend
from distgan.config import Config, load_config, parse_override
from distgan.data import build_stream
from distgan.distributed import check_world_size, discover, fail_fast
from distgan.errors import ConfigError, DistganError
from distgan.finetune import prepare_finetune
from distgan.global_batch import apply_global_batch
from distgan.models import build_models
from distgan.gan.objective import NoiseSource
from distgan.trainer import Trainer, TrainerHooks

log = logging.getLogger("distgan")

RECIPES = Path(__file__).resolve().parent / "configs"
"""The shipped recipes. In a checkout distgan/configs is a symlink to the repository's configs/
(the one copy to edit); an installed wheel holds the files (pyproject.toml's package-data)."""
DEFAULT_CONFIG = RECIPES / "default.yaml"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_summary(G: torch.nn.Module, D: torch.nn.Module) -> str:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return f"G: {count(G) / 1e6:.2f}M parameters, D: {count(D) / 1e6:.2f}M parameters"


def run(cfg: Config, dry_run: bool = False, *, stream_factory: Callable = build_stream, noise: NoiseSource | None = None,
        hooks: Sequence[TrainerHooks] = (), backend=None) -> str:
    """Build backend, data, models and trainer from `cfg`; train. Returns "done"/"preempted"/"dry-run".

    The keyword arguments are the injectable parts (tests use them): `stream_factory(data_cfg,
    seed, rank, world_size)` makes the data stream, `noise` the losses' random inputs, `hooks`
    are called from the loop, and a `backend` passed in is used and left open for the caller.
    """
    if dry_run:
        print(cfg.to_yaml(), end="")
        seed_everything(cfg.train.seed)
        stream = build_stream(cfg.data, cfg.train.seed, 0, 1)
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
        print(f"# {model_summary(G, D)}; data: {stream.info.num_samples} images, {stream.info.num_classes} classes")
        stream.close()
        return "dry-run"

    owns_backend = backend is None
    # Before the backend: DeepSpeed's engines are configured with the per-process batch.
    apply_global_batch(cfg, discover().world_size if owns_backend else backend.world_size)
    backend = build_backend(cfg) if owns_backend else backend
    # A rank that fails posts its error; the others stop at their next collective and name it.
    with fail_fast(backend.rank, backend.world_size, cfg.dist.timeout_s):
        _setup_logging(backend.is_main)
        check_world_size(cfg.dist.expect_world_size, backend.world_size)
        # Identical initial weights on every rank; then a different stream of latents per rank.
        # The data and models come first: a bad source or model setting leaves no run folder behind.
        seed_everything(cfg.train.seed)
        stream = stream_factory(cfg.data, cfg.train.seed, backend.rank, backend.world_size)
        G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, stream.info.num_classes)
        try:  # train.init_from / model.freeze_d, before the backend wraps the networks
            finetune = prepare_finetune(cfg, G, D, stream.info.num_classes)
        except BaseException:
            stream.close()
            raise
        seed_everything(cfg.train.seed + 1_000_003 * (backend.rank + 1))
        run_dir = cfg.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if backend.is_main:  # fail now, not at the first checkpoint (config.yaml is written after resume)
                probe = run_dir / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
        except OSError as e:
            stream.close()
            raise DistganError(f"cannot write to the run folder {run_dir}: {e.strerror or e}") from None
        log.info("%s; %d process(es) on %s, mixed precision %s", model_summary(G, D), backend.world_size,
                 backend.device, backend.mixed_precision)
        trainer = Trainer(cfg, backend, stream, G, D, noise=noise, hooks=hooks)
        if finetune is not None:  # the trainer's EMA copy of G takes the source's EMA weights
            finetune.load_ema(trainer.ema.module)
        try:
            trainer.restore()
            if backend.is_main:  # only once the resume was accepted: a refused one leaves the old file
                (run_dir / "config.yaml").write_text(cfg.to_yaml())
            status = trainer.fit()
        finally:
            stream.close()
        log.info("Finished (%s) at step %d; samples in %s", status, trainer.state.step, run_dir / "samples")
    if owns_backend:
        backend.close()
    return status


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def load_from_args(config: str | None, overrides: tuple[str, ...]) -> Config:
    """--config F (else the shipped configs/default.yaml) plus overrides."""
    return load_config(resolve_recipe(config), list(overrides))


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_recipe(config: str | Path | None) -> str | Path | None:
    """The YAML recipe to load: `config` when it is a file; else the shipped recipe it names
    (`configs/resnet-64.yaml` or `resnet-64`, so the README's commands work from any folder
    after `pip install distgan`); with no `config`, the shipped default.yaml."""
    if not config:
        return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    path = Path(config)
    if path.is_file():
        return path
    shipped = RECIPES / (path.name if path.suffix else f"{path.name}.yaml")
    if path.parent in (Path("."), Path("configs")) and shipped.is_file():
        if (os.environ.get("RANK") or "0") == "0":
            print(f"distgan: {config} is not in this folder; using the shipped recipe {shipped}", file=sys.stderr)
        return shipped
    raise ConfigError(f"Config file not found: {config} (shipped recipes: {', '.join(shipped_recipes())})")


def train(config: str | Path | Config | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Path:
    """Train in this process (or, inside `accelerate.notebook_launcher`, in each launched one).

    `config` is a YAML recipe (default configs/default.yaml) or a Config; `overrides` maps
    `section.key` to values (or is a list of `section.key=value` strings). Returns the run folder.
    This is `distgan.train`.
    """
    if isinstance(config, Config):
        flat = {f"{s}.{k}": v for s, sec in config.to_dict().items() for k, v in sec.items()}
        extra = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides or {})
        cfg = load_config(None, {**flat, **extra})  # re-validated, and the caller's Config stays untouched
    else:
        cfg = load_config(resolve_recipe(config), overrides)
    run(cfg)
    return cfg.run_dir
