"""The bucketed gradient all-reduce of hand-synced phases (`backends/grad_buckets.py`) on 2 real
processes (gloo): it equals the flat all-reduce after the backward exactly, its buckets go out
during the last micro-batch's backward (not after it), and neither earlier micro-batches nor the
first derivative of an R1-style penalty (`autograd.grad(create_graph=True)` on the input) fire it."""

from __future__ import annotations

import copy
import datetime
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from torch import nn

from distgan.backends.base import Backend
from distgan.backends.grad_buckets import BucketedGradReducer
from tests.helpers import free_port

WORLD = 2


class Net(nn.Module):
    """Convolutions and a linear head (fp32) plus an fp64 scale: two dtypes, several buckets."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                                  nn.Softplus())
        self.head = nn.Linear(8 * 8 * 8, 1)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.head(self.body(x).flatten(1)).squeeze(1) * self.scale.sum().float()


def _penalized_loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits mean plus an R1-style penalty: the first derivative with respect to the input only."""
    x = x.detach().requires_grad_(True)
    logits = net(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits.mean() + grad.square().sum()


def _rank(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        bucketed, flat = Net(), None
        flat = copy.deepcopy(bucketed)
        params = list(bucketed.parameters())
        reducer = BucketedGradReducer(params, WORLD, bucket_bytes=2048)
        assert len(reducer.buckets) >= 3, [len(b.params) for b in reducer.buckets]
        assert reducer.buckets[0].params[0] is params[-1]  # reverse registration order, like DDP
        assert all(len({p.dtype for p in b.params}) == 1 for b in reducer.buckets)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        micro = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]

        _penalized_loss(bucketed, micro[0]).mul(0.5).backward()  # accumulation micro-batch: not armed
        assert all(b.ready == 0 for b in reducer.buckets) and reducer.launched_in_backward == 0
        reducer.arm()
        loss = _penalized_loss(bucketed, micro[1])
        assert all(b.ready == 0 for b in reducer.buckets), "autograd.grad on the input fired parameter hooks"
        loss.mul(0.5).backward()
        assert reducer.launched_in_backward == len(reducer.buckets), "buckets were not launched during the backward"
        reducer.finish()

        for x in micro:
            _penalized_loss(flat, x).mul(0.5).backward()
        local = [p.grad.clone() for p in flat.parameters()]
        Backend.all_reduce_grads(SimpleNamespace(world_size=WORLD), list(flat.parameters()))
        for (name, a), b in zip(bucketed.named_parameters(), flat.parameters()):
            assert torch.equal(a.grad, b.grad), f"{name}: bucketed and flat all-reduce differ"
        # (a bias whose gradient does not depend on the data is the same on both ranks)
        assert sum(not torch.equal(p.grad, own) for p, own in zip(params, local)) >= len(params) - 1, "nothing was averaged"
        gathered = [torch.zeros_like(params[0].grad) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, params[0].grad)
        assert torch.equal(gathered[0], gathered[1])

        # A discarded update: the launched buckets are waited for, nothing is written.
        before = [p.grad.clone() for p in params]
        reducer.arm()
        _penalized_loss(bucketed, micro[0]).backward()
        reducer.cancel()
        assert not all(torch.equal(p.grad, b) for p, b in zip(params, before))  # local accumulation, unreduced
    finally:
        torch.distributed.destroy_process_group()


def test_bucketed_all_reduce_equals_the_flat_one_on_two_processes():
    mp.start_processes(_rank, args=(free_port(),), nprocs=WORLD, start_method="fork")
