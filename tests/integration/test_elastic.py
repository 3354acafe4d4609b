"""Elastic resume: a checkpoint written by any (backend, world size) resumes under every other.

Real runs on CPU with gloo (forked ranks, `tests/helpers/ranks.py`), tiny models, shards on disk.
Each source writes a checkpoint at step 2; each target resumes every source, writes the loaded
state straight back (DISTGAN_TEST_RESAVE) and trains one more step. The written-back weights and
optimizer state (gathered from ZeRO/FSDP shards) must equal the source's exactly: nothing is
lost or moved in a re-shard. A DeepSpeed bf16 run trains fp32 master weights (saved in its
optimizer file) behind bf16 engine weights (its weights file): there the masters are what must
carry over exactly, and a bf16 weights file must be their rounding (see `exact_weights`).
Several runs share one launch (DISTGAN_TEST_MULTI, one process group) to keep the 8 x 8 matrix
within a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.checkpoint import read_checkpoint, verify
from distgan.errors import ConfigError
from distgan.global_batch import split_global_batch
from tests.helpers import REPO

pytest.importorskip("deepspeed")
RANKS = REPO / "tests" / "helpers" / "ranks.py"

# name: (world size, overrides). In launch order: "fsdp-1" right after "single" starts its own
# one-rank process group (no launcher, no group yet), as `distgan train dist.fsdp=true` would.
SETUPS = {
    "single": (1, ["dist.backend=accelerate"]),
    "fsdp-1": (1, ["dist.backend=accelerate", "dist.fsdp=true"]),
    "zero1-1": (1, ["dist.backend=deepspeed", "dist.zero_stage=1"]),
    "ddp": (2, ["dist.backend=accelerate"]),
    "fsdp": (2, ["dist.backend=accelerate", "dist.fsdp=true"]),
    "zero0": (2, ["dist.backend=deepspeed", "dist.zero_stage=0"]),
    "zero2": (2, ["dist.backend=deepspeed", "dist.zero_stage=2"]),
    "zero2-bf16": (2, ["dist.backend=deepspeed", "dist.zero_stage=2", "dist.mixed_precision=bf16"]),
}
BF16 = {"zero2-bf16"}
STEP = 2


def base_args(shards: Path) -> list[str]:
    # train.global_batch=8: 1 process x 8 or 2 x 4, the same optimization on both world sizes.
    return [f"data.source={shards}", "data.resolution=16", "data.batch_size=8", "train.global_batch=8", "data.workers=0",
            "model.z_dim=8", "model.g_width=8", "model.d_width=8", "train.log_every=1", "train.sample_every=1000",
            "train.ckpt_every=1000", "logging.wandb=off", "train.progress=false", "optim.d_steps=1",
            "loss.diffaugment=", "model.g_norm=none"]


def launch(world: int, runs: list[list[str]], shards: Path, tmp: Path, tag: str) -> None:
    """Train each override list in turn in one launch of `world` forked ranks."""
    multi = tmp / f"{tag}.json"
    multi.write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", "DISTGAN_TEST_MULTI": str(multi),
           "DISTGAN_TEST_RESAVE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(RANKS), str(world), str(tmp / f"pids-{tag}"), "--", *base_args(shards),
                           f"train.run_dir={tmp / 'unused'}"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]


def ckpt(run: Path, index: int, step: int) -> Path:
    return run / str(index) / "checkpoints" / f"step-{step:09d}"


@pytest.fixture(scope="module")
def matrix(tiny_shards, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("elastic")
    sources: dict[str, Path] = {}
    by_world = {w: [n for n, (ws, _) in SETUPS.items() if ws == w] for w in (1, 2)}
    # Sources of world 2 first; world 1 writes its own sources, then resumes all of them.
    runs = [[*SETUPS[n][1], f"train.steps={STEP}", f"train.run_dir={tmp / ('src-' + n)}"] for n in by_world[2]]
    launch(2, runs, tiny_shards, tmp, "src2")
    sources.update({n: ckpt(tmp / f"src-{n}", i, STEP) for i, n in enumerate(by_world[2])})
    for world in (1, 2):
        runs, names = [], list(by_world[1]) if world == 1 else []
        runs += [[*SETUPS[n][1], f"train.steps={STEP}", f"train.run_dir={tmp / ('src-' + n)}"] for n in names]
        offset = len(runs)
        pairs = [(t, s) for t in by_world[world] for s in SETUPS]
        runs += [[*SETUPS[t][1], f"train.steps={STEP + 1}", f"train.run_dir={tmp / f'{t}-from-{s}'}",
                  f"train.resume={sources[s] if s in sources else ckpt(tmp / ('src-' + s), names.index(s), STEP)}"]
                 for t, s in pairs]
        launch(world, runs, tiny_shards, tmp, f"targets{world}")
        sources.update({n: ckpt(tmp / f"src-{n}", i, STEP) for i, n in enumerate(names)})
        for k, (t, s) in enumerate(pairs):
            sources[f"{t}<-{s}"] = tmp / f"{t}-from-{s}" / str(offset + k) / "checkpoints"
    return tmp, sources


def optim(path: Path, net: str) -> dict:
    return torch.load(path / f"optim_{net}.pt", map_location="cpu", weights_only=True)


def exact_weights(path: Path, net: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights file, exact state) of `net` in a checkpoint. The exact state is the weights file
    with the fp32 master weights of a DeepSpeed bf16 run (`fp32_params` in its optimizer file) in
    place of its bf16 parameters: those masters are what it trains and resumes from, its bf16
    weights only their rounding. Every other run (and G_ema, kept in fp32 by every backend) has
    no masters: its weights file is exact."""
    weights = load_file(str(path / f"{net}.safetensors"))
    exact = dict(weights)
    if net != "G_ema":
        masters = optim(path, net).get("fp32_params", {})
        assert set(masters) <= set(weights), (path, net)
        exact.update(masters)
    return weights, exact


