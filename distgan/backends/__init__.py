"""Backends wrap G, D and both optimizers for one execution setup; see `base.Backend`.

`build_backend` refuses unsupported combinations before any process group or model exists,
each with a message that says what to use instead.
"""

from __future__ import annotations

import json
import os

from distgan.backends.accelerate import AccelerateBackend
from distgan.backends.base import AdamSpec, Backend, PhaseHandle, StepReport, env_flag, resolve_precision, use_cpu
from distgan.backends.deepspeed import DeepSpeedBackend
from distgan.backends.fsdp import FSDPBackend
from distgan.config import Config
from distgan.errors import ConfigError
from distgan.optional import check_installed


def _launcher_zero_stage() -> str:
    """The ZeRO stage `accelerate launch` was given (flag or deepspeed_config_file), else "N"."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not stage.isdigit() and path:
        try:
            stage = str(json.loads(open(path).read()).get("zero_optimization", {}).get("stage", ""))
        except (OSError, ValueError):
            stage = ""
    return stage if stage.isdigit() else "N"


def check_combination(cfg: Config, cuda: bool | None = None, capability: tuple[int, int] | None = None) -> None:
    """Raise ConfigError for a dist/loss combination that cannot work on this machine (`cuda` and
    the GPU's `capability` default to this machine's; `auto` precision is resolved for them)."""
    d = cfg.dist
    cuda = not use_cpu() if cuda is None else cuda
    precision = resolve_precision(cfg, cuda, capability)
    double_backward = bool(cfg.loss.penalties()) or cfg.loss.objective == "wgan-gp" or cfg.loss.pl_weight > 0
    if precision == "fp16" and not cuda:
        raise ConfigError("dist.mixed_precision=fp16 needs a GPU (no fp16 loss scaling on CPU); "
                          "use dist.mixed_precision=bf16 or no.")
    if d.backend == "deepspeed":
        check_installed("deepspeed", "dist.backend=deepspeed")  # one line, before any rank imports it
        if d.fsdp:
            raise ConfigError("dist.fsdp=true is an accelerate feature; with dist.backend=deepspeed use ZeRO instead "
                              "(dist.zero_stage=1 or 2 shards optimizer state and gradients), or drop dist.backend=deepspeed.")
        if d.zero_stage == 3:
            raise ConfigError("dist.zero_stage=3 is not supported: the G step runs D outside its engine (frozen), which "
                              "ZeRO-3's partitioned parameters do not allow. Use dist.zero_stage=2, or FSDP on GPUs "
                              "(dist.backend=accelerate dist.fsdp=true).")
        if d.compile:
            raise ConfigError("dist.compile=true is not supported with dist.backend=deepspeed; use dist.backend=accelerate "
                              "for torch.compile.")
        if env_flag("ACCELERATE_USE_FSDP"):
            raise ConfigError("accelerate launch was given an FSDP config but dist.backend=deepspeed; use an FSDP "
                              "config with dist.backend=accelerate dist.fsdp=true, or a DeepSpeed config.")
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        if stage.isdigit() and int(stage) != d.zero_stage:
            raise ConfigError(f"accelerate launch was given ZeRO stage {stage} but dist.zero_stage={d.zero_stage}; "
                              f"pass dist.zero_stage={stage} (distgan builds the DeepSpeed engines itself).")
        return
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = _launcher_zero_stage()
        raise ConfigError("accelerate launch was given a DeepSpeed config but dist.backend=accelerate; add "
                          f"dist.backend=deepspeed dist.zero_stage={stage} (distgan runs one DeepSpeed engine per network).")
    if env_flag("ACCELERATE_USE_FSDP") and not d.fsdp:
        raise ConfigError("accelerate launch was given an FSDP config; add dist.fsdp=true (or launch without FSDP).")
    if d.fsdp:
        if precision == "fp16":
            raise ConfigError("dist.fsdp=true with fp16 is not supported (no sharded grad scaler here); use "
                              "dist.mixed_precision=bf16.")
        if double_backward:
            raise ConfigError("FSDP does not support the double backward of R1/R2 / WGAN-GP / path length (loss.r1_gamma>0, "
                              "loss.r2_gamma>0, loss.objective=wgan-gp or loss.pl_weight>0): use DDP (dist.fsdp=false) or dist.backend=deepspeed dist.zero_stage=2.")
        if d.compile:
            raise ConfigError("dist.compile=true with dist.fsdp=true is not supported; drop one of them.")


def build_backend(cfg: Config) -> Backend:
    """Create the backend named by `dist.backend` (DeepSpeed itself is imported only by its backend)."""
    check_combination(cfg)
    if cfg.dist.backend == "deepspeed":
        return DeepSpeedBackend(cfg)
    if cfg.dist.fsdp:
        return FSDPBackend(cfg)
    return AccelerateBackend(cfg)


__all__ = ["AdamSpec", "Backend", "PhaseHandle", "StepReport", "build_backend", "check_combination"]
