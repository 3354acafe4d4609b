"""Data-parallel training with real launchers and real processes (CPU, gloo): ranks stay in sync,
gradients average exactly, each rank sees its own data, failures stop everyone, wrong launches
are refused. Model and batch are tiny; every run takes a few seconds on one thread per rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO
from tests.helpers.launch import (BIN, HARNESS, TRAIN, Result, accelerate_cmd, launch, read_dumps, tail, tiny_args,
                                            torchrun_cmd)
from tests.helpers.launch import env as launch_env

pytestmark = pytest.mark.slow


def assert_ranks_identical(dumps: list[tuple[dict, dict]]) -> None:
    (ref, _), *others = dumps
    assert any(k.startswith("G_ema.") for k in ref) and any(k.startswith("D.") for k in ref)
    for tensors, info in others:
        assert tensors.keys() == ref.keys()
        differ = [k for k in ref if not torch.equal(ref[k], tensors[k])]
        assert not differ, f"rank {info['rank']} differs from rank 0 in {differ[:5]}"
    assert all(torch.isfinite(t).all() for t in ref.values())


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_ddp_ranks_stay_identical_and_see_different_data(tiny_shards, tmp_path, precision):
    # Batch-norm G (buffers broadcast), lazy R1 (manual all-reduce) and the DDP-wrapped main phases.
    extra = ["loss.r1_gamma=0.5", "loss.r1_interval=2"] if precision == "no" else []
    args = tiny_args(tmp_path / "run", *extra, source=tiny_shards)
    result = launch(accelerate_cmd(2, HARNESS, args, mixed_precision=precision), {"DISTGAN_TEST_DUMP": str(tmp_path / "dump")})
    assert result.returncode == 0, tail(result)
    dumps = read_dumps(tmp_path / "dump")
    assert [info["world_size"] for _, info in dumps] == [2, 2]
    assert dumps[0][1]["mixed_precision"] == precision
    assert_ranks_identical(dumps)
    seen = [set(info["batches"]) for _, info in dumps]
    assert len(seen[0]) == len(dumps[0][1]["batches"]) == 4 * 2  # 4 steps x d_steps 2, no batch twice
    assert not seen[0] & seen[1], "two ranks trained on the same batch"


# The objectives and regularizers whose gradient averaging is checked (both DDP paths: the
# reducer for logistic/hinge/lsgan, the manual all-reduce for WGAN-GP, R1 and R2).
AVERAGING_RUNS = [["loss.objective=logistic"], ["loss.objective=hinge"], ["loss.objective=lsgan"],
                  ["loss.objective=wgan-gp"], ["loss.objective=logistic", "loss.r1_gamma=1.0", "loss.r1_interval=1"],
                  # R3GAN: relativistic pairs (G phase on reals too), R1 + R2 inside the D step, and
                  # as a lazy phase of their own with R2 weighted apart from R1. On R3GAN's D: the
                  # relativistic loss cannot see an output bias, whose gradient is then pure float
                  # noise that Adam would blow up to +-lr (DCGAN's D has one; R3GAN's has none).
                  ["model.arch=r3gan", "loss.objective=rpgan", "loss.r1_gamma=1.0", "loss.r1_interval=1"],
                  ["model.arch=r3gan", "loss.objective=rpgan", "loss.r1_gamma=0.5", "loss.r2_gamma=2.0",
                   "loss.r1_interval=2"]]


def test_gradient_averaging_matches_one_process_with_the_doubled_batch(tmp_path):
    """2 processes x batch B == 1 process x batch 2B == 1 process x batch B x accumulation 2.

    Data, latents and WGAN-GP mixing weights are keyed by the global sample index (rank_harness
    DISTGAN_TEST_INDEXED), so all splits of the global batch see exactly the same samples;
    G has no batch norm (model.g_norm=none) and DCGAN's D none either, so each sample's
    gradient does not depend on how the batch is split. Only float summation order differs.
    """
    base = tiny_args(tmp_path / "run", "model.g_norm=none", "loss.diffaugment=", "data.hflip=false", "train.steps=3",
                     "optim.ema_halflife_kimg=0.01", "train.resume=none", "train.log_every=1")
    base = [a for a in base if not a.startswith("data.batch_size")]
    two = ([r + ["data.batch_size=4"] for r in AVERAGING_RUNS]
           + [["data.batch_size=2", "optim.accumulate=2"],
              ["data.batch_size=2", "optim.accumulate=2", "dist.fsdp=true"]])  # FSDP: same update as DDP
    one = ([r + ["data.batch_size=8"] for r in AVERAGING_RUNS]
           + [["data.batch_size=4", "optim.accumulate=2"],  # accumulation x2 == the doubled batch
              ["data.batch_size=4"]])  # negative control: half the data must give other weights
    (tmp_path / "two.json").write_text(json.dumps(two))
    (tmp_path / "one.json").write_text(json.dumps(one))
    hooks = {"DISTGAN_TEST_INDEXED": "1"}
    r2 = launch(torchrun_cmd(2, HARNESS, base + [f"train.run_dir={tmp_path / 'two'}"]),
                {**hooks, "DISTGAN_TEST_MULTI": str(tmp_path / "two.json"), "DISTGAN_TEST_DUMP": str(tmp_path / "d2")})
    assert r2.returncode == 0, tail(r2)
    r1 = launch([sys.executable, str(HARNESS), *base, f"train.run_dir={tmp_path / 'one'}"],
                {**hooks, "DISTGAN_TEST_MULTI": str(tmp_path / "one.json"), "DISTGAN_TEST_DUMP": str(tmp_path / "d1")})
    assert r1.returncode == 0, tail(r1)

    def weights(folder, i):
        dumps = read_dumps(tmp_path / folder / str(i))
        assert_ranks_identical(dumps)
        return dumps[0][0]

    def max_diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    for i, run in enumerate(AVERAGING_RUNS):
        ref = weights("d1", i)
        assert max_diff(ref, weights("d2", i)) < 1e-6, f"{run}: 2 x B differs from 1 x 2B"
    doubled = weights("d1", 0)
    assert max_diff(doubled, weights("d1", len(AVERAGING_RUNS))) < 1e-6, "accumulation x2 differs from the doubled batch"
    assert max_diff(doubled, weights("d2", len(AVERAGING_RUNS))) < 1e-6, "2 ranks x accumulation 2 differ"
    assert max_diff(doubled, weights("d2", len(AVERAGING_RUNS) + 1)) < 1e-6, "FSDP differs from 1 process x 2B"
    # The check can fail: training on half of the data moves the weights measurably elsewhere.
    assert max_diff(doubled, weights("d1", len(AVERAGING_RUNS) + 1)) > 1e-5


def test_fsdp_bf16_ranks_stay_identical_and_resume_exactly(tiny_shards, tmp_path):
    """FSDP2 (sharded G and D, batch-norm G, bf16 autocast): identical ranks; resuming at step 2
    from the full-state checkpoint gives exactly the weights of the uninterrupted run."""
    args = tiny_args(tmp_path / "full", "dist.fsdp=true", "train.ckpt_every=2", source=tiny_shards)
    full = launch(accelerate_cmd(2, HARNESS, args, mixed_precision="bf16"), {"DISTGAN_TEST_DUMP": str(tmp_path / "d_full")})
    assert full.returncode == 0, tail(full)
    dumps = read_dumps(tmp_path / "d_full")
    assert [(i["backend"], i["mixed_precision"]) for _, i in dumps] == [("FSDPBackend", "bf16")] * 2
    assert_ranks_identical(dumps)
    resumed_args = [a for a in args if not a.startswith("train.run_dir")] + [
        f"train.run_dir={tmp_path / 'resumed'}", f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-000000002'}"]
    resumed = launch(torchrun_cmd(2, HARNESS, resumed_args + ["dist.mixed_precision=bf16"]),
                     {"DISTGAN_TEST_DUMP": str(tmp_path / "d_resumed")})
    assert resumed.returncode == 0, tail(resumed)
    again = read_dumps(tmp_path / "d_resumed")[0][0]
    differ = [k for k in again if not torch.equal(again[k], dumps[0][0][k])]
    assert not differ, f"resumed FSDP run differs in {differ[:5]}"


def test_accelerate_cpu_flag_starting_one_process_is_an_error(tiny_shards, tmp_path):
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process.
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", str(TRAIN),
           *tiny_args(tmp_path / "run", source=tiny_shards)]
    result = launch(cmd)
    assert result.returncode != 0
    assert "2 processes were asked for" in result.output and "has 1" in result.output, tail(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


def launch_timed_from_first_row(cmd: list[str], extra_env: dict[str, str], run_dir: Path, limit: float) -> Result:
    """Run a launcher; `seconds` counts from the moment rank 0 logged its first metrics row (step 1,
    just before the injected failure at step 2), so start-up time on a loaded machine does not
    count. A launch still running `limit` seconds after that row is killed (seconds = inf)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(**extra_env), stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            rows = run_dir / "metrics.jsonl"
            while proc.poll() is None and not (rows.is_file() and rows.stat().st_size > 0):
                time.sleep(0.1)
            logged = time.monotonic()
            try:
                proc.wait(timeout=limit)
                seconds = time.monotonic() - logged
            except subprocess.TimeoutExpired:
                seconds = float("inf")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        return Result(proc.returncode, out.read(), seconds)