@pytest.mark.slow
@pytest.mark.parametrize("target", list(SETUPS))
def test_every_checkpoint_resumes_under_every_backend_and_world_size(matrix, target):
    _, paths = matrix
    for source in SETUPS:
        src, out = paths[source], paths[f"{target}<-{source}"]
        again = out / f"step-{STEP:09d}"
        assert verify(again) is None and verify(out / f"step-{STEP + 1:09d}") is None, (source, target)
        assert read_checkpoint(again).world_size == SETUPS[target][0]
        for net in ("G", "D", "G_ema"):
            a_file, a = exact_weights(src, net)
            b_file, b = exact_weights(again, net)
            assert a.keys() == b.keys() == b_file.keys(), f"{net}: {source} -> {target}"
            # The exact state (fp32: weights, or a bf16 run's masters) carries over bit for bit,
            # in every direction: bf16 -> fp32 takes the masters, fp32 -> bf16 makes the weights
            # its masters. (The tiny models have no buffers; a bf16 engine would hold those in bf16.)
            assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), f"{net}: {source} -> {target}"
            # A weights file holds the exact state in the run's weight dtype: the bf16 weights of a
            # bf16 run are the round-to-nearest of its masters, to the bit (DeepSpeed copies the
            # masters into them after each step; a resume copies them in). fp32: the same tensors.
            for weights, state in ((a_file, a), (b_file, b)):
                assert all(torch.equal(weights[k], state[k].to(weights[k].dtype)) for k in a), f"{net}: {source} -> {target}"
            for run, weights in ((source, a_file), (target, b_file)):
                bf16 = run in BF16 and net != "G_ema"
                assert {w.dtype for w in weights.values()} == {torch.bfloat16 if bf16 else torch.float32}, (net, run)
        for net in ("G", "D"):
            a, b = optim(src, net), optim(again, net)
            assert a["state"].keys() == b["state"].keys() and a["state"], (net, source, target)
            for name, moments in a["state"].items():
                # Adam's moments are fp32 in every setup (a bf16 run's optimizer steps the fp32
                # masters): they carry over exactly, dtype included.
                for key in ("exp_avg", "exp_avg_sq"):
                    assert moments[key].dtype == b["state"][name][key].dtype == torch.float32
                    assert torch.equal(moments[key], b["state"][name][key]), f"optim_{net} {name}.{key}: {source} -> {target}"
                assert torch.equal(moments["step"].float(), b["state"][name]["step"].float()), \
                    f"optim_{net} {name}.step: {source} -> {target}"
            assert "fp32_params" in b or target not in BF16, (net, source, target)  # a bf16 run's masters
            assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
            assert tuple(a["param_groups"][0]["betas"]) == tuple(b["param_groups"][0]["betas"])
        sa, sb = read_checkpoint(src), read_checkpoint(again)
        assert (sa.step, sa.d_step, sa.nimg) == (sb.step, sb.d_step, sb.nimg)
        # The ranks of the continued run hold identical weights.
        final = out / f"step-{STEP + 1:09d}"
        prints = [json.loads(p.read_text())["fingerprint"] for p in sorted(final.glob("rank-*.json"))]
        assert len(prints) == SETUPS[target][0] and all(p == prints[0] for p in prints)


def test_deepspeed_checkpoint_loads_with_weights_only(matrix):
    _, paths = matrix
    for name in ("zero0", "zero1-1", "zero2", "zero2-bf16"):
        folder = paths[name]
        assert not list(folder.glob("ds_*")), "DeepSpeed's native pickles are not written"
        for net in ("G", "D"):
            state = optim(folder, net)  # raises if anything but tensors and plain containers were pickled
            assert state["state"] and "fp32_params" in state or name == "zero0"


def test_global_batch_split_and_its_error():
    assert split_global_batch(64, 2, 32) == (32, 1)
    assert split_global_batch(64, 2, 8) == (8, 4)
    assert split_global_batch(48, 4, 5) == (4, 3)
    with pytest.raises(ConfigError, match=r"train.global_batch=10 cannot be split evenly over 4 processes"):
        split_global_batch(10, 4, 8)


def test_global_batch_error_comes_before_training(tiny_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTGAN_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(RANKS), "2", str(tmp_path / "pids"), "--", *base_args(tiny_shards),
                           "train.global_batch=9", f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == ConfigError.exit_code, proc.stdout[-3000:]
    assert "train.global_batch=9 cannot be split evenly over 2 processes" in proc.stdout
    assert not (tmp_path / "run").exists()
