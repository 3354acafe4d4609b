"""The device policy (distgan/device.py) with the environments launchers and SLURM set, and the
numerics flags it applies; all on CPU, capability and device count passed in."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from distgan.backends import check_combination
from distgan.backends.accelerate import start_accelerator
from distgan.backends.base import AdamSpec, resolve_precision
from distgan.checkpoint.format import write_weights
from distgan.config import ConfigError, load_config
from distgan.device import (CUBLAS_WORKSPACE, adam_kwargs, apply_numerics, auto_precision, exact_fp32, gpu_index,
                            numerics, placement, to_memory_format)
from distgan.distributed import discover
from distgan.errors import DistributedError
from distgan.metrics.extractors import TinyExtractor
from distgan.models import build_models

# `srun --ntasks-per-node=4 --gpus-per-task=1` on a 4-GPU node, as seen by the task of local rank 3:
# SLURM binds GPU 3 to it, so it sees one GPU (cuda:0) whatever its local rank.
SRUN_BOUND = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_STEP_NUM_NODES": "2",
              "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "42",
              "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "3"}
# The same step without binding (`srun --ntasks-per-node=4 --gpus=2`): every task sees both GPUs.
SRUN_UNBOUND = {k: v for k, v in SRUN_BOUND.items() if k != "SLURM_GPUS_PER_TASK"} | {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_torchrun_ranks_take_their_own_gpu():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    info = discover(env)
    where = placement(False, info.local_rank, info.local_world_size, device_count=8, env=env)
    assert where.device == torch.device("cuda", 5) and where.local_rank_env == "5"


def test_srun_with_one_gpu_per_task_uses_the_one_gpu_it_sees():
    info = discover(SRUN_BOUND)
    assert (info.rank, info.local_rank, info.local_world_size) == (7, 3, 4)
    where = placement(False, info.local_rank, info.local_world_size, device_count=1, env=SRUN_BOUND)
    # cuda:3 would be an invalid ordinal here; DeepSpeed must read LOCAL_RANK=0 to pick the same GPU.
    assert where.device == torch.device("cuda", 0) and where.local_rank_env == "0"


def test_more_ranks_than_gpus_without_binding_is_refused():
    info = discover(SRUN_UNBOUND)
    with pytest.raises(DistributedError, match=r"4 processes on this node but only 2 GPU\(s\).*gpus-per-task=1"):
        placement(False, info.local_rank, info.local_world_size, device_count=2, env=SRUN_UNBOUND)
    with pytest.raises(DistributedError, match="no CUDA device"):
        gpu_index(0, 1, 0, {})


def test_fewer_ranks_than_gpus_and_the_cpu():
    assert gpu_index(1, 2, 4, {}) == 1
    where = placement(True, 3, 4, device_count=0, env=SRUN_BOUND)
    assert where.device == torch.device("cpu") and where.local_rank_env is None


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 9), "bf16"),
                                                 ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 0), "fp16")])
def test_auto_precision_follows_compute_capability(capability, expected):
    precision, why = auto_precision(True, capability)
    assert precision == expected and f"{capability[0]}.{capability[1]}" in why


def test_auto_precision_on_cpu_is_fp32_and_resolved_before_the_checks(monkeypatch, caplog):
    assert auto_precision(False, None)[0] == "no"
    # auto never reaches a backend or check_combination unresolved; explicit wins over the launcher.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = load_config(None, ["dist.mixed_precision=auto"])
    with caplog.at_level(logging.INFO, logger="distgan"):
        assert resolve_precision(cfg, cuda=False) == "no"
        assert resolve_precision(cfg, cuda=True, capability=(7, 0)) == "fp16"
    assert "dist.mixed_precision=auto -> fp16" in caplog.text
    assert resolve_precision(load_config(None, []), cuda=False) == "bf16"  # empty: the launcher's value
    check_combination(cfg, cuda=False)  # auto on CPU is fp32, not the refused fp16
    with pytest.raises(ConfigError, match="fsdp=true with fp16"):
        check_combination(load_config(None, ["dist.mixed_precision=auto", "dist.fsdp=true"]), cuda=True, capability=(7, 0))
    check_combination(load_config(None, ["dist.mixed_precision=auto", "dist.fsdp=true"]), cuda=True, capability=(8, 0))


def test_accelerator_is_created_with_the_resolved_precision(monkeypatch, fresh_accelerator):
    """A launch config saying `mixed_precision: 'no'` (or anything) with dist.mixed_precision=auto:
    the Accelerator gets what auto resolved to (here on CPU: no, over the launcher's bf16)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert str(start_accelerator(load_config(None, ["dist.mixed_precision=auto"])).mixed_precision) == "no"
    AcceleratorState._reset_state()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert str(start_accelerator(load_config(None, ["dist.mixed_precision=bf16"])).mixed_precision) == "bf16"


@pytest.mark.parametrize("before", [True, False])
def test_exact_fp32_turns_tf32_off_inside_and_restores(before):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = before
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), exact_fp32():
            raise RuntimeError("an evaluation that fails")
        assert torch.backends.cudnn.allow_tf32 is before and torch.backends.cuda.matmul.allow_tf32 is before
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_feature_extraction_runs_without_tf32():
    seen = []
    extractor = TinyExtractor()
    extractor.net.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                                                torch.backends.cuda.matmul.allow_tf32)))
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        extractor(torch.zeros(2, 3, 16, 16))
        assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_deterministic_mode_wins_over_the_autotuner():
    assert numerics(True, True, {}).cudnn_benchmark is False
    assert numerics(True, True, {}).cublas_workspace == CUBLAS_WORKSPACE
    assert numerics(True, True, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}).cublas_workspace is None  # the user's stays
    assert numerics(False, True, {}) == numerics(False, True, {"X": "1"})
    assert not numerics(False, True, {}).deterministic and numerics(False, True, {}).cudnn_benchmark