@pytest.mark.parametrize("mode,launcher", [("raise", "accelerate"), ("kill", "torchrun"), ("hang", "accelerate")])
def test_a_failed_rank_stops_every_rank_within_the_timeout(tiny_shards, tmp_path, mode, launcher):
    timeout_s = 5
    args = tiny_args(tmp_path / "run", "train.steps=50", "train.log_every=1", f"dist.timeout_s={timeout_s}",
                     source=tiny_shards)
    cmd = accelerate_cmd(2, HARNESS, args) if launcher == "accelerate" else torchrun_cmd(2, HARNESS, args)
    # Timed from rank 0's step-1 row (an event), not from the start: the timeout + 10 s grace + the
    # launcher's own shutdown, with room for a loaded 2-core machine; a hang without the timeout
    # would run into the limit.
    result = launch_timed_from_first_row(cmd, {"DISTGAN_TEST_FAIL": f"1:2:{mode}"}, tmp_path / "run", limit=150)
    assert result.returncode != 0, tail(result)
    assert not (tmp_path / "run" / "DONE").exists()
    assert result.seconds < timeout_s + 60, f"still running {result.seconds:.0f} s after step 1\n{tail(result)}"
    out = result.output
    if mode == "raise":
        assert "stopped because another rank failed (rank 1: RuntimeError: injected failure" in out, tail(result)
    elif mode == "kill":
        assert "exitcode: -9" in out and "local_rank: 1" in out, tail(result)  # torchrun names the killed rank
    else:
        assert "rank(s) 1 stopped taking part in collectives" in out, tail(result)
        assert f"dist.timeout_s={timeout_s}" in out


