"""The prefetch thread (and so the DataLoader's pin thread it starts) works on the rank's GPU, not
on cuda:0: the CUDA current device is per thread, and a pin thread on cuda:0 gives every rank of a
node a CUDA context on GPU 0. Meaningful with two or more GPUs (the last one is used)."""

from __future__ import annotations

import pytest
import torch

from distgan.data.prefetch import Prefetcher

pytestmark = pytest.mark.gpu


class _DeviceReportingStream:
    """Yields, as its "images", the CUDA device current in the thread that iterates it."""

    info = None

    def __iter__(self):
        while True:
            yield torch.tensor([torch.cuda.current_device()]), torch.zeros(1)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def stats(self):
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("bare", [False, True], ids=["cuda:last", "cuda"])
def test_prefetch_thread_uses_the_ranks_gpu(bare):
    """`cuda` without an index is Accelerate's single-process device: it means the training
    thread's current GPU (and must not reach `torch.cuda.set_device`, which raises for it)."""
    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(last)
    try:
        device = torch.device("cuda") if bare else torch.device("cuda", last)
        data = Prefetcher(_DeviceReportingStream(), "probe", device=device).start()
        try:
            images, _ = next(data)
        finally:
            data.close()
    finally:
        torch.cuda.set_device(0)
    assert int(images) == last
