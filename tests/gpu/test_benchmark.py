"""The benchmark table: the R3GAN and StyleGAN2 GPU recipes at their per-GPU micro-batch, distgan's
loop with and without torch.compile against a plain PyTorch loop of the same model
(`distgan bench loop`), img/s, sec/kimg and peak memory. Written to $OUT (or runs/)
gpu-benchmark.md and printed at the end of `make test-gpu`.

Few steps (the suite has 8 minutes): a round of 4 step pairs after as many warm-up pairs (the
warm-up also pays compilation). The only assertions are that the runs work on the GPU and that
the measured activation memory stays within the estimate the recipes were sized with
(tests/helpers/activation_memory.py); speed decides nothing here.
"""

from __future__ import annotations

import os

import pytest

from distgan.config import load_config
from tests.helpers import REPO
from tests.helpers.activation_memory import HEADROOM, activation_bytes_per_image
from tests.helpers.gpu_suite import bench_loop, benchmark_table, output_dir

pytestmark = pytest.mark.gpu

RECIPES = os.environ.get("DISTGAN_GPU_BENCH", "r3gan-ffhq-256,stylegan2-ada-paper256").split(",")
ROWS: list[dict] = []


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_benchmark_on_the_gpu(recipe, compile_):
    report = bench_loop(recipe, 4, 1, f"dist.compile={str(compile_).lower()}", timeout=240)
    assert report["device"].startswith("cuda") and report["precision"] in ("bf16", "fp16"), report
    ROWS.append({"recipe": recipe, **report})
    (output_dir() / "gpu-benchmark.md").write_text(benchmark_table(ROWS))
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [])
    estimate = HEADROOM * cfg.data.batch_size * max(activation_bytes_per_image(cfg).values()) / 2**20
    for loop in ("distgan", "plain"):
        activations = report[loop]["peak_mib"] - report[loop]["resident_mib"]
        assert 0 < activations <= estimate, f"{recipe} {loop}: {activations:.0f} MiB of activations, estimate {estimate:.0f}"