@pytest.fixture
def restore_numerics(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


def test_apply_numerics_sets_the_process_flags(restore_numerics):
    import os
    apply_numerics(True, True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    apply_numerics(False, True)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_a_deterministic_run_trains(tmp_path, tiny_shards, restore_numerics):
    """train.deterministic=true with bgc augmentation, R1 and DiffAugment: no op on the CPU path
    lacks a deterministic implementation (it would raise), and the backend turned the mode on.
    Also fused Adam and channels_last weights, through a checkpoint."""
    from tests.helpers.inprocess import train_in_process

    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}", f"data.source={tiny_shards}", "data.resolution=16",
                             "data.batch_size=4", "data.workers=0", "model.z_dim=8", "model.g_width=8", "model.d_width=8",
                             "train.steps=2", "train.log_every=1", "train.sample_every=1000", "logging.wandb=off",
                             "train.progress=false", "loss.augment=bgc", "loss.augment_p=0.5", "loss.r1_gamma=1",
                             "loss.r1_interval=1", "loss.diffaugment=translation", "train.deterministic=true",
                             "optim.adam_impl=fused", "dist.channels_last=true"])

    rows = train_in_process(cfg)
    assert rows and rows[-1]["step"] == 2
    assert torch.are_deterministic_algorithms_enabled()


def test_adam_impl_choices():
    assert adam_kwargs("auto", cuda=True) == {"fused": True}
    assert adam_kwargs("auto", cuda=False) == {"foreach": True, "fused": False}
    assert adam_kwargs("loop", cuda=True) == {"foreach": False, "fused": False}
    p = [torch.nn.Parameter(torch.ones(3))]
    for impl, flag in (("fused", "fused"), ("foreach", "foreach")):
        opt = AdamSpec(1e-3, (0.5, 0.99), impl).build(p)
        assert opt.defaults[flag] is True
    with pytest.raises(ConfigError, match="optim.adam_impl"):
        load_config(None, ["optim.adam_impl=fast"])


def test_channels_last_weights_save_and_load_as_plain_tensors(tmp_path):
    cfg = load_config(None, ["data.resolution=16", "model.g_width=8", "model.d_width=8", "model.z_dim=8"])
    G, D = build_models(cfg.model, 16, 3, 0)
    to_memory_format(D, True)
    convs = [p for p in D.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    write_weights(tmp_path, "D", D)  # safetensors refuses non-contiguous tensors: the writer makes them contiguous
    saved = load_file(str(tmp_path / "D.safetensors"))
    _, plain = build_models(cfg.model, 16, 3, 0)
    plain.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), D.state_dict().values()))
    to_memory_format(plain, True).load_state_dict(saved)  # and back into a channels_last module
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.ndim == 4)
