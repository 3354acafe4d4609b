"""DeepSpeed backend: one engine per network (ZeRO stage 0, 1 or 2), fp32, bf16 or fp16
(fp16 on GPUs only, with DeepSpeed's own loss scaler; its configs are checked by
`deepspeed.initialize` on CPU in tests/integration/test_deepspeed.py, not trained here).

The route DeepSpeed's GAN tutorial takes, with what was found to work on this stack:

* each network gets its own engine, built with a torch Adam (a config optimizer "Adam" would
  JIT-compile fused_adam for a minute);
* the network a phase trains is called through its engine; the frozen one through its raw
  module (`engine.module`) with requires_grad off. Calling the frozen D through its engine
  fails at ZeRO 0 ("use engine.backward") and at ZeRO 2 ("Gradient computed twice");
* double-backward phases (R1, WGAN-GP) call the trained network's raw module too: the engine's
  forward hooks would reduce gradients inside `autograd.grad(create_graph=True)`. Its
  `engine.backward` still reduces the parameter gradients;
* gradient accumulation: `managed_gradient_accumulation=false` makes every `backward` only
  accumulate and the one `step` the boundary, which is exactly the trainer's schedule (it
  already divides the loss by the number of micro-steps, hence `scale_wrt_gas=False`).
  DeepSpeed allows `overlap_comm` with it only at ZeRO-2, so stage 1 never overlaps;
* the device: `distgan.device` picks it (`local_rank % device_count`, right under SLURM's
  per-task GPU binding) and points LOCAL_RANK at it, which DeepSpeed's engine reads to set its
  own device;
* bf16: the engines hold bf16 weights (fp32 master copies inside the optimizer); floating inputs
  are cast to bf16 on the way in;
* checkpoints: distgan's format, not DeepSpeed's pickles: the partitioned optimizer state and
  fp32 masters are gathered into `optim_G.pt` / `optim_D.pt` keyed by parameter name (see
  `zero_state.py`), so that a DeepSpeed checkpoint resumes under any backend and world size, and
  any backend's checkpoint resumes here. fp16's dynamic loss scale (scale, counters,
  hysteresis) goes into the backend's state (`state_dict`), so a resumed fp16 run is exact.

ZeRO-3 is refused (`check_combination`): its partitioned parameters cannot be used through
the raw module of the frozen network.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distgan.backends.base import AdamSpec, Backend, PhaseHandle, StepReport, resolve_precision, use_cpu
from distgan.backends.zero_state import EngineOptimizerState
from distgan.config import Config
from distgan.device import apply_numerics, place_this_process, to_memory_format
from distgan.distributed import discover, export_env
from distgan.errors import ConfigError, WorldSizeError
from distgan.gan.phases import Phase



def _skip_shm_comm_op() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce (~47 s cold).

    It only serves `inference_all_reduce` (inference kernels), never training; without it
    DeepSpeed uses torch.distributed (gloo) like every other collective here. Set
    DISTGAN_DS_SHM_OP=1 to build it anyway (then cache it with TORCH_EXTENSIONS_DIR).
    """
    if os.environ.get("DISTGAN_DS_SHM_OP") == "1":
        return
    module = sys.modules.get("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is torch itself
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def user_config(cfg: Config) -> dict:
    """The DeepSpeed JSON of `dist.deepspeed_config` (else the one `accelerate launch` was given),
    checked against what distgan decides itself."""
    path = cfg.dist.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"dist.deepspeed_config={path}: cannot read it as JSON ({e})") from None
    if "optimizer" in data or "scheduler" in data:
        raise ConfigError(f"{path}: remove the 'optimizer'/'scheduler' sections: distgan gives each engine its own "
                          "torch Adam (optim.* keys), and a config optimizer would JIT-compile fused_adam.")
    zero = data.get("zero_optimization", {})
    stage = zero.get("stage", "auto")
    if stage != "auto" and int(stage) != cfg.dist.zero_stage:
        raise ConfigError(f"{path} asks for ZeRO stage {stage} but dist.zero_stage={cfg.dist.zero_stage}; pass "
                          f"dist.zero_stage={stage}.")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise ConfigError(f"{path}: zero_optimization.{key} is not supported (it needs DeepSpeed's CPU Adam, "
                              "distgan passes torch Adam); remove it.")
    precision = resolve_precision(cfg)
    for key, name in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = data.get(key, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == name):
            raise ConfigError(f"{path} sets {key}.enabled={enabled} but dist.mixed_precision={precision or 'no'}; "
                              f"make them agree (or write \"auto\").")
    return data


