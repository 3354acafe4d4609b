"""No host syncs in a training step (DESIGN: "the step never waits for the host").

Between log steps a generator step must not read a device value back (`.item()`, `bool(t)`,
`float(t)`), build a device tensor from Python values (`torch.tensor([...], device=...)`,
`torch.as_tensor(p)` for a float p: a host->device copy) or run an op whose output shape depends
on the data (`nonzero`, boolean masks, `unique`): on a GPU each of these stalls the host until the
queued kernels finish. A `TorchDispatchMode` records every aten call of several real
`Trainer.advance()` steps (single process, real shards, real Accelerate backend) for each
architecture and objective, with every feature that runs inside the step switched on, and fails
naming the op and where in distgan it was called.

On this CPU-only machine every tensor is a host tensor, so a host->device copy cannot be seen as
a device change; what the CUDA build would see as `aten._to_copy` from cpu to cuda shows here as
`aten.lift_fresh` (a tensor made from Python data). Both are watched.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distgan.config import load_config
from distgan.trainer import Trainer
from tests.helpers import tiny_overrides
from tests.helpers.inprocess import build_trainer

aten = torch.ops.aten

SYNCING_OPS = {
    aten._local_scalar_dense.default: "reads a device value on the host (.item(), float(t), bool(t))",
    aten.item.default: "reads a device value on the host (.item())",
    aten.is_nonzero.default: "reads a device value on the host (bool(t))",
    aten.equal.default: "reads a device comparison on the host (torch.equal)",
    aten.nonzero.default: "has a data-dependent output shape (nonzero / boolean indexing)",
    aten.masked_select.default: "has a data-dependent output shape (masked_select)",
    aten.lift_fresh.default: "builds a tensor from Python data (a host->device copy on a GPU)",
    aten.lift_fresh_copy.default: "builds a tensor from Python data (a host->device copy on a GPU)",
}
DATA_DEPENDENT_NAMES = ("unique", "repeat_interleave.Tensor", "masked_scatter")
"""Op name parts with data-dependent output shapes (any overload)."""

ALLOWED = "/torch/optim/"
"""Frames where such an op is no device sync: torch's foreach/loop Adam (capturable=False) keeps
its step count as a host tensor on every device and does its bias-correction arithmetic there
(`torch.tensor(1.0)` added to the CPU step counts, `_get_value(step)`); fused Adam, the CUDA
default (`device.adam_kwargs`), keeps it on the device."""

OWN_FRAMES = ("distgan/", "tests/")


@dataclass(frozen=True)
class Sync:
    op: str
    why: str
    where: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.op} {self.why}, called from\n      " + "\n      ".join(self.where)


def _sync_reason(func, args, kwargs) -> str | None:
    why = SYNCING_OPS.get(func)
    if why is not None:
        return why
    name = str(func)
    if any(part in name for part in DATA_DEPENDENT_NAMES):
        return "has a data-dependent output shape"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return "indexes with a boolean mask (a data-dependent output shape)"
    if func is aten._to_copy.default and args and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        if args[0].device.type == "cpu" and target is not None and torch.device(target).type != "cpu":
            return "copies a host tensor to the device"
    if func is aten.copy_.default and len(args) > 1 and isinstance(args[1], torch.Tensor):
        if args[1].device.type == "cpu" and args[0].device.type != "cpu":
            return "copies a host tensor to the device"
    return None


class HostSyncWatch(TorchDispatchMode):
    """Records every aten call that would make the host wait for the device (see SYNCING_OPS)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Sync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _sync_reason(func, args, kwargs)
        if why is not None:
            stack = traceback.extract_stack()[:-1]
            if not any(ALLOWED in f.filename for f in stack):
                own = [f"{f.filename.split('/work/main/')[-1]}:{f.lineno} {f.name}" for f in stack
                       if any(part in f.filename for part in OWN_FRAMES) and "test_host_syncs" not in f.filename]
                self.syncs.append(Sync(str(func), why, tuple(own[-5:])))
        return func(*args, **kwargs)


def test_the_watch_sees_each_kind_of_sync():
    """The watch itself: each kind of sync is caught, plain device arithmetic is not."""
    x = torch.randn(4)
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "tensor from a list": lambda: torch.tensor([1.0, 2.0]),
        "tensor from a float": lambda: torch.as_tensor(0.3),
        "nonzero": lambda: x[x > 0],
        "unique": lambda: torch.unique(x),
    }
    for name, fn in cases.items():
        with HostSyncWatch() as watch:
            fn()
        assert watch.syncs, f"{name}: not caught"
    with HostSyncWatch() as watch:
        p = torch.zeros(())
        y = torch.where(torch.rand(4) < p, x * 0.3, torch.full_like(x, 1.0))  # Python scalars fold into kernels
        p.add_(0.1).clamp_(0.0, 1.0)
        torch.randn(2, 3).sum(dim=1) / 7
    assert not watch.syncs, [str(s) for s in watch.syncs]
    del y


