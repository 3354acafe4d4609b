"""Accelerate backend: single device, DDP (CPU gloo or GPU NCCL), mixed precision.

`prepare(G, D, opt_G, opt_D)` gives each network its own DDP wrapper and one shared GradScaler
for fp16. Gradient accumulation is done by the trainer with `no_sync` on the micro-steps, so the
Accelerator runs with gradient_accumulation_steps=1 and every `optimizer.step()` really steps.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable

import torch
from torch import nn

from distgan.backends.base import Backend
from distgan.config import Config, ConfigError


class AccelerateBackend(Backend):
    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        precision = cfg.dist.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        self._accelerator = Accelerator(
            mixed_precision=precision,
            cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available(),
            kwargs_handlers=[
                # A dead rank makes the others fail at their next collective after this long,
                # instead of hanging forever (the default is 10-30 minutes).
                InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)),
                # D is frozen during the G phase, so its wrapper never sees unused parameters.
                DistributedDataParallelKwargs(find_unused_parameters=False),
            ],
        )
        acc = self._accelerator
        self.rank, self.world_size, self.local_rank = acc.process_index, acc.num_processes, acc.local_process_index
        self.device = acc.device
        self.mixed_precision = str(acc.mixed_precision)
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("dist.mixed_precision=fp16 is not supported on CPU; use bf16 or no.")
        self._wrapped: dict[str, nn.Module] = {}
        self._opts: dict = {}
        self.skipped_steps = 0

    @property
    def accelerator(self):
        return self._accelerator

    def prepare(self, G, D, opt_G, opt_D) -> None:
        G, D, opt_G, opt_D = self._accelerator.prepare(G, D, opt_G, opt_D)
        self._wrapped = {"G": G, "D": D}
        self._opts = {"G": opt_G, "D": opt_D}

    def module(self, net: str) -> nn.Module:
        return self._accelerator.unwrap_model(self._wrapped[net])

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net].optimizer

    def forward_fns(self, trained: str, manual_sync: bool) -> dict[str, Callable]:
        # The trained network goes through its DDP wrapper unless this phase syncs by hand
        # (double backward); the frozen one is always called raw so DDP never sees it.
        fns = {net: self.module(net) for net in ("G", "D")}
        if not manual_sync:
            fns[trained] = self._wrapped[trained]
        return fns

    def no_sync(self, net: str):
        wrapped = self._wrapped[net]
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    def autocast(self):
        return self._accelerator.autocast()

    def backward(self, loss: torch.Tensor, net: str) -> None:
        self._accelerator.backward(loss)

    def step(self, net: str, clip: float, manual_sync: bool) -> tuple[torch.Tensor, bool]:
        opt = self._opts[net]
        params = [p for p in self.module(net).parameters() if p.grad is not None]
        if manual_sync:
            self.manual_all_reduce_grads(params)
        scaler = self._accelerator.scaler
        if scaler is not None:
            # Unscale exactly this optimizer, exactly once, right before its step.
            scaler.unscale_(opt.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        skipped = bool(scaler is not None and opt.step_was_skipped)
        self.skipped_steps += int(skipped)
        return norm.detach(), skipped

    def state_dict_extra(self) -> dict:
        scaler = self._accelerator.scaler
        state = {"skipped_steps": self.skipped_steps}
        if scaler is not None:
            state["scaler"] = {k: v for k, v in scaler.state_dict().items()}
        return state

    def load_state_dict_extra(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self._accelerator.scaler is not None and "scaler" in state:
            self._accelerator.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        self._accelerator.end_training()