def _merge(base: dict, ours: dict) -> dict:
    """`ours` over `base`, recursively; "auto" values of `base` that we do not set are dropped."""
    out = {k: v for k, v in base.items() if v != "auto"}
    for key, value in ours.items():
        out[key] = _merge(out.get(key, {}) if isinstance(out.get(key), dict) else {}, value) if isinstance(value, dict) else value
    return out


def ds_config(cfg: Config, world_size: int, precision: str, cpu: bool) -> dict:
    """The DeepSpeed config of both engines (the same for G and D)."""
    stage, bf16 = cfg.dist.zero_stage, precision == "bf16"
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accumulate,
        "train_batch_size": cfg.data.batch_size * cfg.optim.accumulate * world_size,
        # The trainer calls backward once per micro-batch and step once: step is the boundary.
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": precision == "fp16"},
        # Clipping by DeepSpeed, except at stage 0 in fp32 where this backend clips (see step).
        "gradient_clipping": cfg.optim.grad_clip if stage > 0 or bf16 else 0.0,
        "steps_per_print": 10**12,
    }
    if precision in ("bf16", "fp16"):
        # BatchNorm wants its running statistics in the weights' dtype (DeepSpeed keeps buffers fp32):
        # else "expected scalar type Half/BFloat16 but found Float" at the first forward.
        ours["data_types"] = {"buffer_dtype": precision}
    base = user_config(cfg)
    if stage > 0:
        zero = base.get("zero_optimization", {})
        ours["zero_optimization"].update({"overlap_comm": _overlap_comm(cfg, stage, cpu, zero),
                                          "contiguous_gradients": zero.get("contiguous_gradients", True)})
    return _merge(base, ours)


def _overlap_comm(cfg: Config, stage: int, cpu: bool, zero: dict) -> bool:
    """Overlap the gradient reduction with the backward: on GPUs (side streams; nothing to gain on
    the CPU), and only at ZeRO-2: with `managed_gradient_accumulation=false` DeepSpeed asserts
    "overlap_comm only with ZeRO stage 2" at `deepspeed.initialize` for stage 1."""
    asked = zero.get("overlap_comm", "auto")
    if stage != 2 and asked is True:
        path = cfg.dist.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        raise ConfigError(f"{path}: zero_optimization.overlap_comm=true needs ZeRO stage 2 (distgan steps each "
                          f"engine itself, managed_gradient_accumulation=false); dist.zero_stage={stage}. Remove it "
                          "or use dist.zero_stage=2.")
    if stage != 2 or cpu:
        return False
    return True if asked == "auto" else bool(asked)


LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""The fp16 dynamic loss scaler's state: the scale, its iteration counter, the iteration of the
last overflow (the scale grows again `scale_window` iterations after it) and the overflows still
tolerated before the scale halves (`hysteresis`; ZeRO-1/2's scaler only)."""


def dynamic_loss_scaler(zero_opt: Any) -> Any | None:
    """What holds an fp16 engine's dynamic loss scale: ZeRO-1/2's optimizer keeps a
    `DynamicLossScaler` in `loss_scaler`; ZeRO-0's fp16 optimizers (`FP16_Optimizer`,
    `FP16_UnfusedOptimizer`) keep a `LossScaleConfig` in `loss_scale_config`. None where no scale
    changes during training (fp32, bf16, a static `loss_scale`)."""
    scaler = getattr(zero_opt, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        return scaler
    config = getattr(zero_opt, "loss_scale_config", None)
    if config is not None and getattr(config, "dynamic_loss_scale", False):
        return config
    return None


def loss_scale_state(zero_opt: Any) -> dict[str, Any] | None:
    """The dynamic loss scaler's fields (plain numbers, for state.json), or None without one."""
    scaler = dynamic_loss_scaler(zero_opt)
    if scaler is None:
        return None
    return {name: getattr(scaler, name) for name in LOSS_SCALE_FIELDS if hasattr(scaler, name)}


def load_loss_scale_state(zero_opt: Any, state: dict[str, Any]) -> None:
    """Restore `loss_scale_state`. Nothing to do when this engine scales nothing (the run resumed
    in bf16 or fp32); a field this scaler lacks (hysteresis, saved under ZeRO-1/2 and resumed at
    ZeRO-0) is skipped."""
    scaler = dynamic_loss_scaler(zero_opt)
    if scaler is None:
        return
    for name in LOSS_SCALE_FIELDS:
        if name in state and hasattr(scaler, name):
            setattr(scaler, name, float(state[name]) if name == "cur_scale" else int(state[name]))


class DeepSpeedBackend(Backend):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        info = export_env(discover(), single_free_port=True)  # deepspeed always opens a process group
        cpu = use_cpu()
        self.mixed_precision = resolve_precision(cfg)
        if cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is imported
        self.local_rank = info.local_rank
        # Before NCCL starts (each rank's communicator on its own GPU) and before the engines
        # read LOCAL_RANK to pick theirs; the flags before any model runs (cuBLAS workspace).
        self.device = place_this_process(cpu, info.local_rank, info.local_world_size).device
        apply_numerics(cfg.train.deterministic, cfg.dist.cudnn_benchmark)
        import deepspeed  # here, not at the top: 1-2 s, and it reads DS_ACCELERATOR when imported

        _skip_shm_comm_op()
        self._deepspeed = deepspeed
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if info.world_size != self.world_size:
            raise WorldSizeError(f"the launcher announced {info.world_size} processes, the process group has {self.world_size}")
        self._dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16 if self.mixed_precision == "fp16" else None
        self._config = ds_config(cfg, self.world_size, self.mixed_precision, cpu)
        # fp32 stage 0: this backend all-reduces and clips itself, so that it knows the norm.
        self._own_sync = cfg.dist.zero_stage == 0 and self._dtype is None
        self.grad_clip = cfg.optim.grad_clip if self._own_sync else 0.0  # else DeepSpeed clips
        self.optimizer_state = EngineOptimizerState(self)
        self._engines: dict = {}
        self._opts: dict[str, torch.optim.Optimizer] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, G, D, optim: dict[str, AdamSpec]) -> None:
        for net, model in (("G", G), ("D", D)):
            to_memory_format(model, self.cfg.dist.channels_last)
            opt = optim[net].build(model.parameters())
            engine, *_ = self._deepspeed.initialize(model=model, optimizer=opt, config=dict(self._config))
            if self._own_sync:
                engine.enable_backward_allreduce = False
            self._engines[net], self._opts[net] = engine, opt

    def module(self, net: str) -> nn.Module:
        return self._engines[net].module

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net]

    def _make_handle(self, phase: Phase) -> PhaseHandle:
        return _EngineHandle(self, phase)

    def cast_inputs(self, fn: Callable) -> Callable:
        """Floating inputs to the engines' dtype (DeepSpeed casts the weights, not the inputs)."""
        if self._dtype is None:
            return fn
        dtype = self._dtype

        def call(*args, **kwargs):
            args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            return fn(*args, **kwargs)

        return call

    def autocast(self):
        # Only sampling/evaluation use this with the engines' reduced-precision weights and
        # fp32 inputs; training casts inputs itself (see cast_inputs).
        if self._dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self._dtype)

    def state_dict(self) -> dict[str, Any]:
        """Adds each fp16 engine's dynamic loss scale (`loss_scale_state`): without it a resumed
        fp16 run restarts from the initial scale (2^16 or the config's) and is not exact."""
        state = super().state_dict()
        scales = {net: s for net, engine in self._engines.items() if (s := loss_scale_state(engine.optimizer)) is not None}
        if scales:
            state["loss_scale"] = scales
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for net, saved in state.get("loss_scale", {}).items():
            if net in self._engines:
                load_loss_scale_state(self._engines[net].optimizer, saved)

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class _EngineHandle(PhaseHandle):
    """The trained network through its engine (the raw module for double-backward phases: the
    engine's hooks would reduce gradients inside `autograd.grad`), the frozen one raw."""

    def __init__(self, backend: DeepSpeedBackend, phase: Phase):
        net, other = phase.net, ("D" if phase.net == "G" else "G")
        engine = backend._engines[net]
        mine = engine.module if phase.double_backward else engine
        fns = {net: backend.cast_inputs(mine), other: backend.cast_inputs(backend._engines[other].module)}
        super().__init__(backend, phase, fns["G"], fns["D"])
        self._engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss, scale_wrt_gas=False)

    def _syncs_by_hand(self) -> bool:
        # fp32 ZeRO-0: the engines' own all-reduce is off (see setup), so every phase reduces here.
        return self.backend._own_sync

    def _sync_and_norm(self, measure: bool) -> torch.Tensor | None:
        if not self.backend._own_sync:
            return None  # DeepSpeed reduces and clips inside engine.step
        if self._reducer is not None:
            self._reducer.finish()  # the buckets went out during the last micro-batch's backward
        return self._norm(measure)

    def step(self, measure: bool) -> StepReport:
        norm = self._sync_and_norm(measure)
        self._engine.step()
        skipped = not self._engine.was_step_applied()
        self.backend.skipped_steps += int(skipped)
        if norm is None and measure:
            value = self._engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if value is None else value, dtype=torch.float32, device=self.backend.device)
        return StepReport(norm, skipped)

    def discard(self) -> None:
        if self._reducer is not None:
            self._reducer.cancel()
        if hasattr(self._engine.optimizer, "zero_grad"):
            self._engine.optimizer.zero_grad()
        self._engine.zero_grad()
