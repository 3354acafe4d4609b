"""StyleGAN2-ADA end to end on 2 real processes (CPU, gloo): a tiny `stylegan2` with every part of
the recipe on (mapping network, style mixing, lazy R1, the lazy path-length phase `Greg`, the bgc
pipeline with ADA adapting p every D step) under DDP (bf16 autocast) and under DeepSpeed ZeRO-2. Ranks end with
identical weights, ADA's p is the same on every rank and moved, and a resume from the middle of
the run ends bit-identical to the uninterrupted run, p and the path-length mean included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.checkpoint import read_checkpoint
from tests.helpers.launch import HARNESS, launch, read_dumps, tail, tiny_args, torchrun_cmd
from tests.helpers.resume import ckpt
from tests.integration.test_distributed import assert_ranks_identical

pytestmark = pytest.mark.slow

STEPS, START_P = 6, 0.3
RECIPE = ["model.arch=stylegan2", "model.mapping_layers=2", "model.style_mixing_prob=0.9", "model.mbstd_group=2",
          "loss.objective=logistic", "loss.diffaugment=", "loss.r1_gamma=0.5", "loss.r1_interval=2",
          "loss.pl_weight=2", "loss.pl_interval=2", "loss.augment=bgc", f"loss.augment_p={START_P}",
          "loss.ada_target=0.6", "loss.ada_kimg=0.5", "loss.ada_interval=1", "optim.d_steps=1",
          "optim.g_betas=[0,0.99]", "optim.d_betas=[0,0.99]", f"train.steps={STEPS}", "train.ckpt_every=3",
          "train.log_every=1"]


def _train(tmp: Path, shards: Path, name: str, *extra: str) -> list[tuple[dict, dict]]:
    args = tiny_args(tmp / name, *RECIPE, *extra, source=shards)
    result = launch(torchrun_cmd(2, HARNESS, args), {"DISTGAN_TEST_DUMP": str(tmp / f"dump-{name}")}, timeout=300)
    assert result.returncode == 0, tail(result)
    return read_dumps(tmp / f"dump-{name}")


def _ada_p(folder: Path) -> list[torch.Tensor]:
    """ADA's p as each rank saved it in the checkpoint `folder`."""
    return [load_file(str(f))["ada/p"] for f in sorted(folder.glob("rank-*.safetensors"))]


DDP_BF16 = ["dist.mixed_precision=bf16", "model.lowp_stages=0"]
"""The DDP runs train under bf16 autocast with every block in it (`model.lowp_stages=0`): the
path-length phase then differentiates through ws that Accelerate's prepared forward would have
copied out of the graph. (fp32 DDP with path length: tests/integration/test_gradient_scale.py.)"""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("sg2-ddp")
    return tmp, _train(tmp, tiny_shards, "full", *DDP_BF16)


def test_ddp_ranks_identical_with_every_stylegan2_ada_part_on(ddp_run):
    tmp, dumps = ddp_run
    assert [(info["step"], info["mixed_precision"]) for _, info in dumps] == [(STEPS, "bf16")] * 2
    assert_ranks_identical(dumps)  # w_avg and the const noise buffers included
    assert any(k.endswith("w_avg") for k in dumps[0][0])
    final = ckpt(tmp / "full", STEPS)
    p = _ada_p(final)
    assert len(p) == 2 and torch.equal(p[0], p[1]), f"ADA's p differs between ranks: {p}"
    assert p[0].item() != pytest.approx(START_P), "ADA never moved p"
    rows = [json.loads(line) for line in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "ada/p" in r]
    assert len(rows) == STEPS and rows[-1]["ada/p"] == pytest.approx(p[0].item())
    assert all(-1 <= r["ada/rt"] <= 1 for r in rows)
    # Each adjustment moves p by exactly one step (or hits a bound): batch 2 x 4 x interval 1 / 500.
    step = 8 / 500
    moves = [round((b["ada/p"] - a["ada/p"]) / step, 4) for a, b in zip(rows, rows[1:])]
    assert all(m in (-1.0, 1.0) or r["ada/p"] in (0.0, 1.0) for m, r in zip(moves, rows[1:])), moves
    greg = [r for r in rows if "Greg/pl_length" in r]
    assert greg and all(r["Greg/pl_length"] > 0 for r in greg)
    pl_mean = read_checkpoint(final).state["objective"]["pl_mean"]
    assert float(torch.as_tensor(pl_mean)) > 0


def test_ddp_resume_in_the_middle_is_bit_identical(ddp_run, tiny_shards):
    tmp, full = ddp_run
    resumed = _train(tmp, tiny_shards, "resumed", *DDP_BF16, f"train.resume={ckpt(tmp / 'full', 3)}")
    assert_ranks_identical(resumed)
    differ = [k for k in full[0][0] if not torch.equal(full[0][0][k], resumed[0][0][k])]
    assert not differ, f"the resumed run differs in {differ[:5]}"
    assert torch.equal(_ada_p(ckpt(tmp / "full", STEPS))[0], _ada_p(ckpt(tmp / "resumed", STEPS))[0])
    a, b = (read_checkpoint(ckpt(tmp / run, STEPS)).state["objective"]["pl_mean"] for run in ("full", "resumed"))
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_deepspeed_zero2_ranks_identical(tmp_path, tiny_shards):
    pytest.importorskip("deepspeed")
    dumps = _train(tmp_path, tiny_shards, "zero2", "dist.backend=deepspeed", "dist.zero_stage=2")
    assert [info["backend"] for _, info in dumps] == ["DeepSpeedBackend"] * 2
    assert_ranks_identical(dumps)
    p = _ada_p(ckpt(tmp_path / "zero2", STEPS))
    assert torch.equal(p[0], p[1]) and p[0].item() != pytest.approx(START_P)
