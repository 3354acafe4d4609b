"""`train.deterministic=true` on CUDA, checked from the CPU (issue 19).

On CUDA, deterministic algorithms make `grid_sample`'s and bilinear `interpolate`'s backward raise;
under that flag bgc's warp and r3gan's upsampling switch to equivalents built from gather and
shifted adds. Here: those equal the originals (forward and gradients); a deterministic r3gan + bgc
run repeats and resumes bit for bit and runs none of the ops that raise on CUDA (its aten ops are
recorded); the table of what is and is not exact (distgan/exactness.py) names ops the step really
runs and is what launch/README.md prints. And DeepSpeed's fp16 dynamic loss scale survives a
checkpoint, on real fp16 engines at ZeRO 0 and 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distgan.exactness import EXACT_ALWAYS, NOT_EXACT_ON_CUDA_WITHOUT_DETERMINISTIC, RAISES_ON_CUDA_WHEN_DETERMINISTIC
from distgan.gan.augpipe import AugmentPipe
from distgan.gan.sampler import gather_sample
from distgan.models.r3gan import upsample2x_bilinear
from tests.helpers import DEEPSPEED_CPU_PRELUDE, REPO
from tests.helpers.gpu_suite import arch_config
from tests.helpers.inprocess import train_in_process
from tests.helpers.resume import assert_identical, ckpt


class AtenOps(TorchDispatchMode):
    """The names of the aten ops that run inside (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deterministic_flag(monkeypatch):
    """Restores the process-wide flags that `torch.use_deterministic_algorithms` and a
    train.deterministic run change."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


def _grids(n: int, h: int, w: int) -> list[torch.Tensor]:
    """Random positions reaching far outside the image (every reflection case), and the affine
    grids the bgc pipeline builds (identity, a whole-pixel shift, a rotation with scaling)."""
    g = torch.Generator().manual_seed(1)
    grids = [(torch.rand(n, h, w, 2, generator=g) * 2 - 1) * 3.5]
    theta = torch.eye(3)[:2].expand(n, 2, 3).clone()
    shifted = theta.clone()
    shifted[:, 0, 2] = 2 * 3 / w
    a = torch.tensor(0.7)
    turned = torch.stack([torch.stack([a.cos() * 1.3, -a.sin(), torch.tensor(0.1)]),
                          torch.stack([a.sin(), a.cos() * 1.3, torch.tensor(-0.2)])]).expand(n, 2, 3)
    grids += [F.affine_grid(t, [n, 3, h, w], align_corners=False) for t in (theta, shifted, turned)]
    return grids


@pytest.mark.parametrize("padding", ["reflection", "zeros"])
@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 1, 8, 12)])
def test_gather_sample_equals_grid_sample_forward_and_gradients(shape, padding):
    """The padding modes and corners bgc uses: bilinear, align_corners=False, reflection (one
    sample, `loss.augment_supersample=false`) or zeros (the supersampled warp). Also the second
    derivative (R1 differentiates through the warp of the reals)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for grid in _grids(shape[0], shape[2], shape[3]):
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
        out = gather_sample(x, grid, padding)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        upstream = torch.randn_like(ref).requires_grad_(True)
        (g_ref,) = torch.autograd.grad(ref, x, upstream, create_graph=True)
        (g_out,) = torch.autograd.grad(out, x, upstream, create_graph=True)
        torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=0)
        (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), upstream)
        (gg_out,) = torch.autograd.grad(g_out.square().sum(), upstream)
        torch.testing.assert_close(gg_out, gg_ref, atol=1e-4, rtol=1e-5)


def test_bgc_warps_with_gather_only_under_deterministic_algorithms(deterministic_flag):
    """The fast path (grid_sample) stays when the flag is off; under it the pipeline runs no op
    that raises on CUDA, and augments the same way (the draws do not depend on the flag)."""
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {}
    for flag in (False, True):
        torch.use_deterministic_algorithms(flag)
        x = images.clone().requires_grad_(True)
        with AtenOps() as ops:
            out = AugmentPipe(p=1.0, generator=torch.Generator().manual_seed(3))(x)
            out.square().sum().backward()
        results[flag] = out.detach(), x.grad, ops.names
    (fast, fast_grad, fast_ops), (exact, exact_grad, exact_ops) = results[False], results[True]
    assert {"grid_sampler_2d", "grid_sampler_2d_backward"} <= fast_ops and "gather" not in fast_ops
    assert "gather" in exact_ops and not exact_ops & set(RAISES_ON_CUDA_WHEN_DETERMINISTIC)
    # Relative: the color ops scale values and gradients (up to ~20 here) after the warp. 1e-5: the
    # supersampled warp samples a 2x canvas ~90 px wide, whose float32 coordinates the two
    # samplers round differently (~3e-6 px).
    torch.testing.assert_close(exact, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exact_grad, fast_grad, atol=1e-3, rtol=1e-5)  # gradients reach ~900 here


