"""distgan's ADA augmentation pipeline and p controller against NVlabs' (stylegan2-ada-pytorch),
number for number, from the golden fixtures made by tools/golden/augment.py (the reference is not
needed here).

Tolerances: outputs within 1e-5 absolute + 1e-5 relative. The pipeline draws the same random
numbers as the reference and computes the same warp, but both sample a 2x canvas ~100 px wide at
float32 coordinates (~6e-6 px of rounding, which they round differently: their canvas is sized to
the batch's margin, ours to the largest margin) and the color ops scale values up to ~9; run in
float64, distgan's side moves the differences by less than half, so they are the reference's
own float32 rounding. Input gradients: 1e-4 absolute + 1e-5 relative (a backward through the
same sums, with weights ~N(0, 1)). ADA's p: 1e-6 absolute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distgan.gan.augpipe import AugmentPipe
from tests.unit.test_ada import controller

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "augment"


def _load(name: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURES / name), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


PIPELINE_META, PIPELINE = _load("pipeline.safetensors")
CASES = json.loads(PIPELINE_META["cases"])


@pytest.mark.parametrize("name", ["pipeline.safetensors", "ada.safetensors"])
def test_fixtures_name_the_reference_and_its_commit(name):
    meta, _ = _load(name)
    assert meta["reference"] == "NVlabs/stylegan2-ada-pytorch"
    assert len(meta["commit"]) == 40 and int(meta["commit"], 16) >= 0
    assert meta["produced_by"]


def _augment(case: dict, p, images: torch.Tensor) -> torch.Tensor:
    pipe = AugmentPipe(p, case["multipliers"], generator=torch.Generator().manual_seed(case["seed"]))
    return pipe(images)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_pipeline_output_and_input_gradient_equal_the_reference(case):
    """Same draws from a CPU generator seeded as the reference's torch.manual_seed, same gating
    (p above 1 included), same supersampled warp and borders, same color matrices and cutout."""
    x = PIPELINE[case["images"]].clone().requires_grad_(True)
    out = _augment(case, case["p"], x)
    torch.testing.assert_close(out, PIPELINE[f"{case['name']}/output"], atol=1e-5, rtol=1e-5)
    if "weights" in case:
        (grad,) = torch.autograd.grad((out * PIPELINE[case["weights"]]).sum(), x)
        torch.testing.assert_close(grad, PIPELINE[f"{case['name']}/grad"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["bgc_rgb16_p0.6", "r3gan_gray16_p1.0"])
def test_a_device_tensor_p_and_the_deterministic_path_give_the_same_images(name):
    """ADA's p is a 0-d tensor; `train.deterministic=true` swaps grid_sample for its gather twin."""
    case = next(c for c in CASES if c["name"] == name)
    images, expected = PIPELINE[case["images"]], PIPELINE[f"{name}/output"]
    fast = _augment(case, torch.tensor(case["p"]), images)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        exact = _augment(case, case["p"], images)
    finally:
        torch.use_deterministic_algorithms(was)
    torch.testing.assert_close(exact, fast, atol=1e-6, rtol=1e-6)


def test_ada_p_trajectory_equals_the_reference():
    """200 adjustments whose r_t crosses the target both ways (and equals it): p held at 0 from
    below, past 1 above (NVlabs clamps at 0 only: distgan's default has no upper clamp)."""
    meta, t = _load("ada.safetensors")
    interval, batch = json.loads(meta["interval"]), json.loads(meta["batch"])
    ada = controller(p=json.loads(meta["initial_p"]), target=json.loads(meta["target"]),
                     kimg=json.loads(meta["kimg"]), interval=interval, p_max=0.0, batch=batch)
    trajectory, rts = [], []
    d_step = 0
    for window in t["real_logits"]:
        for logits in window:
            ada.observe(logits)
            d_step += 1
            ada.d_steps_done(d_step - 1, d_step)
        trajectory.append(ada.p.clone())
        rts.append(ada.rt.clone())
    torch.testing.assert_close(torch.stack(rts).double(), t["rt"], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(trajectory), t["p_after"], atol=1e-6, rtol=0)
    assert t["p_after"].max() > 1 and (t["p_after"] == 0).any()
