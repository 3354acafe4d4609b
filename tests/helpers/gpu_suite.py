"""What the GPU suite (tests/gpu, `make test-gpu`) runs, written once for any device.

Each check takes the device's part from the environment (accelerate puts a run on the GPU when
there is one), so tests/unit/test_gpu_suite_cpu.py runs the same functions on the CPU in the
normal suite and tests/gpu runs them on CUDA: only what needs a GPU stays untested on CI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from distgan.config import load_config
from distgan.trainer import TrainerHooks
from tests.helpers import REPO, tiny_overrides
from tests.helpers.inprocess import train_in_process
from tests.helpers.launch import env as cpu_launch_env

ARCHS = ("dcgan", "resnet", "r3gan", "stylegan2", "fastgan", "projected")
SMALL = {"dcgan": [], "resnet": [], "r3gan": ["model.widths=[16,16,8]"],
         "stylegan2": ["model.widths=[16,16,8]", "model.w_dim=16", "model.mapping_layers=2"],
         "fastgan": ["model.g_width=4"],
         "projected": ["model.arch=dcgan", "model.d_arch=projected", "model.projected_scales=2",
                       "loss.objective=hinge"]}
"""Small networks at the tiny shards' 16x16: r3gan and stylegan2 take one width per stage (4, 8, 16).
`projected` is DCGAN's G on the projected discriminator (its own later `model.arch` wins)."""


class DeviceProbe(TrainerHooks):
    """Records where and in which precision the trainer really ran."""

    def __init__(self):
        self.device, self.precision = None, None

    def step_start(self, trainer) -> None:
        self.device, self.precision = trainer.backend.device.type, trainer.backend.mixed_precision


def arch_config(arch: str, shards: Path, run_dir: Path, precision: str, steps: int = 20, *extra: str):
    """`arch` at a small width on the tiny shards for `steps` steps in `precision`."""
    return load_config(None, tiny_overrides(shards, run_dir, f"model.arch={arch}", *SMALL[arch],
                                            f"dist.mixed_precision={precision}", f"train.steps={steps}",
                                            "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=1000",
                                            "train.resume=none", "train.health_checks=false", *extra))


def train_arch(arch: str, shards: Path, run_dir: Path, precision: str, steps: int = 20, *extra: str) -> tuple[list[dict], DeviceProbe]:
    """Train it in this process; the metric rows and where it ran."""
    probe = DeviceProbe()
    rows = train_in_process(arch_config(arch, shards, run_dir, precision, steps, *extra), hooks=[probe])
    return rows, probe


def assert_finite_losses(rows: list[dict], steps: int, what: str) -> None:
    """One row per step, each phase's loss a finite float, and the losses moved."""
    rows = [r for r in rows if "Dmain/loss" in r]
    assert len(rows) == steps, f"{what}: {len(rows)} metric rows for {steps} steps"
    for key in ("Dmain/loss", "Gmain/loss"):
        values = [r[key] for r in rows]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), f"{what}: {key} = {values}"
        assert max(values) > min(values), f"{what}: {key} never changed: {values}"


class SyncGuard(TrainerHooks):
    """`torch.cuda.set_sync_debug_mode("error")` for every step after the first that is not a log
    step: a step that waits for the device (`.item()`, a blocking copy, `torch.tensor(list,
    device=...)`) raises there. Log steps read their statistics back once, by design, and the first
    step sets things up once (optimizer state, the cuDNN autotuner), so those run unguarded."""

    def __init__(self, log_every: int):
        self.log_every, self.guarded = log_every, 0

    def step_start(self, trainer) -> None:
        step = trainer.state.step  # 0-based: the step about to run
        guard = step > 0 and (step + 1) % self.log_every != 0
        torch.cuda.set_sync_debug_mode("error" if guard else "default")
        self.guarded += guard

    def fit_end(self, trainer, status: str) -> None:
        torch.cuda.set_sync_debug_mode("default")


def deterministic_resume(shards: Path, tmp: Path, arch: str = "dcgan", precision: str = "no") -> tuple[Path, Path]:
    """Run A trains 6 steps (checkpoints at 3 and 6); run B resumes A's step-3 checkpoint in another
    folder and trains to 6. Under `train.deterministic=true` both step-6 checkpoints must be equal
    bit for bit (tests/helpers/resume.assert_identical). Returns the two step-6 checkpoint folders."""
    from tests.helpers.resume import ckpt

    common = ("train.deterministic=true", "train.ckpt_every=3")
    train_in_process(arch_config(arch, shards, tmp / "a", precision, 6, *common))
    train_in_process(arch_config(arch, shards, tmp / "b", precision, 6, *common,
                                 f"train.resume={ckpt(tmp / 'a', 3)}"))
    return ckpt(tmp / "a", 6), ckpt(tmp / "b", 6)


