"""Accelerate backend: single device, DDP (CPU gloo or GPU NCCL), mixed precision, torch.compile.

`setup(G, D, optim)` builds both optimizers and gives each network its own DDP wrapper and one
shared GradScaler for fp16. Gradient accumulation is done by the trainer with `no_sync` on the micro-steps, so the
Accelerator runs with gradient_accumulation_steps=1 and every `optimizer.step()` really steps.

Who syncs what:
* the trained network's main phase goes through its DDP wrapper (bucketed all-reduce that
  overlaps the backward);
* the frozen network is always called raw (no DDP forward, no reducer, no sync);
* a `double_backward` phase (R1, WGAN-GP: DDP's reducer does not support it) calls the raw
  module (its own forward, without Accelerate's autocast/fp32-output wrapper), and its handle
  averages the gradients itself: bucketed all-reduces launched from gradient hooks during the
  last micro-batch's backward (`backends/grad_buckets.py`), waited for at the step.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn

from distgan.backends.base import NETS, AdamSpec, Backend, PhaseHandle, StepReport, resolve_precision, use_cpu
from distgan.config import Config
from distgan.device import apply_numerics, placement, to_memory_format
from distgan.distributed import discover, export_env
from distgan.errors import WorldSizeError
from distgan.gan.phases import Phase


def start_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator (process group, device, precision) of this process; refuses a launch whose
    processes did not join one group."""
    info = discover()
    if info.source in ("slurm", "mpi"):
        export_env(info)  # srun/mpirun with one task per process: speak torchrun's variables
    # Accelerate takes local_rank % device_count itself (right under per-task GPU binding); the
    # policy is asked first for its refusal of two ranks on one GPU. LOCAL_RANK stays: accelerate
    # reads it as the rank's place on the node.
    placement(use_cpu(), info.local_rank, info.local_world_size,
              0 if use_cpu() else torch.cuda.device_count(), os.environ)
    apply_numerics(cfg.train.deterministic, cfg.dist.cudnn_benchmark)
    acc = Accelerator(
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
    if info.world_size > 1 and acc.num_processes == 1:
        # e.g. `accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU=1:
        # every process would be "rank 0" and train alone on all the data.
        raise WorldSizeError(f"the launcher started {info.world_size} processes (WORLD_SIZE) but this one joined no "
                             "process group. Without GPUs set ACCELERATE_USE_CPU=1 (see launch/README.md).")
    return acc


class AccelerateBackend(Backend):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self._accelerator = acc = start_accelerator(cfg)
        self.rank, self.world_size, self.local_rank = acc.process_index, acc.num_processes, acc.local_process_index
        self.device = acc.device
        self.mixed_precision = str(acc.mixed_precision)
        self.grad_clip = cfg.optim.grad_clip
        self._wrapped: dict[str, nn.Module] = {}
        self._plain: dict[str, nn.Module] = {}
        self._compiled: dict[str, Callable] = {}
        self._compiled_raw: dict[str, Callable] = {}
        self._opts: dict = {}

    def setup(self, G, D, optim: dict[str, AdamSpec]) -> None:
        self._plain = {"G": G, "D": D}
        G, D = (to_memory_format(m, self.cfg.dist.channels_last) for m in (G, D))
        scaled = self.mixed_precision == "fp16"  # Accelerate's GradScaler steps the optimizers
        G_w, D_w, opt_G, opt_D = self._accelerator.prepare(G, D, optim["G"].build(G.parameters(), scaled),
                                                            optim["D"].build(D.parameters(), scaled))
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
        # Without loss scaling, autocast is the only thing Accelerator.autocast adds per call.
        self._autocast = (self._accelerator.autocast if self.mixed_precision != "no" else None)

    def module(self, net: str) -> nn.Module:
        return self._plain[net]

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net].optimizer

    def autocast(self):
        return self._autocast() if self._autocast is not None else super().autocast()

    def _make_handle(self, phase: Phase) -> PhaseHandle:
        return _AccelerateHandle(self, phase)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._accelerator.scaler is not None:
            state["scaler"] = dict(self._accelerator.scaler.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._accelerator.scaler is not None and "scaler" in state:
            self._accelerator.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        self._accelerator.end_training()


class _AccelerateHandle(PhaseHandle):
    """Single device or DDP, with one GradScaler shared by both optimizers in fp16."""

    def __init__(self, backend: AccelerateBackend, phase: Phase):
        net, other = phase.net, ("D" if phase.net == "G" else "G")
        # A double-backward phase uses the eager raw module: neither DDP's reducer nor
        # torch.compile (AOTAutograd) supports create_graph=True backward.
        mine = self._unwrapped(backend._plain[net]) if phase.double_backward else backend._compiled[net]
        fns = {net: mine, other: backend._compiled_raw[other]}
        super().__init__(backend, phase, fns["G"], fns["D"])
        wrapped = backend._wrapped[net]
        self._no_sync = wrapped.no_sync if hasattr(wrapped, "no_sync") and not phase.double_backward else None
        self._opt = backend._opts[net]
        self._scaler = backend._accelerator.scaler

    @staticmethod
    def _unwrapped(module: nn.Module) -> Callable:
        """The module's own forward, without what `Accelerator.prepare` put around it under mixed
        precision (autocast + `convert_outputs_to_fp32`). A double-backward phase differentiates
        with respect to outputs (StyleGAN2's path length takes `autograd.grad(images, ws)`): the
        converted outputs are `.float()` copies outside the graph of the images. The objective
        runs every call under the handle's `autocast()` already, so nothing else changes."""
        return getattr(module, "_original_forward", module)

    def micro_batch(self, last: bool):
        return self._no_sync() if self._no_sync is not None and not last else super().micro_batch(last)

    def backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def _unscale(self) -> None:
        if self._scaler is not None:
            self._scaler.unscale_(self._opt.optimizer)

    def step(self, measure: bool) -> StepReport:
        if self._scaler is None:
            # AcceleratedOptimizer.step only adds work here (it re-checks optional packages on
            # every call, ~0.5 ms): with no scaler and no accumulation it is the plain step.
            return super().step(measure)
        # fp16: one GradScaler for both optimizers. Unscale exactly this optimizer, exactly once,
        # right before its step; AcceleratedOptimizer.step then calls scaler.step (skips on
        # inf/NaN) and scaler.update, so each phase is its own scaler iteration.
        norm = self._sync_and_norm(measure)
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        skipped = bool(self._opt.step_was_skipped)
        self.backend.skipped_steps += int(skipped)
        return StepReport(norm, skipped)