@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (1, 3, 7, 5), (2, 4, 16, 16)])
def test_r3gan_upsampling_equals_its_interpolate_path_under_deterministic_algorithms(shape, deterministic_flag):
    """The fast path (bilinear `interpolate` with zero-padded edges, checked against upfirdn2d in
    test_r3gan.py) and the shifted-adds path agree in forward and gradient, border included."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.use_deterministic_algorithms(False)
    ref = upsample2x_bilinear(x)
    upstream = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    torch.use_deterministic_algorithms(True)
    with AtenOps() as ops:
        out = upsample2x_bilinear(x)
        (g_out,) = torch.autograd.grad(out, x, upstream)
    assert "upsample_bilinear2d" not in ops.names and not ops.names & set(RAISES_ON_CUDA_WHEN_DETERMINISTIC)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=0)
    torch.use_deterministic_algorithms(False)
    with AtenOps() as ops:
        upsample2x_bilinear(x)
    assert "upsample_bilinear2d" in ops.names  # the fast path when the flag is off


RUN = ("loss.augment=bgc", "loss.augment_p=0.5", "loss.diffaugment=translation,cutout", "loss.r1_gamma=1",
       "loss.r1_interval=1", "data.batch_size=4", "train.ckpt_every=2")
"""r3gan (bilinear upsampling) with bgc at p > 0 (the warp in D's and G's steps), DiffAugment
translation (indexing backward) and R1 (double backward through both), 16x16, tiny widths."""


def test_deterministic_r3gan_bgc_repeats_and_resumes_bit_exact(tiny_shards, tmp_path, deterministic_flag):
    """Run A (4 steps, checkpoints at 2 and 4), run C the same from the same seed, run B resumed
    from A's step 2: all three end with the same weights and optimizer state, bit for bit. Run A's
    aten ops: the deterministic warp, none of the ops that raise on CUDA. A run without the flag
    shows the ops the table says are not exact there."""
    det = (*RUN, "train.deterministic=true")
    with AtenOps() as seen:
        train_in_process(arch_config("r3gan", tiny_shards, tmp_path / "a", "no", 4, *det))
    assert torch.are_deterministic_algorithms_enabled()
    assert not seen.names & set(RAISES_ON_CUDA_WHEN_DETERMINISTIC), seen.names & set(RAISES_ON_CUDA_WHEN_DETERMINISTIC)
    assert {"gather", "scatter_add"} <= seen.names
    train_in_process(arch_config("r3gan", tiny_shards, tmp_path / "c", "no", 4, *det))
    train_in_process(arch_config("r3gan", tiny_shards, tmp_path / "b", "no", 4, *det, f"train.resume={ckpt(tmp_path / 'a', 2)}"))
    assert_identical(ckpt(tmp_path / "a", 4), ckpt(tmp_path / "c", 4))
    assert_identical(ckpt(tmp_path / "a", 4), ckpt(tmp_path / "b", 4))

    with AtenOps() as fast:
        train_in_process(arch_config("r3gan", tiny_shards, tmp_path / "f", "no", 1, *RUN, "train.deterministic=false"))
    listed = {op for op, _ in NOT_EXACT_ON_CUDA_WITHOUT_DETERMINISTIC}
    assert listed <= fast.names | seen.names, f"the table names ops the step never runs: {listed - fast.names - seen.names}"
    assert {"grid_sampler_2d_backward", "upsample_bilinear2d_backward"} <= fast.names


def test_launch_readme_prints_the_exactness_table():
    text = (REPO / "launch" / "README.md").read_text()
    for op, _ in NOT_EXACT_ON_CUDA_WITHOUT_DETERMINISTIC:
        assert f"`{op}`" in text, f"launch/README.md does not list `{op}` (distgan/exactness.py)"
    for what, _ in EXACT_ALWAYS:
        assert what in text, f"launch/README.md does not say that {what} is always exact (distgan/exactness.py)"


# Real fp16 engines at ZeRO 0 (FP16_UnfusedOptimizer: `loss_scale_config`) and 2
# (DeepSpeedZeroOptimizer, as at ZeRO-1: a DynamicLossScaler in `loss_scaler`), with distgan's
# DeepSpeed config.
# fp16 engines build and step on the CPU (see DEEPSPEED_CPU_PRELUDE). Each stage:
# G and D engines take an overflowing step (inf loss) and two clean ones; the backend's state goes
# through JSON (as into state.json) into fresh engines, which must then hold the same scaler state
# and react to the next overflow as the originals do (at ZeRO-1/2 the second overflow halves the
# scale only if the first one's hysteresis was restored). ~10 s, most of it importing DeepSpeed.
LOSS_SCALE = DEEPSPEED_CPU_PRELUDE + r"""
from distgan.backends.base import AdamSpec, Backend
from distgan.backends.deepspeed import DeepSpeedBackend, ds_config, loss_scale_state
from distgan.config import load_config