SCHEDULED = ["optim.g_lr={start: 0.002, end: 0.0005, kimg: 1}", "optim.d_betas=[{start: 0.5, end: 0.0, kimg: 1}, 0.99]",
             "loss.r1_gamma={start: 1.0, end: 0.1, kimg: 1}", "optim.ema_halflife_kimg={start: 0, end: 0.5, kimg: 1}",
             "loss.augment=bgc", "loss.augment_p={start: 0.1, end: 0.5, kimg: 1}"]
BGC_FLOAT = ["loss.augment=bgc", "loss.augment_p=0.3"]
ADA = ["loss.augment=bgc-r3gan", "loss.augment_p=0.2", "loss.ada_target=0.6", "loss.ada_kimg=1", "loss.ada_interval=1"]
DIFFAUGMENT = ["loss.diffaugment=color,translation,cutout"]
STYLEGAN2 = ["model.arch=stylegan2", "model.widths=[16,8,8]", "model.mapping_layers=2", "model.mbstd_group=2",
             "model.style_mixing_prob=0.9"]
CASES = {
    # arch / objective / the step's features
    "dcgan-logistic-r1-bgc-diffaug-acc2": ["model.arch=dcgan", "loss.objective=logistic", "loss.r1_gamma=1",
                                           "loss.r1_interval=1", "optim.accumulate=2", *BGC_FLOAT, *DIFFAUGMENT],
    "resnet-hinge-lazy-r1-scheduled-clip": ["model.arch=resnet", "loss.objective=hinge", "loss.r1_interval=2",
                                            "optim.grad_clip=1.0", *SCHEDULED],
    "r3gan-rpgan-r1r2-scheduled-diffaug": ["model.arch=r3gan", "model.widths=[16,8,8]", "loss.objective=rpgan",
                                           "loss.r1_gamma=1", "loss.r1_interval=1", *SCHEDULED, *DIFFAUGMENT],
    "stylegan2-logistic-pl-ada-mixing-acc2": [*STYLEGAN2, "loss.objective=logistic", "loss.r1_gamma=1",
                                              "loss.r1_interval=2", "loss.pl_weight=2", "loss.pl_interval=2",
                                              "optim.accumulate=2", *ADA],
    "dcgan-wgan-gp": ["model.arch=dcgan", "loss.objective=wgan-gp", *BGC_FLOAT],
    "stylegan2-lsgan-lazy-r1r2-pl-conditional": [*STYLEGAN2, "loss.objective=lsgan", "loss.r1_gamma=1",
                                                 "loss.r2_gamma=1", "loss.r1_interval=2", "loss.pl_weight=2",
                                                 "loss.pl_interval=1", *ADA, "model.conditional=true"],
}
WATCHED_STEPS = 2
"""Steps recorded after a first one (which builds the phase handles and caches): every lazy phase
of interval 2 runs in them."""


def _trainer(shards: Path, run_dir: Path, overrides: list[str]) -> Trainer:
    # No log row, grid, checkpoint, evaluation or preemption poll falls in the watched steps:
    # those read back by design.
    cfg = load_config(None, tiny_overrides(shards, run_dir, "train.steps=1000", "train.log_every=1000",
                                           "train.sample_every=1000", "train.ckpt_every=1000",
                                           "train.signal_check_every=1000", "optim.ema_rampup=0.05", *overrides))
    return build_trainer(cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_never_wait_for_the_host(case, tiny_shards, tmp_path):
    trainer = _trainer(tiny_shards, tmp_path / "run", CASES[case])
    trainer.start()
    try:
        trainer.advance()
        phases_seen = set()
        with HostSyncWatch() as watch:
            for _ in range(WATCHED_STEPS):
                phases_seen.update(p.name for p in trainer.schedule.due(trainer.state.step))
                trainer.advance()
    finally:
        trainer.finish("failed")
        trainer.backend.close()
    assert trainer.state.step == 1 + WATCHED_STEPS
    expected = {p.name for p in trainer.schedule.phases}
    assert phases_seen == expected, f"the watched steps ran {sorted(phases_seen)}, not every phase {sorted(expected)}"
    unique = list(dict.fromkeys(watch.syncs))
    assert not unique, f"{case}: {len(watch.syncs)} host sync(s) inside training steps:\n  " + "\n  ".join(map(str, unique))
