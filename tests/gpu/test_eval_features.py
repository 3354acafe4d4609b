"""Inception FID features on CUDA match the CPU's. Both run in fp32 with TF32 off, from the weights
the `inception` extra installs. Tolerance: the two use different convolution algorithms (oneDNN vs
cuDNN), whose fp32 sums differ in order, ~1e-6 relative per layer; over Inception's ~95 layers
and the 2048-wide pool that stays far below 1e-3 of the features' scale, while a real fault (TF32
left on: ~1e-3 per layer; a wrong resize or normalization) moves features by percent."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.gpu_suite import inception_features

pytestmark = pytest.mark.gpu


def test_inception_features_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g) * 2 - 1
    cpu, cuda = inception_features(images, "cpu"), inception_features(images, "cuda")
    scale = cpu.abs().max()
    assert (cuda - cpu).abs().max() <= 1e-3 * scale, float((cuda - cpu).abs().max() / scale)
    # The statistics FID is made of agree too.
    assert torch.allclose(cuda.mean(0), cpu.mean(0), rtol=1e-3, atol=1e-4 * float(scale))
