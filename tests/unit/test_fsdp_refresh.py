"""The FSDP backend's full-weight replica (`FSDPBackend.refresh`) on 2 real processes (gloo):
one all-gather per dtype, not one per tensor, and every tensor whole and exact, including those
FSDP2 shards unevenly (fewer rows than ranks x chunk, a rank with no rows at all)."""

from __future__ import annotations

import datetime

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from distgan.backends.fsdp import _gather_into
from tests.helpers import free_port

WORLD = 2


def _rank(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        # 5 rows (3 + 2), 1 row (rank 1 holds none), a conv, and an fp64 layer: two dtypes.
        net = nn.Sequential(nn.Linear(3, 5), nn.Conv2d(5, 1, 3), nn.Linear(7, 3).double())
        net.register_parameter("gain", nn.Parameter(torch.randn(1)))
        whole = {name: p.detach().clone() for name, p in net.named_parameters()}
        fully_shard(net)
        assert any(p.to_local().numel() == 0 for p in net.parameters()) == (rank == 1)
        replica = {name: torch.full_like(t, float("nan")) for name, t in whole.items()}
        calls = []
        real = torch.distributed.all_gather_into_tensor

        def counted(*args, **kwargs):
            calls.append(args[1].dtype)
            return real(*args, **kwargs)

        torch.distributed.all_gather_into_tensor = counted
        try:
            _gather_into([(replica[name], p) for name, p in net.named_parameters()])
        finally:
            torch.distributed.all_gather_into_tensor = real
        assert sorted(map(str, calls)) == ["torch.float32", "torch.float64"], calls
        for name, t in whole.items():
            assert torch.equal(replica[name], t), name
    finally:
        torch.distributed.destroy_process_group()


def test_refresh_gathers_every_tensor_whole_with_one_collective_per_dtype():
    mp.start_processes(_rank, args=(free_port(),), nprocs=WORLD, start_method="fork")
