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
