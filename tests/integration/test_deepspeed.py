"""DeepSpeed backend with real launchers on CPU (gloo): one engine per network at ZeRO stages 0, 1
and 2. Ranks end with identical weights, the update equals one process with the whole global
batch (stages 0 and 1, with accumulation and R1), and a checkpoint resumes exactly (bf16 at every
stage). The GPU configs are built and initialized by DeepSpeed for real on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import DEEPSPEED_CPU_PRELUDE
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


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda stage: f"zero{stage}")
def zero2_bf16_run(request, tmp_path_factory, tiny_shards):
    """bf16, R1 and accumulation at ZeRO stage 0, 1 and 2. Stages 1 and 2 are launched with
    launch/deepspeed-zero{1,2}.yaml as documented; stage 0 (no accelerate yaml) with torchrun and
    launch/ds_zero0.json. bf16 wraps Adam differently per stage: DeepSpeed's unfused optimizer
    with fp32 copies at 0 (which once failed at the first checkpoint with KeyError: 0), the ZeRO
    optimizer's partitions at 1 and 2."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    args = tiny_args(tmp / "run", "dist.backend=deepspeed", f"dist.zero_stage={stage}", "dist.mixed_precision=bf16",
                     "loss.r1_gamma=0.5", "loss.r1_interval=2", "optim.accumulate=2", "train.ckpt_every=2",
                     source=tiny_shards)
    if stage == 0:
        cmd = torchrun_cmd(2, HARNESS, args + [f"dist.deepspeed_config={REPO / 'launch' / 'ds_zero0.json'}"])
    else:
        cmd = accelerate_cmd(2, HARNESS, args)
        # The documented command: the DeepSpeed accelerate config, with 2 CPU processes.
        at = cmd.index("--multi_gpu")
        cmd[at:at + 1] = ["--config_file", str(REPO / "launch" / f"deepspeed-zero{stage}.yaml")]
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
    assert set(state["state"]) == set(state["fp32_params"])  # every parameter by name, none positional


def test_zero2_resume_from_a_checkpoint_is_exact(zero2_bf16_run, tmp_path):
    """Resuming the run at step 2 (weights, each engine's optimizer state and fp32 masters, RNG,
    data position) ends at step 4 with exactly the weights of the uninterrupted run."""
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


# Builds the DeepSpeed config of a GPU run (cpu=False) for every stage x precision, bare and merged
# with launch/ds_zero<stage>.json, and has DeepSpeed initialize it and take one step, on CPU. The
# config checks of `deepspeed.initialize` do not depend on the device (see DEEPSPEED_CPU_PRELUDE for
# the one capability query answered here).
GPU_CONFIGS = DEEPSPEED_CPU_PRELUDE + r"""
import itertools
from distgan.backends.base import AdamSpec
from distgan.backends.deepspeed import ds_config
from distgan.config import load_config
results = {}
for stage, precision, merged in itertools.product((0, 1, 2), ("no", "bf16", "fp16"), (False, True)):
    args = ["dist.backend=deepspeed", f"dist.zero_stage={stage}", "data.batch_size=2", "optim.grad_clip=1.0"]
    args += [f"dist.deepspeed_config=launch/ds_zero{stage}.json"] if merged else []
    config = ds_config(load_config(None, args), 1, precision, cpu=False)
    impl = "fused" if merged else "foreach"  # fused torch Adam under every wrapper too
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    key = f"zero{stage}-{precision}-{'json' if merged else 'bare'}"
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=AdamSpec(1e-3, (0.5, 0.99), impl).build(model.parameters()),
                                          config=config)
        dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        engine.backward(engine(torch.randn(2, 4, dtype=dtype)).float().mean(), scale_wrt_gas=False)
        engine.step()
        results[key] = {"optimizer": type(engine.optimizer).__name__, "overlap_comm": config["zero_optimization"].get("overlap_comm")}
    except Exception as e:
        results[key] = {"error": f"{type(e).__name__}: {e}"[:400]}
print("RESULTS " + json.dumps(results))
"""


def test_gpu_configs_pass_deepspeed_initialize():
    """The GPU config of every stage and precision: ZeRO-1 once asked for overlap_comm, which
    DeepSpeed refuses with managed_gradient_accumulation=false; fp16 once kept BatchNorm's
    running statistics fp32 against fp16 weights."""
    proc = subprocess.run([sys.executable, "-c", GPU_CONFIGS], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(line[len("RESULTS "):])
    failed = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not failed, failed
    assert len(results) == 18
    for key, seen in results.items():
        stage = int(key[4])
        assert seen["overlap_comm"] is (True if stage == 2 else None if stage == 0 else False), key
    assert results["zero0-bf16-bare"]["optimizer"] == "FP16_UnfusedOptimizer"  # the layout zero_state pairs by name


def test_overlap_comm_at_stage_1_is_refused_with_the_file_named(tmp_path):
    from distgan.backends.deepspeed import ds_config
    from distgan.config import ConfigError, load_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    cfg = load_config(None, ["dist.backend=deepspeed", "dist.zero_stage=1", f"dist.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=rf"{path}: zero_optimization.overlap_comm=true needs ZeRO stage 2"):
        ds_config(cfg, 1, "bf16", cpu=False)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    cfg = load_config(None, ["dist.backend=deepspeed", "dist.zero_stage=2", f"dist.deepspeed_config={path}"])
    assert ds_config(cfg, 1, "bf16", cpu=False)["zero_optimization"]["overlap_comm"] is False  # the file's choice
