"""Resume on the GPU: exact with train.deterministic=true in one process, and through each
DeepSpeed ZeRO stage and FSDP at world size 1 (torchrun --nproc_per_node 1)."""

from __future__ import annotations

import pytest

from tests.helpers.gpu_suite import BACKENDS, backend_resume, deterministic_resume
from tests.helpers.resume import assert_identical

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_deterministic_resume_is_exact(precision, tiny_shards, tmp_path):
    assert_identical(*deterministic_resume(tiny_shards, tmp_path, "dcgan", precision))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_checkpoints_and_resumes_at_world_size_1(backend, tiny_shards, tmp_path):
    straight, resumed = backend_resume(backend, tiny_shards, tmp_path, "bf16")
    assert_identical(straight, resumed)
