"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models").

Each set of features approximates its manifold by the union of balls around its points, the
radius of a point's ball being the distance to its k-th nearest neighbour in the same set (k=3,
the paper's choice). Precision is the fraction of generated samples inside the real manifold
(how many fakes look real); recall is the fraction of real samples inside the generated manifold
(how much of the real variety G covers).

Cost and numerics: the four distance matrices are N x N (50k x 50k at the usual N). They are
computed in float32 (TF32 off: ``device.exact_fp32``) as ``|a|^2 + |b|^2 - 2 a.b`` (one matmul per
block of rows, clamped at 0) on features centred on their common mean: distances do not change,
and the cancellation error of the matmul form, which grows with the squared norms, shrinks to
that of the spread around the mean (measured: radii within 1.4e-7 relative of float64 cdist
centred, 2.7e-5 uncentred, on features offset by 5 in 256 dimensions). Squared distances are
compared with squared radii (no square roots). Rows go in blocks of ``rows_per_block`` (memory:
block x N floats), and with several processes block b is computed by rank ``b % world_size``:
every rank gathers the features anyway (FID needs them), does its blocks, and the ranks exchange
the radii (one all-reduce) and then the two counts (one all-reduce). A block's numbers do not
depend on which rank computes it, so any world size gives the same result as one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from distgan.device import exact_fp32

K = 3
ROWS_PER_BLOCK = 256  # distance-matrix rows per matmul: 256 x 50k floats = 51 MB


def _squared_distances(a: Tensor, a_sq: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """|a_i - b_j|^2 for the rows of a and b (float32), from their squared norms: one matmul."""
    return torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.T, alpha=-2.0).clamp_min_(0.0)


def _blocks(n: int, rows: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The row blocks [lo, hi) of n rows that this rank computes (block b on rank b % world)."""
    starts = range(0, n, rows)
    return [(lo, min(lo + rows, n)) for b, lo in enumerate(starts) if b % world_size == rank]


def _sum_over_ranks(t: Tensor, world_size: int) -> Tensor:
    """Element-wise sum over ranks (a no-op in one process). gloo takes CPU tensors only."""
    if world_size == 1:
        return t
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        raise ValueError(f"precision/recall with world_size={world_size} needs torch.distributed initialized "
                         f"with that many processes")
    on = t if dist.get_backend() == "nccl" else t.cpu()
    dist.all_reduce(on)
    return on.to(t.device)


class _FeatureSet:
    """One feature set, centred and in float32, with its squared row norms."""

    def __init__(self, features: Tensor, center: Tensor):
        self.x = (features.float() - center).contiguous()
        self.sq = self.x.pow(2).sum(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return self.x[lo:hi], self.sq[lo:hi]


def _knn_squared_radii(s: _FeatureSet, k: int, rows: int, rank: int, world_size: int) -> Tensor:
    """Squared distance of each row to its k-th nearest other row; this rank fills its blocks
    (zeros elsewhere, for the sum over ranks)."""
    out = torch.zeros(len(s), dtype=torch.float32, device=s.x.device)
    for lo, hi in _blocks(len(s), rows, rank, world_size):
        d = _squared_distances(*s.rows(lo, hi), s.x, s.sq)
        idx = torch.arange(hi - lo, device=d.device)
        d[idx, lo + idx] = 0.0  # a row's distance to itself is 0 exactly (the matmul form leaves ~1e-6)
        # The (k+1)-th smallest (the 1st is the row itself); topk of a small k is the fast path on GPUs.
        out[lo:hi] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _inside(manifold: _FeatureSet, radii_sq: Tensor, probes: _FeatureSet, rows: int, rank: int,
            world_size: int) -> Tensor:
    """How many of this rank's probe rows lie within the radius of at least one manifold point."""
    count = torch.zeros((), dtype=torch.int64, device=probes.x.device)
    for lo, hi in _blocks(len(probes), rows, rank, world_size):
        d = _squared_distances(*probes.rows(lo, hi), manifold.x, manifold.sq)
        count += (d <= radii_sq[None, :]).any(dim=1).sum()
    return count


def _check_k(n: int, k: int) -> None:
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {n}")


def knn_radii(features: Tensor, k: int = K, rows_per_block: int = ROWS_PER_BLOCK) -> Tensor:
    """Distance from each row to its k-th nearest other row (itself excluded), float32."""
    _check_k(len(features), k)
    s = _FeatureSet(features, features.float().mean(dim=0))
    with exact_fp32():
        return _knn_squared_radii(s, k, rows_per_block, 0, 1).sqrt()


def precision_recall(real: Tensor, fake: Tensor, k: int = K, *, rank: int = 0, world_size: int = 1,
                     rows_per_block: int = ROWS_PER_BLOCK) -> tuple[float, float]:
    """(precision, recall) of fake features against real features, both (N, D).

    With world_size > 1 every rank passes the same (gathered) features and gets the same result;
    each computes its share of the rows (a collective: every rank must call it)."""
    _check_k(len(real), k)
    _check_k(len(fake), k)
    center = (real.float().sum(dim=0) + fake.float().sum(dim=0)) / (len(real) + len(fake))  # no 2N x D copy
    r, f = _FeatureSet(real, center), _FeatureSet(fake, center)
    with exact_fp32():  # TF32 (10-bit mantissa) would move distances past the radius margins
        radii = _sum_over_ranks(torch.cat([_knn_squared_radii(r, k, rows_per_block, rank, world_size),
                                           _knn_squared_radii(f, k, rows_per_block, rank, world_size)]), world_size)
        real_radii, fake_radii = radii[: len(r)], radii[len(r):]
        counts = torch.stack([_inside(r, real_radii, f, rows_per_block, rank, world_size),
                              _inside(f, fake_radii, r, rows_per_block, rank, world_size)])
    fakes_inside, reals_inside = _sum_over_ranks(counts, world_size).tolist()
    return fakes_inside / len(f), reals_inside / len(r)


__all__ = ["precision_recall", "knn_radii", "K"]
