"""DeepSpeed backend with real launchers on CPU (gloo): one engine per network at ZeRO stages 0, 1
and 2. Ranks end with identical weights, the update equals one process with the whole global
batch (stages 0 and 1, with accumulation and R1), and a checkpoint resumes exactly."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers.launch import (HARNESS, REPO, accelerate_cmd, launch, read_dumps, tail, tiny_args,
                                            torchrun_cmd)
from tests.integration.test_distributed import assert_ranks_identical

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

INDEXED = ["model.g_norm=none", "loss.diffaugment=", "data.hflip=false", "optim.ema_halflife_kimg=0.01",
           "loss.r1_gamma=1.0", "loss.r1_interval=1", "train.steps=3"]


def _without_batch(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("data.batch_size")]


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> dict:
    """The accelerate backend, 1 process x batch 8: what every split of that batch must give."""
    tmp = tmp_path_factory.mktemp("reference")
    args = _without_batch(tiny_args(tmp / "run", *INDEXED)) + ["data.batch_size=8"]
    result = launch([sys.executable, str(HARNESS), *args], {"DISTGAN_TEST_INDEXED": "1", "DISTGAN_TEST_DUMP": str(tmp / "dump")})
    assert result.returncode == 0, tail(result)
    return read_dumps(tmp / "dump")[0][0]


@pytest.mark.parametrize("stage,split", [(0, ["data.batch_size=2", "optim.accumulate=2"]), (1, ["data.batch_size=4"])])
def test_zero_matches_one_process_with_the_whole_batch(tmp_path, single_process_reference, stage, split):
    args = _without_batch(tiny_args(tmp_path / "run", *INDEXED)) + split + ["dist.backend=deepspeed", f"dist.zero_stage={stage}"]
    result = launch(torchrun_cmd(2, HARNESS, args), {"DISTGAN_TEST_INDEXED": "1", "DISTGAN_TEST_DUMP": str(tmp_path / "dump")})
    assert result.returncode == 0, tail(result)
    dumps = read_dumps(tmp_path / "dump")
    assert [info["backend"] for _, info in dumps] == ["DeepSpeedBackend"] * 2
    assert_ranks_identical(dumps)
    ref = single_process_reference
    diff = max((ref[k] - dumps[0][0][k]).abs().max().item() for k in ref)
    assert diff < 1e-6, f"ZeRO-{stage} with {split} differs from 1 process x batch 8 by {diff:g}"


@pytest.fixture(scope="module")
def zero2_bf16_run(tmp_path_factory, tiny_shards):
    """ZeRO-2, bf16, R1 and accumulation, launched with launch/deepspeed-zero2.yaml as documented."""
    tmp = tmp_path_factory.mktemp("zero2")
    args = tiny_args(tmp / "run", "dist.backend=deepspeed", "dist.zero_stage=2", "dist.mixed_precision=bf16",
                     "loss.r1_gamma=0.5", "loss.r1_interval=2", "optim.accumulate=2", "train.ckpt_every=2",
                     source=tiny_shards)
    cmd = accelerate_cmd(2, HARNESS, args)
    # The documented command: the DeepSpeed accelerate config, with 2 CPU processes.
    at = cmd.index("--multi_gpu")
    cmd[at:at + 1] = ["--config_file", str(REPO / "launch" / "deepspeed-zero2.yaml")]
    result = launch(cmd, {"DISTGAN_TEST_DUMP": str(tmp / "dump")})
    assert result.returncode == 0, tail(result)
    return tmp, args


def test_zero2_bf16_ranks_stay_identical(zero2_bf16_run):
    tmp, _ = zero2_bf16_run
    dumps = read_dumps(tmp / "dump")
    assert [(info["world_size"], info["mixed_precision"]) for _, info in dumps] == [(2, "bf16")] * 2
    assert_ranks_identical(dumps)
    # distgan's format, not DeepSpeed's pickles: the ZeRO partitions and fp32 masters gathered by name.
    folder = tmp / "run" / "checkpoints" / "step-000000004"
    assert not list(folder.glob("ds_*"))
    state = torch.load(folder / "optim_D.pt", weights_only=True)
    assert state["state"] and all(t.dtype == torch.float32 for t in state["fp32_params"].values())


def test_zero2_resume_from_a_checkpoint_is_exact(zero2_bf16_run, tmp_path):
    """Resuming the run at step 2 (weights, each engine's partitioned optimizer state, RNG, data
    position) ends at step 4 with exactly the weights of the uninterrupted run."""
    tmp, args = zero2_bf16_run
    ckpt = tmp / "run" / "checkpoints" / "step-000000002"
    resumed = [a for a in args if not a.startswith("train.run_dir")] + [f"train.run_dir={tmp_path / 'run'}",
                                                                         f"train.resume={ckpt}"]
    result = launch(torchrun_cmd(2, HARNESS, resumed), {"DISTGAN_TEST_DUMP": str(tmp_path / "dump")})
    assert result.returncode == 0, tail(result)
    assert "Resumed from" in result.output
    full, again = read_dumps(tmp / "dump"), read_dumps(tmp_path / "dump")
    assert again[0][1]["step"] == 4
    for (a, _), (b, _) in zip(full, again):
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"resumed run differs in {differ[:5]}"
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-000000004" / "state.json").read_text())["world_size"] == 2