def backend(stage, precision="fp16"):
    config = ds_config(load_config(None, ["dist.backend=deepspeed", f"dist.zero_stage={stage}", "data.batch_size=2"]),
                       1, precision, cpu=True)
    config["fp16"].update(initial_scale_power=8, hysteresis=2, loss_scale_window=100)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
    b = DeepSpeedBackend.__new__(DeepSpeedBackend)  # the engines without the process set-up
    Backend.__init__(b)
    b._engines = {}
    for net in ("G", "D"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        adam = AdamSpec(1e-3, (0.5, 0.99), "foreach").build(model.parameters())
        b._engines[net], *_ = deepspeed.initialize(model=model, optimizer=adam, config=config)
    b.dtype = dtype
    return b

def step(b, overflow):
    for engine in b._engines.values():
        loss = engine(torch.ones(2, 4, dtype=b.dtype)).float().mean()
        engine.backward(loss * float("inf") if overflow else loss, scale_wrt_gas=False)
        engine.step()

results = {}
for stage in (0, 2):
    a = backend(stage)
    for overflow in (True, False, False):
        step(a, overflow)
    saved = json.loads(json.dumps(a.state_dict()))
    b = backend(stage)
    fresh = {net: loss_scale_state(e.optimizer) for net, e in b._engines.items()}
    b.load_state_dict(saved)
    loaded = {net: loss_scale_state(e.optimizer) for net, e in b._engines.items()}
    step(a, True)
    step(b, True)
    results[stage] = {"optimizer": type(a._engines["G"].optimizer).__name__, "saved": saved, "fresh": fresh, "loaded": loaded,
                      "after_a": {n: loss_scale_state(e.optimizer) for n, e in a._engines.items()},
                      "after_b": {n: loss_scale_state(e.optimizer) for n, e in b._engines.items()}}
for precision in ("bf16", "no"):  # nothing to save where no scale changes
    plain = backend(2, precision)
    step(plain, False)
    results[precision] = plain.state_dict()
print("RESULTS " + json.dumps(results))
"""


def test_deepspeed_fp16_loss_scale_is_saved_and_restored():
    proc = subprocess.run([sys.executable, "-c", LOSS_SCALE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(line[len("RESULTS "):])
    assert [results[s]["optimizer"] for s in "02"] == ["FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer"]
    for stage in "02":
        r = results[stage]
        for net in ("G", "D"):
            saved = r["saved"]["loss_scale"][net]
            assert saved["cur_iter"] == 3 and saved["last_overflow_iter"] == 0, (stage, saved)
            assert ("cur_hysteresis" in saved) is (stage != "0"), (stage, saved)
            assert r["fresh"][net] != saved, f"ZeRO-{stage}: a fresh engine already had the trained scaler state"
            assert r["loaded"][net] == saved, f"ZeRO-{stage} {net}: loaded {r['loaded'][net]}, saved {saved}"
            assert r["after_b"][net] == r["after_a"][net], f"ZeRO-{stage} {net}: resumed scaler diverged"
        assert r["saved"]["skipped_steps"] == 0  # the trainer counts skips; this harness steps the engines itself
    assert results["bf16"] == results["no"] == {"skipped_steps": 0}
    # At ZeRO-2 the first overflow only used up hysteresis; the second one halves the scale.
    assert results["2"]["after_a"]["G"]["cur_scale"] == results["2"]["saved"]["loss_scale"]["G"]["cur_scale"] / 2
