"""FSDP backend (`dist.fsdp=true`): G and D each sharded with PyTorch's FSDP2 (`fully_shard`).

Parameters, gradients and Adam state are split across ranks; a network's full weights exist
only while its forward/backward runs. Built on `fully_shard` directly rather than through
accelerate's FSDP plugin, because the plugin (a) takes one model per `prepare` under FSDP2 and
(b) is ignored on CPU (accelerate falls back to DDP there), whereas `fully_shard` runs on CPU
(gloo) as on GPUs (NCCL), so the same code is tested on both. Accelerate still creates the
process group and picks the device (`start_accelerator`, shared with the DDP backend).

What differs from DDP:
* both networks are always called through their sharded module, also the frozen one (a raw
  call would see only this rank's shard); requires_grad off keeps the frozen one from
  reducing gradients;
* the optimizers are built on the sharded parameters;
* `module(net)` is a full-weight replica refreshed after every step (one all-gather per dtype), so EMA,
  sample grids and checkpoints see plain tensors. It costs one extra copy of the weights per
  rank, small next to the sharded Adam state for GAN-sized networks;
* no double backward: FSDP2 frees/reshards parameters that R1 / WGAN-GP need twice
  ("setStorage ... out of bounds"), so those are refused up front (`check_combination`).
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distgan.backends.accelerate import start_accelerator
from distgan.backends.base import AdamSpec, Backend, FullOptimizerState, PhaseHandle, StepReport
from distgan.config import Config
from distgan.device import to_memory_format
from distgan.gan.phases import Phase


class FSDPBackend(Backend):
    """Sharded G and D; full-weight replicas for everything outside the training step."""

    def __init__(self, cfg: Config):
        super().__init__()
        self._accelerator = acc = start_accelerator(cfg)
        self.rank, self.world_size, self.local_rank = acc.process_index, acc.num_processes, acc.local_process_index
        self.device = acc.device
        if not torch.distributed.is_initialized():
            # One process without a launcher: accelerate starts no process group, but fully_shard
            # needs one for its device mesh (it would look for RANK and fail). A one-rank group
            # on an in-process store: no port, nothing to rendezvous with.
            torch.distributed.init_process_group("gloo" if self.device.type == "cpu" else "cpu:gloo,cuda:nccl",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
        self.mixed_precision = str(acc.mixed_precision)
        self.grad_clip = cfg.optim.grad_clip
        self._channels_last = cfg.dist.channels_last
        self.optimizer_state = _ShardedOptimizerState(self)
        self._replica: dict[str, nn.Module] = {}
        self._sharded: dict[str, nn.Module] = {}
        self._opts: dict[str, torch.optim.Optimizer] = {}

    def setup(self, G, D, optim: dict[str, AdamSpec]) -> None:
        # bf16 comes from autocast (as with DDP), not from FSDP's param_dtype: a bf16 policy
        # would cast BatchNorm's weights but not its fp32 running statistics, which batch_norm
        # rejects. The price is fp32 all-gathers (twice the bytes of bf16 ones).
        policy = MixedPrecisionPolicy()
        for net, model in (("G", G.to(self.device)), ("D", D.to(self.device))):
            to_memory_format(model, self._channels_last)
            self._replica[net] = copy.deepcopy(model)
            fully_shard(model, mp_policy=policy)
            self._opts[net] = optim[net].build(model.parameters())
            self._sharded[net] = model

    def module(self, net: str) -> nn.Module:
        return self._replica[net]

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net]

    def autocast(self):
        return self._accelerator.autocast()

    def _make_handle(self, phase: Phase) -> PhaseHandle:
        return _FSDPHandle(self, phase)

    def _frozen_modules(self) -> dict[str, nn.Module]:
        return self._sharded

    def train_only(self, net: str) -> None:
        for module in self._sharded.values():
            # The root module stays unsharded after a forward; requires_grad must be set on the
            # sharded parameters, which FSDP copies onto the unsharded ones at each all-gather.
            module.reshard()
        self._trainable = None  # always switch: the reshard above may have reset it
        super().train_only(net)

    @torch.no_grad()
    def refresh(self, net: str, params: bool = True) -> None:
        """Copy the sharded weights into the replica (a collective: one all-gather per dtype)."""
        if params:
            replica = dict(self._replica[net].named_parameters())
            _gather_into([(replica[name], p) for name, p in self._sharded[net].named_parameters()])
        replica_buffers = dict(self._replica[net].named_buffers())
        for name, b in self._sharded[net].named_buffers():
            replica_buffers[name].copy_(b)

    def broadcast_buffers(self, net: str) -> None:
        if self.world_size > 1:
            for buf in self._sharded[net].buffers():  # FSDP replicates buffers; rank 0's win
                torch.distributed.broadcast(buf, src=0)
        self.refresh(net, params=False)  # the parameters were refreshed by the step

    def close(self) -> None:
        self._accelerator.end_training()


@torch.no_grad()
def _gather_into(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each sharded parameter whole into its replica tensor, with ONE all-gather per dtype
    instead of one per tensor (a GAN has hundreds of small tensors: per-tensor collectives are
    latency-bound).

    FSDP2 shards dim 0 like `torch.chunk`: rank r holds rows [r * c, (r + 1) * c) of each tensor,
    c = ceil(rows / world), the last ranks fewer or none. Each rank packs its shards into a buffer
    with c rows reserved per tensor (so every rank's buffer has the same layout), all ranks gather
    the buffers, and each tensor is read back as its ranks' blocks in order, cut to its rows.
    Anything not sharded that way (a plain tensor, another placement) takes `full_tensor()`."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, p in pairs:
        placements = getattr(p, "placements", None)
        if placements is not None and len(placements) == 1 and getattr(placements[0], "dim", None) == 0 and p.dim() > 0:
            groups.setdefault((p.dtype, p.device_mesh), []).append((dst, p))
        else:
            dst.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
    for (dtype, mesh), group in groups.items():
        world = mesh.size()
        rows = [-(-p.shape[0] // world) for _, p in group]  # rows reserved per rank
        sizes = [r * (p.numel() // p.shape[0]) for r, (_, p) in zip(rows, group)]
        local = torch.zeros(sum(sizes), dtype=dtype, device=group[0][1].to_local().device)
        offset = 0
        for size, (_, p) in zip(sizes, group):
            shard = p.to_local().reshape(-1)
            local[offset:offset + shard.numel()] = shard
            offset += size
        gathered = torch.empty(world * local.numel(), dtype=dtype, device=local.device)
        torch.distributed.all_gather_into_tensor(gathered, local, group=mesh.get_group())
        gathered = gathered.view(world, -1)
        offset = 0
        for r, size, (dst, p) in zip(rows, sizes, group):
            block = gathered[:, offset:offset + size].reshape(world * r, *p.shape[1:])
            dst.copy_(block[:p.shape[0]])
            offset += size


class _FSDPHandle(PhaseHandle):
    """Both networks run through their sharded modules (a raw call would see one shard only);
    requires_grad off keeps the frozen one from reducing gradients."""

    def __init__(self, backend: FSDPBackend, phase: Phase):
        super().__init__(backend, phase, backend._sharded["G"], backend._sharded["D"])
        self._sharded = backend._sharded[phase.net]
        # The parameters the optimizer steps (the sharded DTensors that receive the gradients), not
        # `self._sharded.parameters()`: a handle made while the root module is still unsharded
        # after a forward (G, once D's phases ran it) would list the unsharded tensors, which
        # never get a .grad, and report (and clip to) a gradient norm of 0.
        self.params = [p for group in backend.optimizer(phase.net).param_groups for p in group["params"]]

    def micro_batch(self, last: bool):
        return _GradientSync(self._sharded, last)

    def step(self, measure: bool) -> StepReport:
        norm = self._norm(measure)  # a collective over the shards: every rank gets the same `measure`
        if norm is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt = self.backend.optimizer(self.net)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.backend.refresh(self.net)
        return StepReport(norm, False)


class _GradientSync:
    """Turn FSDP's gradient reduction off for a micro-batch that is not the last."""

    def __init__(self, module: nn.Module, enabled: bool):
        self.module, self.enabled = module, enabled

    def __enter__(self) -> None:
        if not self.enabled:
            self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            self.module.set_requires_gradient_sync(True)


class _ShardedOptimizerState(FullOptimizerState):
    """The common full-state format (`base.FullOptimizerState`): torch gathers the sharded Adam
    state for saving and re-shards a loaded one for this world size."""

    def _model(self, net: str) -> nn.Module:
        return self.backend._sharded[net]

    def _weights_loaded(self, net: str) -> None:
        # The checkpointer has just loaded the full weights into the replica: shard them in.
        b = self.backend
        set_model_state_dict(b._sharded[net], b._replica[net].state_dict(), options=StateDictOptions(full_state_dict=True))