def test_python_api_under_debug_launcher(tiny_shards, tmp_path):
    """`distgan.train(overrides=...)` in each process of accelerate's in-notebook launcher.

    Run from a fresh interpreter, as a notebook kernel would be: the launcher forks its caller,
    and a pytest process that trained in-process earlier carries accelerate's state into the fork.
    """
    run_dir = tmp_path / "nb"
    overrides = dict(a.split("=", 1) for a in tiny_args(run_dir, "train.steps=2", "dist.expect_world_size=2",
                                                         source=tiny_shards))
    script = ("import json, sys\n"
              "from accelerate import debug_launcher\n"
              "import distgan\n"
              "def train(overrides):\n"
              "    distgan.train(overrides=overrides)\n"
              "debug_launcher(train, args=(json.loads(sys.argv[1]),), num_processes=2)\n")
    result = launch([sys.executable, "-c", script, json.dumps(overrides)])
    assert result.returncode == 0, tail(result)
    assert (run_dir / "DONE").exists()
    state = json.loads(next((run_dir / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["world_size"] == 2


def test_compile_keeps_plain_state_dict_names(tiny_shards, tmp_path):
    """dist.compile=true trains, and checkpoints/EMA keep the eager module's names (no _orig_mod.)."""
    run = tmp_path / "compiled"
    # aot_eager: dynamo + AOTAutograd as with inductor, without its ~40 s of code generation here.
    result = launch([sys.executable, str(TRAIN), *tiny_args(run, "dist.compile=true", "train.steps=2", "loss.r1_gamma=0.5",
                                                            "loss.r1_interval=2", source=tiny_shards)],
                    {"DISTGAN_COMPILE_BACKEND": "aot_eager"}, timeout=400)
    assert result.returncode == 0, tail(result)
    ckpt = next((run / "checkpoints").glob("step-*"))
    for name in ("G", "D", "G_ema"):
        keys = load_file(str(ckpt / f"{name}.safetensors")).keys()
        assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys), (name, list(keys)[:3])


def test_unsupported_combinations_are_refused_up_front():
    from distgan.backends import check_combination
    from distgan.config import ConfigError, load_config

    cases = {
        ("dist.mixed_precision=fp16",): "use dist.mixed_precision=bf16",
        ("dist.backend=deepspeed", "dist.fsdp=true"): "use ZeRO instead",
        ("dist.backend=deepspeed", "dist.zero_stage=3"): "Use dist.zero_stage=2",
        ("dist.backend=deepspeed", "dist.compile=true"): "use dist.backend=accelerate",
        ("dist.fsdp=true", "loss.r1_gamma=1"): "double backward",
        ("dist.fsdp=true", "loss.objective=wgan-gp"): "double backward",
    }
    for overrides, hint in cases.items():
        with pytest.raises(ConfigError, match=hint):
            check_combination(load_config(None, list(overrides)), cuda=False)
    for ok in (["dist.backend=deepspeed", "dist.zero_stage=2", "dist.mixed_precision=bf16"], ["dist.fsdp=true"]):
        check_combination(load_config(None, ok), cuda=False)


def test_world_size_checks():
    from distgan.distributed import WorldSizeError, check_world_size, discover, parse_accelerate_launch

    with pytest.raises(WorldSizeError, match="expect_world_size=2"):
        check_world_size(2, 1)
    assert parse_accelerate_launch(["python", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "t.py",
                                    "--num_processes", "9"]) == 2
    assert parse_accelerate_launch(["python", "/v/bin/accelerate", "launch", "--num_processes=3", "t.py"]) == 3
    assert parse_accelerate_launch(["python", "train.py"]) == 0
    slurm = discover({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                      "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.source) == (3, 4, 1, "gpu07", "slurm")
    # torchrun's variables win over SLURM's (slurm/train.sh runs accelerate launch inside srun).
    both = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})
    assert (both.rank, both.world_size, both.source) == (5, 8, "torchrun")
    # Inside the batch shell (no step), SLURM's task count is not this process's world.
    assert discover({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}).world_size == 1
