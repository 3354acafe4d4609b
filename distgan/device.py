"""The device policy, in one place: every backend asks here instead of deciding for itself.

* **Which GPU a rank takes.** `local_rank % device_count`, as Accelerate does. Under SLURM's
  per-task binding (`srun --gpus-per-task=1`) every task sees exactly one GPU
  (CUDA_VISIBLE_DEVICES holds one id), so its device is `cuda:0` whatever its local rank is;
  `torch.device("cuda", local_rank)` would be an invalid ordinal on every rank but local rank 0.
  More local ranks than visible GPUs *without* such a binding would put two ranks on one GPU
  (NCCL then fails with "Duplicate GPU detected"): refused with a message that says what to do.
* **What DeepSpeed must see in LOCAL_RANK.** DeepSpeed's engine calls
  `set_device(int(os.environ["LOCAL_RANK"]))` itself, so LOCAL_RANK has to be the device index
  chosen here, not the rank's position on the node.
* **Which precision `dist.mixed_precision=auto` means** on this machine (`auto_precision`).
* **Numerics flags**: TF32 off around evaluation (`exact_fp32`), deterministic mode and the cuDNN
  autotuner (`apply_numerics`), and the Adam implementation (`adam_kwargs`).

Everything that decides is a pure function of (environment, device count, compute capability),
so it is tested on CPU with the environments a cluster sets (tests/unit/test_device.py); the
functions that apply a decision are thin.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from distgan.errors import ConfigError, DistributedError

BF16_NATIVE_CAPABILITY = (8, 0)
"""Ampere and newer compute bf16 natively. `torch.cuda.is_bf16_supported()` is also True on
V100/T4 (bf16 emulated, several times slower than fp16), so it must not decide `auto`."""

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS needs a fixed workspace for deterministic results (CUDA >= 10.2); set before its first call."""


# ---------------------------------------------------------------------------- which GPU


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPU ids in CUDA_VISIBLE_DEVICES (None when it is unset: every GPU is visible)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def bound_per_task(env: Mapping[str, str], device_count: int) -> bool:
    """Whether SLURM gave this task its own GPUs (`--gpus-per-task`, or `--gpu-bind` on a step):
    then the GPUs this process sees are its own, and two local ranks never see the same one."""
    # Not SLURM_STEP_GPUS: a step started with `--gpus=N` sets it too, and then every task sees every GPU.
    slurm_binding = "SLURM_GPUS_PER_TASK" in env or "SLURM_GPU_BIND" in env
    visible = visible_gpus(env)
    return slurm_binding and visible is not None and len(visible) == device_count


def gpu_index(local_rank: int, local_world_size: int, device_count: int, env: Mapping[str, str]) -> int:
    """The CUDA device index of this rank: `local_rank % device_count`.

    Refuses a node with more ranks than visible GPUs unless SLURM bound GPUs per task (each
    task then sees only its own, and `local_rank % 1 == 0` is right)."""
    if device_count < 1:
        raise DistributedError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES="
                               f"{env.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); set ACCELERATE_USE_CPU=1 to train on the CPU.")
    if local_world_size > device_count and not bound_per_task(env, device_count):
        raise DistributedError(
            f"{local_world_size} processes on this node but only {device_count} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): two ranks would share a GPU. Start "
            f"at most {device_count} processes per node (--num_processes / --nproc_per_node / --ntasks-per-node), or "
            "bind one GPU per task with `srun --gpus-per-task=1` (see launch/README.md).")
    return local_rank % device_count


@dataclass(frozen=True)
class Placement:
    """Where this rank runs."""

    device: torch.device
    local_rank_env: str | None
    """What LOCAL_RANK must say for DeepSpeed (which sets the device from it); None: leave it."""


def placement(cpu: bool, local_rank: int, local_world_size: int, device_count: int,
              env: Mapping[str, str]) -> Placement:
    """The device of this rank and the LOCAL_RANK DeepSpeed must read (pure: no CUDA call)."""
    if cpu:
        return Placement(torch.device("cpu"), None)
    index = gpu_index(local_rank, local_world_size, device_count, env)
    return Placement(torch.device("cuda", index), str(index))


