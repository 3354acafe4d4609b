"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models").

Each set of features approximates its manifold by the union of balls around its points, the
radius of a point's ball being the distance to its k-th nearest neighbour in the same set (k=3,
the paper's choice). Precision is the fraction of generated samples inside the real manifold
(how many fakes look real); recall is the fraction of real samples inside the generated manifold
(how much of the real variety G covers). Both use the features FID uses, already gathered on
every rank, so every rank computes the same numbers with no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

K = 3
ROWS_PER_BLOCK = 1024  # distance-matrix rows computed at a time (memory: rows x N floats)


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances between the rows of a and b, in float64 (no cancellation issues)."""
    return torch.cdist(a.double(), b.double())


def knn_radii(features: Tensor, k: int = K) -> Tensor:
    """Distance from each row to its k-th nearest other row (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(features)}")
    radii = []
    for start in range(0, len(features), ROWS_PER_BLOCK):
        d = _pairwise(features[start:start + ROWS_PER_BLOCK], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _coverage(manifold: Tensor, radii: Tensor, probes: Tensor) -> float:
    """Fraction of `probes` within the radius of at least one point of `manifold`."""
    inside = 0
    for start in range(0, len(probes), ROWS_PER_BLOCK):
        d = _pairwise(probes[start:start + ROWS_PER_BLOCK], manifold)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / len(probes)


def precision_recall(real: Tensor, fake: Tensor, k: int = K) -> tuple[float, float]:
    """(precision, recall) of fake features against real features, both (N, D)."""
    precision = _coverage(real, knn_radii(real, k), fake)
    recall = _coverage(fake, knn_radii(fake, k), real)
    return precision, recall


__all__ = ["precision_recall", "knn_radii", "K"]
