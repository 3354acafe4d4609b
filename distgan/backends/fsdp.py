"""FSDP backend (`dist.fsdp=true`): G and D each sharded with PyTorch's FSDP2 (`fully_shard`).

Parameters, gradients and Adam state are split across ranks; a network's full weights exist
only while its forward/backward runs. Built on `fully_shard` directly rather than through
accelerate's FSDP plugin, because the plugin (a) takes one model per `prepare` under FSDP2 and
(b) is ignored on CPU (accelerate falls back to DDP there), whereas `fully_shard` runs on CPU
(gloo) as on GPUs (NCCL), so the same code is tested on both. Accelerate still creates the
process group and picks the device.

What differs from DDP:
* both networks are always called through their sharded module, also the frozen one (a raw
  call would see only this rank's shard); requires_grad off keeps the frozen one from
  reducing gradients;
* the optimizers are rebuilt on the sharded parameters (the trainer made them on the full ones);
* `module(net)` is a full-weight replica refreshed after every step (one all-gather), so EMA,
  sample grids and checkpoints see plain tensors. It costs one extra copy of the weights per
  rank, small next to the sharded Adam state for GAN-sized networks;
* no double backward: FSDP2 frees/reshards parameters that R1 / WGAN-GP need twice
  ("setStorage ... out of bounds"), so those are refused up front (`check_combination`).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from distgan.backends.accelerate import AccelerateBackend
from distgan.backends.base import NETS


class FSDPBackend(AccelerateBackend):
    """Sharded G and D; full-weight replicas for everything outside the training step."""

    def prepare(self, G, D, opt_G, opt_D) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 comes from autocast (as with DDP), not from FSDP's param_dtype: a bf16 policy
        # would cast BatchNorm's weights but not its fp32 running statistics, which batch_norm
        # rejects. The price is fp32 all-gathers (twice the bytes of bf16 ones).
        policy = MixedPrecisionPolicy()
        self._replica, self._sharded, self._opts = {}, {}, {}
        for net, model, opt in (("G", G, opt_G), ("D", D, opt_D)):
            self._replica[net] = copy.deepcopy(model)
            fully_shard(model, mp_policy=policy)
            # The trainer's optimizer holds the pre-shard parameters: same class and settings,
            # new (sharded) parameters.
            self._opts[net] = type(opt)(model.parameters(), **opt.defaults)
            self._sharded[net] = model

    def module(self, net: str) -> nn.Module:
        return self._replica[net]

    def optimizer(self, net: str) -> torch.optim.Optimizer:
        return self._opts[net]

    @contextlib.contextmanager
    def phase(self, trained: str) -> Iterator[None]:
        other = "D" if trained == "G" else "G"
        for module in self._sharded.values():
            # The root module stays unsharded after a forward; requires_grad must be set on the
            # sharded parameters, which FSDP copies onto the unsharded ones at each all-gather.
            module.reshard()
        self._sharded[other].requires_grad_(False)
        self._sharded[trained].requires_grad_(True)
        try:
            yield
        finally:
            self._sharded[other].requires_grad_(True)

    def forward_fns(self, trained: str, manual_sync: bool) -> dict[str, Callable]:
        return {net: self._sharded[net] for net in NETS}

    @contextlib.contextmanager
    def no_sync(self, net: str) -> Iterator[None]:
        module = self._sharded[net]
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor, net: str) -> None:
        loss.backward()

    def step(self, net: str, clip: float, manual_sync: bool, measure: bool = True) -> tuple[torch.Tensor | None, bool]:
        opt = self._opts[net]
        params = [p for p in self._sharded[net].parameters() if p.grad is not None]
        norm = None
        if measure or clip > 0:  # a collective over the shards: every rank gets the same `measure`
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
            norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._refresh(net)
        return norm, False

    @torch.no_grad()
    def _refresh(self, net: str, params: bool = True) -> None:
        """Copy the sharded weights into the replica (a collective: one all-gather per tensor)."""
        replica = dict(self._replica[net].named_parameters())
        for name, p in self._sharded[net].named_parameters() if params else ():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            replica[name].copy_(full)
        replica_buffers = dict(self._replica[net].named_buffers())
        for name, b in self._sharded[net].named_buffers():
            replica_buffers[name].copy_(b)

    def broadcast_buffers(self, net: str) -> None:
        if self.world_size > 1:
            for buf in self._sharded[net].buffers():  # FSDP replicates buffers; rank 0's win
                torch.distributed.broadcast(buf, src=0)
        self._refresh(net, params=False)  # the parameters were refreshed by step()

    # -- state: full (unsharded) optimizer state, so a checkpoint loads at any world size
    def save_optimizers(self, folder) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        for net in NETS:
            state = get_optimizer_state_dict(self._sharded[net], self._opts[net], options=options)  # collective
            if self.is_main:
                torch.save(state, Path(folder) / f"optim_{net}.pt")

    def load_optimizers(self, folder) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        for net in NETS:
            # The checkpointer has just loaded the full weights into the replica: shard them in.
            set_model_state_dict(self._sharded[net], self._replica[net].state_dict(), options=options)
            state = torch.load(Path(folder) / f"optim_{net}.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self._sharded[net], self._opts[net], state, options=options)
