"""Gradient averaging by hand, bucketed and overlapped with the backward as DDP's reducer does.

Phases that differentiate through a gradient (R1/R2, WGAN-GP, path length) cannot go through
DDP's reducer [pytorch #47562], and DeepSpeed's fp32 ZeRO-0 engines here leave the all-reduce to
the backend. One flat all-reduce after the backward would leave the network idle while it runs;
instead, like DDP:

* parameters are grouped into buckets of about `bucket_bytes` (25 MB, DDP's default) in reverse
  order of registration (roughly the order the backward produces their gradients), one dtype and
  device per bucket;
* a `register_post_accumulate_grad_hook` on each parameter counts its gradient in; when a bucket
  is complete it is flattened and all-reduced with `async_op=True`, while the backward goes on;
* buckets are launched strictly in bucket order (a complete bucket waits for the ones before it),
  so every rank issues the same collectives in the same order whatever its autograd scheduling;
* `finish()` (before the optimizer step) launches what is left, waits for every bucket and
  writes the averages (sum / world size) back into the gradients.

The hooks count only when armed: `arm()` is called for the last micro-batch of an accumulation
(earlier micro-batches only accumulate locally, as under `no_sync`). `autograd.grad` with respect
to inputs (R1's first derivative, path length's J^T y) accumulates into no `.grad`, so it fires
no hook; only the final `backward()` does.
"""

from __future__ import annotations

import torch
from torch import nn

BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket cap (`bucket_cap_mb=25`)."""


class _Bucket:
    __slots__ = ("params", "ready", "work", "flat")

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.ready = 0
        self.work = None
        self.flat: torch.Tensor | None = None


class BucketedGradReducer:
    """Averages the gradients of `params` over the ranks of the default process group."""

    def __init__(self, params: list[nn.Parameter], world_size: int, bucket_bytes: int = BUCKET_BYTES):
        params = list(params)
        self.world_size = world_size
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}  # id(param) -> its bucket's index
        open_buckets: dict[tuple, list[nn.Parameter]] = {}  # the bucket being filled, per (dtype, device)
        sizes: dict[tuple, int] = {}
        for p in reversed(params):
            key, nbytes = (p.dtype, p.device), p.numel() * p.element_size()
            if key in open_buckets and sizes[key] + nbytes > bucket_bytes:
                self._close(open_buckets.pop(key))
            if key not in open_buckets:
                open_buckets[key], sizes[key] = [], 0
            open_buckets[key].append(p)
            sizes[key] += nbytes
        for group in open_buckets.values():
            self._close(group)
        self._next = 0  # the first bucket not launched yet
        self._armed = False
        self.launched_in_backward = 0
        """Buckets of the last sync launched from the hooks, while the backward ran (not by `finish`)."""
        self._params = params
        self._hooks: list | None = None  # registered at the first `arm`: only a trainable tensor takes one

    def _close(self, group: list[nn.Parameter]) -> None:
        for p in group:
            self._bucket_of[id(p)] = len(self.buckets)
        self.buckets.append(_Bucket(group))

    def arm(self) -> None:
        """The next backward is the last of the accumulation: reduce as its gradients arrive.
        Called while the network trains (requires_grad on; the frozen one may be built earlier)."""
        if self._hooks is None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in self._params]
        for bucket in self.buckets:
            bucket.ready, bucket.work, bucket.flat = 0, None, None
        self._next, self._armed, self.launched_in_backward = 0, True, 0

    def _gradient_ready(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        index = self._bucket_of[id(p)]
        bucket = self.buckets[index]
        if index < self._next:
            raise RuntimeError("a gradient was accumulated again after its bucket's all-reduce started: call "
                               "backward once per armed micro-batch")
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1
            self.launched_in_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        bucket.work = torch.distributed.all_reduce(bucket.flat, async_op=True)

    def finish(self) -> None:
        """Launch the buckets still waiting (parameters without a gradient count as zero, as in
        DDP), wait for all of them and write the averages into the gradients."""
        if not self._armed:
            raise RuntimeError("BucketedGradReducer.finish without arm(): the last micro-batch was not marked")
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.flat /= self.world_size
            offset = 0
            for p in bucket.params:
                n = p.numel()
                value = bucket.flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = value.clone()
                else:
                    p.grad.copy_(value)
                offset += n
            bucket.work, bucket.flat = None, None
        self._armed = False

    def cancel(self) -> None:
        """Drop an armed sync (a discarded update): wait for what was launched, write nothing."""
        for bucket in self.buckets[:self._next]:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.flat = None, None
        self._armed = False

    def remove(self) -> None:
        for hook in self._hooks or ():
            hook.remove()
        self._hooks = None


__all__ = ["BUCKET_BYTES", "BucketedGradReducer"]
