"""Accelerate backend: single device, DDP (CPU gloo or GPU NCCL), mixed precision, torch.compile.

`prepare(G, D, opt_G, opt_D)` gives each network its own DDP wrapper and one shared GradScaler
for fp16. Gradient accumulation is done by the trainer with `no_sync` on the micro-steps, so the
Accelerator runs with gradient_accumulation_steps=1 and every `optimizer.step()` really steps.

Who syncs what:
* the trained network's main phase goes through its DDP wrapper (bucketed all-reduce that
  overlaps the backward);
* the frozen network is always called raw (no DDP forward, no reducer, no sync);
* a `manual_sync` phase (R1, WGAN-GP: double backward, which DDP's reducer does not support)
  calls the raw module and `step` averages its gradients with one flat all-reduce.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable

import torch
from torch import nn

from distgan.backends.base import NETS, Backend, resolve_precision, use_cpu
from distgan.config import Config
from distgan.distributed import WorldSizeError, discover, export_env



class AccelerateBackend(Backend):
    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        info = discover()
        if info.source in ("slurm", "mpi"):
            export_env(info)  # srun/mpirun with one task per process: speak torchrun's variables
        self.cfg = cfg
        self._accelerator = Accelerator(
            mixed_precision=resolve_precision(cfg),
            cpu=use_cpu(),
            kwargs_handlers=[
                # A dead or hung rank makes the others fail at their next collective after this
                # long, instead of waiting forever (the default is 10-30 minutes).
                InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)),
                # D is frozen during the G phase, so its wrapper never sees unused parameters.
                # Buffers (G's BatchNorm statistics) are broadcast once per iteration by the
                # trainer (`broadcast_buffers`), not at every DDP forward.
                DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False),
            ],
        )
        acc = self._accelerator
        self.rank, self.world_size, self.local_rank = acc.process_index, acc.num_processes, acc.local_process_index
        if info.world_size > 1 and self.world_size == 1:
            # e.g. `accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU=1:
            # every process would be "rank 0" and train alone on all the data.
            raise WorldSizeError(f"the launcher started {info.world_size} processes (WORLD_SIZE) but this one joined no "
                                 "process group. Without GPUs set ACCELERATE_USE_CPU=1 (see launch/README.md).")
        self.device = acc.device
        self.mixed_precision = str(acc.mixed_precision)
        self._wrapped: dict[str, nn.Module] = {}
        self._plain: dict[str, nn.Module] = {}
        self._compiled: dict[str, Callable] = {}
        self._compiled_raw: dict[str, Callable] = {}
        self._opts: dict = {}
        self.skipped_steps = 0

    def prepare(self, G, D, opt_G, opt_D) -> None:
        self._plain = {"G": G, "D": D}
        G_w, D_w, opt_G, opt_D = self._accelerator.prepare(G, D, opt_G, opt_D)
        self._wrapped = {"G": G_w, "D": D_w}
        self._opts = {"G": opt_G, "D": opt_D}
        for net in NETS:
            if self.cfg.dist.compile:
                # Compile the DDP wrapper (DDPOptimizer splits graphs at bucket boundaries) and
                # the raw module (frozen-network calls) separately; both share the parameters,
                # and `module()` keeps returning the plain module: no `_orig_mod.` in names.
                # DISTGAN_COMPILE_BACKEND=aot_eager traces without generating code (debugging, tests).
                backend = os.environ.get("DISTGAN_COMPILE_BACKEND", "inductor")
                self._compiled[net] = torch.compile(self._wrapped[net], backend=backend)
                self._compiled_raw[net] = torch.compile(self._plain[net], backend=backend)
            else:
                self._compiled[net], self._compiled_raw[net] = self._wrapped[net], self._plain[net]

    def module(self, net: str) -> nn.Module:
        return self._plain[net]

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net].optimizer

    def forward_fns(self, trained: str, manual_sync: bool) -> dict[str, Callable]:
        other = "D" if trained == "G" else "G"
        # A double-backward phase uses the eager raw module: neither DDP's reducer nor
        # torch.compile (AOTAutograd) supports create_graph=True backward.
        mine = self._plain[trained] if manual_sync else self._compiled[trained]
        return {trained: mine, other: self._compiled_raw[other]}

    def no_sync(self, net: str):
        wrapped = self._wrapped[net]
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    def autocast(self):
        return self._accelerator.autocast()

    def backward(self, loss: torch.Tensor, net: str) -> None:
        self._accelerator.backward(loss)

    def step(self, net: str, clip: float, manual_sync: bool, measure: bool = True) -> tuple[torch.Tensor | None, bool]:
        opt = self._opts[net]
        params = [p for p in self._plain[net].parameters() if p.grad is not None]
        if manual_sync:
            self.manual_all_reduce_grads(params)
        scaler = self._accelerator.scaler
        if scaler is not None:
            # fp16: one GradScaler for both optimizers. Unscale exactly this optimizer, exactly
            # once, right before its step; AcceleratedOptimizer.step then calls scaler.step
            # (skips on inf/NaN) and scaler.update, so each phase is its own scaler iteration.
            scaler.unscale_(opt.optimizer)
        norm = None
        if measure or clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True).detach()
        if scaler is None:
            # AcceleratedOptimizer.step only adds work here (it re-checks optional packages on
            # every call, ~0.5 ms): with no scaler and no accumulation it is the plain step.
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        skipped = bool(scaler is not None and opt.step_was_skipped)
        self.skipped_steps += int(skipped)
        return norm, skipped

    def zero_grad(self, net: str) -> None:
        self._opts[net].zero_grad(set_to_none=True)

    def state_dict_extra(self) -> dict:
        scaler = self._accelerator.scaler
        state = {"skipped_steps": self.skipped_steps}
        if scaler is not None:
            state["scaler"] = dict(scaler.state_dict())
        return state

    def load_state_dict_extra(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self._accelerator.scaler is not None and "scaler" in state:
            self._accelerator.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        self._accelerator.end_training()
