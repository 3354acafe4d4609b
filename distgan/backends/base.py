"""The one interface the trainer drives; it never asks which backend is underneath.

A backend wraps G, D and their optimizers for one distributed / mixed-precision setup, and hands
out one `PhaseHandle` per phase of the GAN schedule. The handle owns everything distribution
needs for that phase, so that the trainer and the objective stay single-device code:

* which callables run G and D: the trained network through its wrapper (DDP, engine, FSDP), the
  other one frozen and raw, so that it triggers no gradient sync;
* gradient sync, including the hand all-reduce that a double backward (R1, gradient penalty)
  needs: DDP's reducer does not support `autograd.grad(create_graph=True)` [pytorch #47562], so
  such a phase calls the raw module and the handle averages its gradients itself (as stylegan3
  does), in buckets launched from gradient hooks while the backward runs, as DDP's reducer
  would (`grad_buckets.BucketedGradReducer`);
* `no_sync` for accumulation micro-batches, loss scaling, clipping, the optimizer step, and the
  report of a step that fp16 skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from distgan.backends.grad_buckets import BucketedGradReducer
from distgan.checkpoint.format import read_optimizer, write_optimizer
from distgan.device import adam_kwargs, auto_precision, gpu_capability
from distgan.gan.phases import Phase

NETS = ("G", "D")
log = logging.getLogger("distgan")
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it costs nothing


def env_flag(name: str) -> bool:
    """An accelerate-style boolean environment variable ("1", "true", "yes")."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def use_cpu() -> bool:
    """Train on the CPU: no GPU here, or `ACCELERATE_USE_CPU=1` on a machine that has one."""
    return env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def resolve_precision(cfg, cuda: bool | None = None, capability: tuple[int, int] | None = None) -> str:
    """`dist.mixed_precision`, else what `accelerate launch --mixed_precision` was given, else "no";
    `auto` becomes what `device.auto_precision` picks for this machine (logged once, with why).

    The one place precision is decided: the backends and `check_combination` all ask here, so
    `auto` never reaches an Accelerator or a DeepSpeed config. An explicit `dist.mixed_precision`
    wins over the launcher's (accelerate yaml files cannot say `auto`, so GPU launch configs say
    `mixed_precision: 'no'` and the recipe says `dist.mixed_precision: auto`).
    `cuda` / `capability` default to this machine's (tests pass them)."""
    precision = cfg.dist.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "auto":
        return precision
    cuda = not use_cpu() if cuda is None else cuda
    if cuda and capability is None:
        capability = gpu_capability()
    precision, why = auto_precision(cuda, capability)
    if (precision, why) not in _ANNOUNCED:
        _ANNOUNCED.add((precision, why))
        log.info("dist.mixed_precision=auto -> %s: %s", precision, why)
    return precision


_ANNOUNCED: set[tuple[str, str]] = set()
"""`auto` decisions already logged by this process (it is resolved by several callers)."""


@dataclass(frozen=True)
class AdamSpec:
    """How to build one network's optimizer; the backend builds it, once, on the parameters it
    trains (sharded ones under FSDP)."""

    lr: float
    betas: tuple[float, float]
    impl: str = "auto"
    """`optim.adam_impl`: fused / foreach / loop, or auto (see `device.adam_kwargs`)."""

    def build(self, params, grad_scaler: bool = False) -> torch.optim.Optimizer:
        """`grad_scaler`: a torch GradScaler will step it (see `device.adam_kwargs`)."""
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas,
                                **adam_kwargs(self.impl, cuda=not use_cpu(), grad_scaler=grad_scaler))


@dataclass
class StepReport:
    grad_norm: torch.Tensor | None
    """Gradient norm before clipping, on the device (no host sync); None when not measured."""
    skipped: bool
    """The optimizer skipped this step (fp16 overflow)."""


