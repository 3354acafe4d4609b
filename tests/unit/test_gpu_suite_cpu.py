"""The GPU suite's CPU-reachable half, in the normal suite: tests/gpu is collected and skipped with
its reason here (so it cannot rot), and the helpers it runs on CUDA (tests/helpers/gpu_suite.py)
run here on the CPU: the per-architecture step check, exact resume under train.deterministic,
Inception features from the installed weights, and the activation-memory estimate the GPU recipes
are sized with, checked against real tensors."""

from __future__ import annotations

import importlib

import pytest
import torch

from distgan.config import load_config
from tests.helpers import REPO
from tests.helpers.activation_memory import _SavedBytes, activation_bytes_per_image
from tests.helpers.gpu_suite import ARCHS, assert_finite_losses, deterministic_resume, inception_features, train_arch
from tests.helpers.resume import assert_identical

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite itself runs these checks on CUDA")


def test_gpu_suite_imports_and_every_test_is_marked_gpu():
    """`make test` collects tests/gpu (and reports it skipped: "CUDA is not available"); this
    imports each file here too, so a targeted run also catches an import or syntax error."""
    files = sorted((REPO / "tests" / "gpu").glob("test_*.py"))
    assert {f.stem for f in files} >= {"test_archs", "test_resume", "test_step_sync", "test_eval_features", "test_benchmark"}
    for f in files:
        module = importlib.import_module(f"tests.gpu.{f.stem}")
        tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
        assert tests, f"{f.name}: no tests"
        assert module.pytestmark.name == "gpu", f"{f.name}: `pytestmark = pytest.mark.gpu` missing"


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_step_check_runs_on_cpu_in_bf16(arch, tiny_shards, tmp_path):
    rows, probe = train_arch(arch, tiny_shards, tmp_path / "run", "bf16", 20)
    assert (probe.device, probe.precision) == ("cpu", "bf16")
    assert_finite_losses(rows, 20, f"{arch} bf16")


def test_deterministic_resume_is_exact_on_cpu(tiny_shards, tmp_path):
    assert_identical(*deterministic_resume(tiny_shards, tmp_path, "dcgan", "no"))


def test_inception_features_come_from_the_installed_weights():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, again = inception_features(images, "cpu"), inception_features(images, "cpu")
    assert first.shape == (2, 2048) and torch.isfinite(first).all() and torch.equal(first, again)


def test_meta_device_activation_estimate_equals_real_tensors():
    """The estimate builds the networks on `meta`; the same hook over real CPU tensors must count
    the same bytes (R3GAN with R1+R2, so the double backward is in it)."""
    cfg = load_config(REPO / "configs" / "r3gan-twemoji-32.yaml", ["model.widths=[16,16,8,8]"])
    estimate = activation_bytes_per_image(cfg)["D"]
    from distgan.models import build_models

    torch.manual_seed(0)
    _, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
    real = _SavedBytes()
    with real.hooks():
        x = torch.randn(2, 3, 32, 32).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x).sum(), [x], create_graph=True)
        grad.square().sum()
    assert real.bytes == estimate > 0
