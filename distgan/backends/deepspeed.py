"""DeepSpeed backend: one engine per network (ZeRO stage 0, 1 or 2), fp32, bf16 or fp16
(fp16 on GPUs only, with DeepSpeed's own loss scaler; untested here, no GPU was available).

The route DeepSpeed's GAN tutorial takes, with what was found to work on this stack:

* each network gets its own engine, built from the torch Adam the trainer made (a config
  optimizer "Adam" would JIT-compile fused_adam for a minute);
* the network a phase trains is called through its engine; the frozen one through its raw
  module (`engine.module`) with requires_grad off. Calling the frozen D through its engine
  fails at ZeRO 0 ("use engine.backward") and at ZeRO 2 ("Gradient computed twice");
* double-backward phases (R1, WGAN-GP) call the trained network's raw module too: the engine's
  forward hooks would reduce gradients inside `autograd.grad(create_graph=True)`. Its
  `engine.backward` still reduces the parameter gradients;
* gradient accumulation: `managed_gradient_accumulation=false` makes every `backward` only
  accumulate and the one `step` the boundary, which is exactly the trainer's schedule (it
  already divides the loss by the number of micro-steps, hence `scale_wrt_gas=False`);
* bf16: the engines hold bf16 weights (fp32 master copies inside the optimizer); floating inputs
  are cast to bf16 on the way in;
* checkpoints: each engine saves its own (partitioned) optimizer state with
  `save_checkpoint`, a collective, into `<checkpoint>/ds_G` and `ds_D`.

ZeRO-3 is refused (`check_combination`): its partitioned parameters cannot be used through
the raw module of the frozen network.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from distgan.backends.base import NETS, Backend, resolve_precision, use_cpu
from distgan.config import Config, ConfigError
from distgan.distributed import WorldSizeError, discover, export_env


DS_TAG = "state"


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
    if bf16:
        # BatchNorm wants its running statistics in the weights' dtype (DeepSpeed keeps buffers fp32).
        ours["data_types"] = {"buffer_dtype": "bf16"}
    base = user_config(cfg)
    if stage > 0:
        zero = base.get("zero_optimization", {})
        # Overlapping the reduction with the backward only pays on GPUs (side streams).
        ours["zero_optimization"].update({"overlap_comm": False if cpu else zero.get("overlap_comm", True),
                                          "contiguous_gradients": zero.get("contiguous_gradients", True)})
    return _merge(base, ours)


class DeepSpeedBackend(Backend):
    def __init__(self, cfg: Config):
        self.cfg = cfg
        info = export_env(discover(), single_free_port=True)  # deepspeed always opens a process group
        cpu = use_cpu()
        self.mixed_precision = resolve_precision(cfg)
        if cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is imported
        import deepspeed  # imported here: 1-2 s, and only this backend needs it

        _skip_shm_comm_op()
        self.local_rank = info.local_rank
        if cpu:
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)  # before NCCL starts, so each rank uses its own GPU
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if info.world_size != self.world_size:
            raise WorldSizeError(f"the launcher announced {info.world_size} processes, the process group has {self.world_size}")
        self._bf16 = self.mixed_precision == "bf16"
        self._dtype = torch.bfloat16 if self._bf16 else torch.float16 if self.mixed_precision == "fp16" else None
        self._config = ds_config(cfg, self.world_size, self.mixed_precision, cpu)
        # fp32 stage 0: this backend all-reduces and clips itself, so that it knows the norm.
        self._own_sync = cfg.dist.zero_stage == 0 and self._dtype is None
        self._engines: dict = {}
        self._opts: dict[str, torch.optim.Optimizer] = {}
        self.skipped_steps = 0

    # ------------------------------------------------------------------ setup
    def prepare(self, G, D, opt_G, opt_D) -> None:
        import deepspeed

        for net, model, opt in (("G", G, opt_G), ("D", D, opt_D)):
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=dict(self._config))
            if self._own_sync:
                engine.enable_backward_allreduce = False
            self._engines[net], self._opts[net] = engine, opt

    def module(self, net: str) -> nn.Module:
        return self._engines[net].module

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net]

    # ------------------------------------------------------------------ one phase
    def _cast(self, fn: Callable) -> Callable:
        """Floating inputs to the engines' dtype (DeepSpeed casts the weights, not the inputs)."""
        if self._dtype is None:
            return fn
        dtype = self._dtype

        def call(*args, **kwargs):
            args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            return fn(*args, **kwargs)

        return call

    def forward_fns(self, trained: str, manual_sync: bool) -> dict[str, Callable]:
        other = "D" if trained == "G" else "G"
        mine = self._engines[trained].module if manual_sync else self._engines[trained]
        return {trained: self._cast(mine), other: self._cast(self._engines[other].module)}

    def autocast(self):
        # Only sampling/evaluation use this with the engines' reduced-precision weights and
        # fp32 inputs; training casts inputs itself (see _cast).
        if self._dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self._dtype)

    def backward(self, loss: torch.Tensor, net: str) -> None:
        self._engines[net].backward(loss, scale_wrt_gas=False)

    def step(self, net: str, clip: float, manual_sync: bool, measure: bool = True) -> tuple[torch.Tensor | None, bool]:
        engine = self._engines[net]
        norm = None
        if self._own_sync:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            self.manual_all_reduce_grads(params)
            if measure or clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True).detach()
        engine.step()
        skipped = not engine.was_step_applied()
        self.skipped_steps += int(skipped)
        if norm is None and measure:
            value = engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if value is None else value, dtype=torch.float32, device=self.device)
        return norm, skipped

    def zero_grad(self, net: str) -> None:
        engine = self._engines[net]
        if hasattr(engine.optimizer, "zero_grad"):
            engine.optimizer.zero_grad()
        engine.zero_grad()

    # ------------------------------------------------------------------ state
    def save_optimizers(self, folder) -> None:
        """Each engine writes its own checkpoint (a collective: every rank writes its partition)."""
        for net in NETS:
            self._engines[net].save_checkpoint(str(Path(folder) / f"ds_{net}"), tag=DS_TAG, save_latest=False)

    def load_optimizers(self, folder) -> None:
        for net in NETS:
            path = Path(folder) / f"ds_{net}"
            if not (path / DS_TAG).is_dir():
                raise ConfigError(f"{folder} has no DeepSpeed state for {net} ({path / DS_TAG}): it was not written by "
                                  "dist.backend=deepspeed. Resume it with the backend that wrote it.")
            loaded, _ = self._engines[net].load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                            load_lr_scheduler_states=False)
            if loaded is None:
                raise ConfigError(f"DeepSpeed could not load {path / DS_TAG} (written with another world size or ZeRO stage?)")

    def state_dict_extra(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict_extra(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
