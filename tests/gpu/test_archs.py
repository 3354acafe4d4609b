"""Every architecture trains 20 steps on the GPU in bf16 and in fp16 (fp16 with loss scaling)
with finite losses; the CPU suite runs the same helper in bf16 (tests/unit/test_gpu_suite_cpu.py)."""

from __future__ import annotations

import pytest

from tests.helpers.gpu_suite import ARCHS, assert_finite_losses, train_arch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_20_steps_with_finite_losses(arch, precision, tiny_shards, tmp_path):
    rows, probe = train_arch(arch, tiny_shards, tmp_path / "run", precision, 20)
    assert (probe.device, probe.precision) == ("cuda", precision)
    assert_finite_losses(rows, 20, f"{arch} {precision}")


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_torch_compile_inductor_trains(arch, tiny_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTGAN_COMPILE_BACKEND", raising=False)  # inductor, not a debugging backend
    rows, probe = train_arch(arch, tiny_shards, tmp_path / "run", "bf16", 6, "dist.compile=true")
    assert probe.device == "cuda"
    assert_finite_losses(rows, 6, f"{arch} compiled")
