"""The one interface the trainer drives; it never asks which backend is underneath.

A GAN breaks the usual one-model assumptions of DDP/FSDP/DeepSpeed in three places, and the
interface names each of them instead of hiding them:

* two networks with two optimizers, trained in alternating phases (`backward(loss, net)`,
  `step(net)` take the network's name, "G" or "D");
* the G phase runs *through* D without training it: `forward_fns(...)` hands out the frozen
  raw module for the network not being trained, so no gradient sync is triggered for it;
* R1 / gradient penalties need a double backward, which DDP's reducer does not support
  reliably [pytorch #47562]: a phase marked `manual_sync` calls the raw module and the backend
  all-reduces the gradients itself right before the step (as stylegan3 does).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import Callable, Iterator

import torch
from torch import nn

NETS = ("G", "D")


def env_flag(name: str) -> bool:
    """An accelerate-style boolean environment variable ("1", "true", "yes")."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def use_cpu() -> bool:
    """Train on the CPU: no GPU here, or `ACCELERATE_USE_CPU=1` on a machine that has one."""
    return env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def resolve_precision(cfg) -> str:
    """`dist.mixed_precision`, else what `accelerate launch --mixed_precision` was given, else "no"."""
    return cfg.dist.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


class Backend(ABC):
    """Wraps G, D and their optimizers for one distributed/mixed-precision setup."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mixed_precision: str = "no"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup
    @abstractmethod
    def prepare(self, G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer) -> None:
        """Wrap both networks and both optimizers (called once, on every rank)."""

    @abstractmethod
    def module(self, net: str) -> nn.Module:
        """The plain nn.Module of `net` (no DDP/engine wrapper), for EMA, sampling and saving."""

    @abstractmethod
    def optimizer(self, net: str) -> torch.optim.Optimizer:
        """The torch optimizer of `net` (unwrapped), for learning rates and state."""

    # -- one phase
    @abstractmethod
    def forward_fns(self, trained: str, manual_sync: bool) -> dict[str, Callable[..., torch.Tensor]]:
        """Callables for "G" and "D" during a phase that trains `trained`."""

    @contextlib.contextmanager
    def phase(self, trained: str) -> Iterator[None]:
        """Only `trained` requires grad inside; the other network is frozen (no grads, no sync)."""
        other = self.module("D" if trained == "G" else "G")
        mine = self.module(trained)
        other.requires_grad_(False)
        mine.requires_grad_(True)
        try:
            yield
        finally:
            other.requires_grad_(True)

    def no_sync(self, net: str) -> contextlib.AbstractContextManager:
        """Skip gradient all-reduce for this backward (accumulation micro-steps)."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, net: str) -> None:
        """Backpropagate `loss` into `net`'s gradients (scaled when fp16)."""

    @abstractmethod
    def step(self, net: str, clip: float, manual_sync: bool, measure: bool = True) -> tuple[torch.Tensor | None, bool]:
        """All-reduce if `manual_sync`, unscale, clip (0 = no clipping), step, zero grads.

        Returns the gradient norm before clipping (a device tensor: no host sync; None when
        neither `measure` nor clipping asked for it) and whether the optimizer skipped the step
        (fp16 overflow).
        """

    def zero_grad(self, net: str) -> None:
        """Drop `net`'s accumulated gradients without stepping (a skipped non-finite update)."""
        self.optimizer(net).zero_grad(set_to_none=True)

    # -- collectives (every rank calls them; never wrap them in a rank check)
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def broadcast_buffers(self, net: str) -> None:
        """Make BatchNorm running statistics identical on every rank (rank 0's win, as in DDP)."""
        if self.world_size > 1:
            # One flat broadcast per dtype instead of one round trip per buffer.
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for buf in self.module(net).buffers():
                by_dtype.setdefault(buf.dtype, []).append(buf)
            for group in by_dtype.values():
                flat = torch.cat([b.reshape(-1) for b in group])
                torch.distributed.broadcast(flat, src=0)
                _unflatten_into(flat, group)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def manual_all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients across ranks with one flat all-reduce (double-backward phases)."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # One flat buffer per dtype: a single all-reduce instead of one per tensor.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            _unflatten_into(flat, group)

    # -- state
    def save_optimizers(self, folder) -> None:
        """Write optimizer state into a checkpoint folder (replicated state: the main rank writes)."""
        if self.is_main:
            for net in NETS:
                torch.save(self.optimizer(net).state_dict(), f"{folder}/optim_{net}.pt")

    def load_optimizers(self, folder) -> None:
        for net in NETS:
            # "cpu" rather than the device: torch cannot map to "cpu:0"; load_state_dict moves state to the params.
            # weights_only: a checkpoint never executes pickled code when loaded.
            state = torch.load(f"{folder}/optim_{net}.pt", map_location="cpu", weights_only=True)
            self.optimizer(net).load_state_dict(state)

    @abstractmethod
    def state_dict_extra(self) -> dict[str, torch.Tensor | float | int]:
        """Backend state beyond weights/optimizers (e.g. the grad scaler)."""

    @abstractmethod
    def load_state_dict_extra(self, state: dict) -> None: ...

    def close(self) -> None:
        """Tear down the process group (all ranks)."""


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