class PhaseHandle:
    """Distribution for one phase: enter it, run forward/backward per micro-batch, then `step`.

    This base serves a single process with plain modules; backends override what differs.
    """

    def __init__(self, backend: "Backend", phase: Phase, G: Callable, D: Callable):
        self.backend, self.phase, self.net = backend, phase, phase.net
        self.G, self.D = G, D
        """Callables for this phase: the trained network's (wrapped) forward, the other's raw one."""
        self.params = [p for p in backend.module(phase.net).parameters()]
        self.clip = backend.grad_clip
        self.autocast = backend.autocast
        self._reducer = backend.grad_reducer(phase.net, self.params) if self._syncs_by_hand() else None
        """Bucketed all-reduce from gradient hooks, for a phase that averages gradients itself (None
        in a single process)."""

    def _syncs_by_hand(self) -> bool:
        """This phase averages its gradients itself: DDP's reducer cannot run a double backward."""
        return self.phase.double_backward

    def __enter__(self) -> "PhaseHandle":
        self.backend.train_only(self.net)
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: all but the last skip gradient sync (a
        hand-synced phase arms its reducer for the last one: its buckets go out during that backward)."""
        if last and self._reducer is not None:
            self._reducer.arm()
        return _NO_CONTEXT

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _unscale(self) -> None:
        """Undo loss scaling on this network's gradients (fp16 only)."""

    def _sync_and_norm(self, measure: bool) -> torch.Tensor | None:
        """Hand all-reduce (waits for the buckets the backward launched), unscale, then the norm
        (clipping when asked)."""
        if self._reducer is not None:
            self._reducer.finish()
        self._unscale()
        return self._norm(measure)

    def _norm(self, measure: bool) -> torch.Tensor | None:
        """The gradient norm before clipping (clipped in place when `optim.grad_clip` > 0)."""
        if measure or self.clip > 0:
            max_norm = self.clip if self.clip > 0 else float("inf")
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True).detach()
        return None

    def step(self, measure: bool) -> StepReport:
        """Sync, clip, step and zero the trained network's gradients; `measure` asks for the norm."""
        norm = self._sync_and_norm(measure)
        opt = self.backend.optimizer(self.net)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return StepReport(norm, False)

    def discard(self) -> None:
        """Drop the accumulated gradients without stepping (a skipped non-finite update)."""
        if self._reducer is not None:
            self._reducer.cancel()
        self.backend.optimizer(self.net).zero_grad(set_to_none=True)


class FullOptimizerState:
    """Both optimizers in the checkpoint, whole and keyed by parameter name (`optim_<net>.pt`), so
    that a checkpoint of any backend and world size loads under any other.

    torch.distributed.checkpoint's `get_optimizer_state_dict` / `set_optimizer_state_dict` with
    `full_state_dict=True` do the work: a plain copy for replicated parameters (single process,
    DDP), an all-gather and a re-shard for FSDP's sharded ones. Its sharded `.distcp` format was
    not taken: its metadata file is a pickle, and no resume may unpickle code. GAN optimizers are
    small (two Adam moments of networks of tens of millions of parameters), so a full copy on
    the main process costs little. DeepSpeed's ZeRO partitions are gathered by
    `backends/zero_state.py` into the same layout.
    """

    def __init__(self, backend: "Backend"):
        self.backend = backend

    def _model(self, net: str) -> nn.Module:
        """The module whose parameters the optimizer of `net` holds (FSDP: the sharded one)."""
        return self.backend.module(net)

    def save(self, folder: Path) -> None:
        b, options = self.backend, StateDictOptions(full_state_dict=True, cpu_offload=True)
        for net in NETS:
            state = get_optimizer_state_dict(self._model(net), b.optimizer(net), options=options)  # collective if sharded
            if b.is_main:
                write_optimizer(folder, net, state)

    def load(self, folder: Path) -> None:
        b = self.backend
        for net in NETS:
            state = read_optimizer(folder, net)
            # fp32 masters of a DeepSpeed bf16 run: more exact than its bf16 weights file.
            load_fp32_params(b.module(net), state.pop("fp32_params", None))
            self._weights_loaded(net)
            if state["state"] and all(isinstance(k, int) for k in state["state"]):
                b.optimizer(net).load_state_dict(state)  # written by distgan <= 0.x: positional keys
                continue
            set_optimizer_state_dict(self._model(net), b.optimizer(net), state,
                                     options=StateDictOptions(full_state_dict=True))

    def _weights_loaded(self, net: str) -> None:
        """Hook: the full weights of `net` are in `backend.module(net)` (FSDP shards them in here)."""


