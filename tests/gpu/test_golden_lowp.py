"""The golden fixtures on CUDA: distgan's low-precision paths against the references' numbers.

The CPU suite (tests/unit/test_golden_stylegan2.py, test_golden_r3gan.py) checks fp32 to 1e-5
and CPU autocast; CUDA kernels round differently (cuDNN convolutions, TF32 unless disabled), so
the same fixtures run here with the same tolerances:

- fp32 with TF32 off: G images and D logits within 1e-4 of the reference's CPU fp32 output (cuDNN
  picks other summation orders than the CPU's; 10x the CPU tolerance);
- StyleGAN2 `model.lowp_stages` under CUDA fp16 and bf16 autocast within the CPU test's multiples
  of the reference's own fp16 error;
- R3GAN's preset bf16 stages under CUDA bf16 autocast within the CPU test's tolerance of the
  reference's bf16 run.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit import test_golden_r3gan as r3gan
from tests.unit import test_golden_stylegan2 as sg2

pytestmark = pytest.mark.gpu

CUDA_FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def on_cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@pytest.mark.parametrize("name", sg2.NAMES)
def test_stylegan2_fp32_on_cuda(name):
    G, D, ref, labels, _ = sg2.networks(name)
    G, D = G.cuda(), D.cuda()
    z, d_images, labels = on_cuda(ref["z"], ref["d_images"], labels)
    with torch.no_grad():
        sg2.close(G(z, labels).cpu(), ref["g_images"], CUDA_FP32_TOL, "G images (CUDA fp32)")
        sg2.close(D(d_images, labels).cpu(), ref["d_logits"], CUDA_FP32_TOL, "D logits (CUDA fp32)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sg2.LOW_PRECISION)
def test_stylegan2_low_precision_on_cuda(name, dtype):
    G, D, ref, labels, meta = sg2.networks(name)
    G, D = G.cuda(), D.cuda()
    own = json.loads(meta["reference_fp16_error"])
    scale = sg2.FP16_FACTOR * (1 if dtype == torch.float16 else sg2.BF16_OVER_FP16)
    z, d_images, labels = on_cuda(ref["z"], ref["d_images"], labels)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        images, logits = G(z, labels), D(d_images, labels)
    sg2.close(images.cpu(), ref["g_images"], scale * own["g_images"], f"G images under CUDA {dtype}")
    sg2.close(logits.float().cpu(), ref["d_logits"], scale * own["d_logits"], f"D logits under CUDA {dtype}")


@pytest.mark.parametrize("name", r3gan.NAMES)
def test_r3gan_on_cuda(name):
    t, nets, meta = r3gan.load(name)
    G, D, _ = r3gan.distgan_nets(nets)
    G, D = G.cuda(), D.cuda()
    labels = t["labels"] if json.loads(meta["config"])["c_dim"] else None
    z, d_images, labels = on_cuda(t["z"], t["d_images"], labels)
    with torch.no_grad():
        torch.testing.assert_close(G(z, labels).cpu(), t["g_images"], atol=CUDA_FP32_TOL, rtol=0)
        torch.testing.assert_close(D(d_images, labels).cpu(), t["d_logits"], atol=CUDA_FP32_TOL, rtol=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            images, logits = G(z, labels).float().cpu(), D(d_images, labels).float().cpu()
    for ours, ref, fp32 in ((images, t["g_images_bf16"], t["g_images"]), (logits, t["d_logits_bf16"], t["d_logits"])):
        assert (ours - ref).abs().max() <= r3gan.BF16_RTOL * fp32.abs().max()