def place_this_process(cpu: bool, local_rank: int, local_world_size: int) -> Placement:
    """`placement` for this process; on a GPU, makes the chosen device current (before NCCL
    starts, so that every rank's communicator uses its own GPU) and points LOCAL_RANK at it."""
    where = placement(cpu, local_rank, local_world_size, 0 if cpu else torch.cuda.device_count(), os.environ)
    if where.device.type == "cuda":
        torch.cuda.set_device(where.device)
        os.environ["LOCAL_RANK"] = where.local_rank_env
    return where


def pins_host_memory(cuda_available: bool, env: Mapping[str, str]) -> bool:
    """Whether the data loader pins its batches: only when this process trains on a GPU.

    `ACCELERATE_USE_CPU=1` on a GPU machine trains on the CPU; pinning there would only start
    a CUDA context in the loader's pin thread (on GPU 0, for every rank: memory taken on a GPU
    the run does not use) for copies that never happen."""
    return cuda_available and env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def indexed(device: torch.device, current_index: Callable[[], int] = torch.cuda.current_device) -> torch.device:
    """`device` with its index: a bare `cuda` (Accelerate's device in a single process) is the
    calling thread's current GPU. Call it on the thread that set the device, not on another one."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", current_index())
    return device


def use_in_this_thread(device: torch.device | None) -> None:
    """Make `device` (an `indexed` one) current in the calling thread (nothing for the CPU).

    The CUDA current device is per thread: a thread started after `set_device(cuda:3)` still has
    cuda:0 current. A DataLoader iterated in such a thread starts its pin-memory thread on the
    thread's current device, so every rank of a node would create a CUDA context (hundreds of
    MiB) on GPU 0 and pin there; the data threads call this first."""
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # needs an index: `set_device(torch.device("cuda"))` raises


# ---------------------------------------------------------------------------- precision


def auto_precision(cuda: bool, capability: tuple[int, int] | None) -> tuple[str, str]:
    """What `dist.mixed_precision=auto` resolves to, and why (one line for the log).

    * a GPU with compute capability >= 8.0 (Ampere, Hopper, ...): `bf16` (native; no loss scaling);
    * an older GPU (V100, T4): `fp16` with loss scaling (their bf16 is emulated and slow);
    * the CPU: `no`. CPU bf16 autocast is faster on CPUs with AVX512-BF16/AMX, but slower or
      barely faster elsewhere, and it changes the numbers of every CPU test and smoke run;
      fp32 is the safe default there (ask for bf16 explicitly where it pays).
    """
    if not cuda:
        return "no", "training on the CPU (fp32 is the safe default; set dist.mixed_precision=bf16 to opt in)"
    if capability is None:
        raise ValueError("auto_precision needs the GPU's compute capability")
    name = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) >= BF16_NATIVE_CAPABILITY:
        return "bf16", f"GPU with {name} computes bf16 natively"
    return "fp16", f"GPU with {name} has no native bf16 (< 8.0): fp16 with loss scaling"


def gpu_capability() -> tuple[int, int]:
    """Compute capability of the current GPU."""
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


# ---------------------------------------------------------------------------- numerics flags


def _readable(getter):
    """A TF32 flag, or None where torch refuses to read it (see `exact_fp32`)."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls inside, restored after.

    PyTorch's default `cudnn.allow_tf32=True` runs fp32 convolutions in TF32 on Ampere and newer,
    which moves Inception features (and so FID) away from the published protocol.

    torch 2.13 keeps TF32 twice: the legacy flags (`allow_tf32`, `set_float32_matmul_precision`)
    and the `fp32_precision` API, and its legacy getters raise ("mix of the legacy and new APIs")
    when the two disagree. A user or library that set `torch.backends.cuda.matmul.fp32_precision
    = "tf32"` leaves them disagreeing, so reading `matmul.allow_tf32` here would crash the
    evaluation. So: save the new-API values (always readable) and the legacy ones where they can
    be read, set both APIs to exact fp32 (consistent inside: every getter reads "off"), and
    restore both; tests/unit/test_cuda_policy.py checks every starting state on the CPU."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    legacy_matmul = _readable(torch.get_float32_matmul_precision)
    legacy_cudnn = _readable(lambda: cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    cudnn.allow_tf32 = False
    cudnn.fp32_precision = cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        # Legacy first, then the new API's values: that order gives back exactly the state found.
        if legacy_matmul is not None:
            torch.set_float32_matmul_precision(legacy_matmul)
        if legacy_cudnn is not None:
            cudnn.allow_tf32 = legacy_cudnn
        cuda.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


@dataclass(frozen=True)
class Numerics:
    """The process-wide flags `apply_numerics` sets."""

    deterministic: bool
    cudnn_benchmark: bool
    cublas_workspace: str | None
    """CUBLAS_WORKSPACE_CONFIG to set (None: leave the environment alone)."""


def numerics(deterministic: bool, cudnn_benchmark: bool, env: Mapping[str, str]) -> Numerics:
    """Deterministic mode wins over the autotuner (its choice of algorithm may differ per run); a
    CUBLAS_WORKSPACE_CONFIG the user set is kept."""
    workspace = None
    if deterministic and "CUBLAS_WORKSPACE_CONFIG" not in env:
        workspace = CUBLAS_WORKSPACE
    return Numerics(deterministic, cudnn_benchmark and not deterministic, workspace)


def apply_numerics(deterministic: bool, cudnn_benchmark: bool) -> Numerics:
    """Set the flags of `numerics` for this process (each backend calls it when it starts, before
    any model runs and so before the first cuBLAS call)."""
    chosen = numerics(deterministic, cudnn_benchmark, os.environ)
    if chosen.cublas_workspace is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = chosen.cublas_workspace
    torch.backends.cudnn.benchmark = chosen.cudnn_benchmark
    torch.backends.cudnn.deterministic = chosen.deterministic
    # warn_only=False: an op without a deterministic implementation raises (naming the op)
    # instead of silently breaking the promise of train.deterministic=true.
    torch.use_deterministic_algorithms(chosen.deterministic, warn_only=False)
    return chosen


ADAM_IMPLS = ("auto", "fused", "foreach", "loop")


def adam_kwargs(impl: str, cuda: bool, grad_scaler: bool = False) -> dict[str, bool]:
    """torch.optim.Adam's implementation switches for `optim.adam_impl`.

    auto: fused on CUDA (one kernel for all parameters), foreach on the CPU. Fused Adam exists on
    the CPU in torch 2.13 and was faster there too (3.8M parameters, 1 thread: fused 6 ms, foreach
    14 ms, loop 57 ms per step), but a CPU step is dominated by the networks (~1 s), and foreach
    is the implementation every CPU test of the backends ran with; `fused` is there to opt in.

    `grad_scaler`: a torch GradScaler steps this optimizer (Accelerate in fp16). auto is then
    foreach, and `fused` is refused: fused Adam takes the scaler's inf/NaN flag into its kernel
    (`_step_supports_amp_scaling`), so `scaler.step` always calls `optimizer.step`, and Accelerate,
    which detects a skipped step by the step call not happening, reports every overflow as applied
    (skipped steps would read 0 on a V100/T4 run with `auto` precision)."""
    if impl == "auto":
        impl = "fused" if cuda and not grad_scaler else "foreach"
    if impl == "fused" and grad_scaler:
        raise ConfigError("optim.adam_impl=fused cannot run under fp16 loss scaling with Accelerate (its skipped-step "
                         "detection misses the fused kernel's own skip): use optim.adam_impl=foreach or auto, or "
                         "dist.mixed_precision=bf16 on a GPU with compute capability >= 8.0.")
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True, "fused": False}
    if impl == "loop":
        return {"foreach": False, "fused": False}
    raise ValueError(f"optim.adam_impl={impl!r}: use one of {', '.join(ADAM_IMPLS)}")


def to_memory_format(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """`dist.channels_last`: the module's 4-d weights in NHWC (in place; nothing when off).

    Only the weights: the input batches follow by themselves in convolutions (cuDNN picks
    channels_last output for a channels_last weight), and converting the batch before G/D is the
    data path's job. State dicts stay loadable either way: `load_state_dict` copies values, not
    strides, and checkpoints are written contiguous (`checkpoint.format`)."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module