@torch.no_grad()
def load_fp32_params(module: nn.Module, fp32: dict[str, torch.Tensor] | None) -> None:
    """Copy saved fp32 master weights into `module`'s parameters (nothing when there are none)."""
    if not fp32:
        return
    for name, p in module.named_parameters():
        if name in fp32:
            p.copy_(fp32[name])


class Backend(ABC):
    """Wraps G, D and their optimizers for one distributed/mixed-precision setup."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mixed_precision: str = "no"
    grad_clip: float = 0.0

    def __init__(self) -> None:
        self.skipped_steps = 0
        """Optimizer steps that fp16 loss scaling skipped (saved with the checkpoint)."""
        self.optimizer_state: Any = FullOptimizerState(self)
        """Checkpoint part (`save(folder)` / `load(folder)`, a collective) holding the optimizers."""
        self._trainable: str | None = None
        self._switchable: dict[str, list[nn.Parameter]] = {}
        self._handles: dict[Phase, PhaseHandle] = {}
        self._grad_reducers: dict[str, BucketedGradReducer] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup
    @abstractmethod
    def setup(self, G: nn.Module, D: nn.Module, optim: dict[str, AdamSpec]) -> None:
        """Wrap both networks and build both optimizers (once, on every rank)."""

    @abstractmethod
    def module(self, net: str) -> nn.Module:
        """The plain nn.Module of `net` with full weights, for EMA, sampling and saving."""

    @abstractmethod
    def optimizer(self, net: str) -> torch.optim.Optimizer:
        """The torch optimizer of `net` (unwrapped), for learning rates and state."""

    def set_adam(self, net: str, spec: AdamSpec) -> None:
        """New learning rate and betas for `net`'s optimizer (scheduled hyperparameters)."""
        for group in self.optimizer(net).param_groups:
            group["lr"], group["betas"] = spec.lr, spec.betas

    @abstractmethod
    def _make_handle(self, phase: Phase) -> PhaseHandle: ...

    def phase_handle(self, phase: Phase) -> PhaseHandle:
        """The handle of `phase`, built on first use and reused (no per-step set-up cost)."""
        handle = self._handles.get(phase)
        if handle is None:
            handle = self._handles[phase] = self._make_handle(phase)
        return handle

    def _frozen_modules(self) -> dict[str, nn.Module]:
        """The modules whose requires_grad decides which network trains."""
        return {net: self.module(net) for net in NETS}

    def train_only(self, net: str) -> None:
        """`net` requires grad, the other network not (no gradients, no sync for it). Switched only
        when the trained network changes: consecutive D phases pay nothing."""
        if self._trainable == net:
            return
        if not self._switchable:
            # Flat parameter lists, built once: Module.requires_grad_ walks every submodule.
            self._switchable = {name: list(m.parameters()) for name, m in self._frozen_modules().items()}
        for name, params in self._switchable.items():
            for p in params:
                p.requires_grad_(name == net)
        self._trainable = net

    def autocast(self) -> contextlib.AbstractContextManager:
        return _NO_CONTEXT

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
            for group in _by_dtype(list(self.module(net).buffers())):
                flat = torch.cat([b.reshape(-1) for b in group])  # one broadcast per dtype, not per buffer
                torch.distributed.broadcast(flat, src=0)
                _unflatten_into(flat, group)

    def grad_reducer(self, net: str, params: list[nn.Parameter]) -> BucketedGradReducer | None:
        """The bucketed, backward-overlapped gradient all-reduce of `net` (one per network, shared by
        its hand-synced phases: each arms it for its own last micro-batch); None in one process."""
        if self.world_size == 1:
            return None
        if net not in self._grad_reducers:
            self._grad_reducers[net] = BucketedGradReducer(params, self.world_size)
        return self._grad_reducers[net]

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients across ranks with one flat all-reduce per dtype, after the backward (the
        plain reference of `grad_reducer`'s bucketed one; tests compare the two)."""
        if self.world_size == 1:
            return
        for group in _by_dtype([p.grad for p in params if p.grad is not None]):
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            _unflatten_into(flat, group)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- state beyond weights and optimizers (Scope.SHARED in the checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def close(self) -> None:
        """Tear down the process group (all ranks)."""


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
