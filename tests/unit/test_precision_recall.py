"""Improved precision/recall on feature sets whose answers are known."""

import pytest
import torch

from distgan.metrics.precision_recall import knn_radii, precision_recall


def test_identical_sets_give_one_and_one():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_disjoint_distant_clusters_give_zero_and_zero():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_a_collapsed_generator_is_precise_but_has_no_recall():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 4, generator=g)
    fake = real[:500] * 0.05  # every fake near the center of the real cloud: all look real
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95 and recall < 0.2


def test_knn_radius_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # 3rd nearest other point of 0.0 is 6.0; of 10.0 it is 1.0 (distance 9).
    assert knn_radii(x, k=3).tolist() == pytest.approx([6.0, 5.0, 3.0, 5.0, 9.0])
    with pytest.raises(ValueError, match="more than 3 samples"):
        knn_radii(x[:3])


def _reference_radii(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), x.double()).kthvalue(4, dim=1).values  # float64, the previous method


def _reference_coverage(manifold: torch.Tensor, probes: torch.Tensor) -> float:
    d = torch.cdist(probes.double(), manifold.double())
    return (d <= _reference_radii(manifold)[None]).any(dim=1).double().mean().item()


def test_fp32_matches_the_float64_reference_radii_and_counts():
    g = torch.Generator().manual_seed(3)
    # Inception-like non-negative features with a large common offset: |x|^2 ~ 7000, the matmul
    # form's worst case for cancellation unless the features are centred first.
    real = torch.relu(torch.randn(600, 256, generator=g) * 0.8 + 0.2) + 5.0
    fake = torch.relu(torch.randn(500, 256, generator=g) * 0.8 + 0.25) + 5.0
    radii = knn_radii(real, rows_per_block=100)
    assert radii.dtype == torch.float32
    assert ((radii.double() - _reference_radii(real)).abs() / _reference_radii(real)).max() < 1e-5
    precision, recall = precision_recall(real, fake, rows_per_block=100)
    assert (precision, recall) == (_reference_coverage(real, fake), _reference_coverage(fake, real))
    assert 0 < precision < 1 and 0 < recall < 1


def test_tf32_setting_of_the_caller_is_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # what a run with TF32 matmuls has set
    try:
        x = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
        assert precision_recall(x, x + 0.01) == (1.0, 1.0)
        assert torch.backends.cuda.matmul.allow_tf32  # off only inside (device.exact_fp32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