def gpu_env(**extra: str) -> dict[str, str]:
    """The launch environment of tests/helpers/launch.py without ACCELERATE_USE_CPU (so a run
    takes the GPU when there is one)."""
    e = cpu_launch_env(**extra)
    if "ACCELERATE_USE_CPU" not in extra:
        e.pop("ACCELERATE_USE_CPU", None)
    return e


def torchrun_train(args: list[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 1 distgan/train.py ARGS`, as a user starts a one-GPU run."""
    from tests.helpers.launch import TRAIN, torchrun_cmd

    return subprocess.run(torchrun_cmd(1, TRAIN, args), cwd=REPO, env=gpu_env(**extra_env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


BACKENDS = {"zero0": ["dist.backend=deepspeed", "dist.zero_stage=0"],
            "zero1": ["dist.backend=deepspeed", "dist.zero_stage=1"],
            "zero2": ["dist.backend=deepspeed", "dist.zero_stage=2"],
            "fsdp": ["dist.fsdp=true"]}
"""The backends checked at world size 1 through a checkpoint and a resume (no R1: FSDP refuses it)."""


def backend_resume(name: str, shards: Path, tmp: Path, precision: str, **extra_env: str) -> tuple[Path, Path]:
    """Like `deterministic_resume`, through torchrun and backend `name`: run A 4 steps
    (checkpoints at 2 and 4), run B from A's step 2 to 4 in another folder."""
    from tests.helpers.resume import ckpt

    common = [*BACKENDS[name], f"dist.mixed_precision={precision}", "train.deterministic=true", "train.steps=4",
              "train.ckpt_every=2", "loss.r1_gamma=0", "loss.objective=logistic", "optim.d_steps=1"]
    for run, resume in (("a", "none"), ("b", str(ckpt(tmp / "a", 2)))):
        args = tiny_overrides(shards, tmp / run, *common, f"train.resume={resume}")
        proc = torchrun_train(args, **extra_env)
        assert proc.returncode == 0, f"{name} run {run}:\n{proc.stdout[-4000:]}"
    return ckpt(tmp / "a", 4), ckpt(tmp / "b", 4)


@contextmanager
def tf32_off():
    """Exact fp32 convolutions and matmuls on the GPU (Ampere+ default to TF32 for convolutions)."""
    from distgan.device import exact_fp32

    with exact_fp32():
        yield


def inception_features(images: torch.Tensor, device: str) -> torch.Tensor:
    """Inception pool3 features of `images` ([-1, 1]) computed on `device` with TF32 off, from the
    weights the `inception` extra installs (never downloaded here)."""
    from distgan.metrics import build_extractor

    extractor = build_extractor("inception", device=device, allow_download=False)
    with torch.no_grad(), tf32_off():
        return extractor(images.to(device)).cpu()


def bench_loop(recipe: str, steps: int, rounds: int, *overrides: str, timeout: float = 300, **extra_env: str) -> dict:
    """`distgan bench loop --config RECIPE` in a fresh process (its own peak memory); its JSON."""
    cmd = [sys.executable, "-m", "distgan", "bench", "loop", "--config", str(REPO / "configs" / f"{recipe}.yaml"),
           "--steps", str(steps), "--rounds", str(rounds), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=gpu_env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_table(rows: list[dict]) -> str:
    """A markdown table of `bench_loop` reports: per recipe, compile setting and loop."""
    lines = ["| recipe | batch/GPU | precision | compile | loop | img/s | sec/kimg | peak MiB | ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for loop in ("distgan", "plain"):
            m = r[loop]
            lines.append(f"| {r['recipe']} | {r['batch']} | {r['precision']} | {r['compile'] if loop == 'distgan' else '-'} "
                         f"| {loop} | {m['img_per_s']} | {m['sec_per_kimg']} | {m['peak_mib']} | {r[f'{loop}_ms_per_step']} |")
    return "\n".join(lines) + "\n"


def output_dir() -> Path:
    """Where the suite leaves files: $OUT when set (a lent machine brings it back), else runs/."""
    out = Path(os.environ.get("OUT") or REPO / "runs")
    out.mkdir(parents=True, exist_ok=True)
    return out
