"""Fine-tuning (`train.init_from`, `model.freeze_d`, `model.reinit_class_embedding`) with the real
trainer in this process, on tiny conditional models.

- the weights a fine-tune run starts from equal the source's G, D and EMA G, its optimizers and
  counters are fresh, and D's frozen blocks are bit-identical after training while the rest moved;
- a requeued fine-tune run resumes its own checkpoint without reading the source again;
- incompatible sources and settings are refused before a run folder exists, naming the key;
- another class count needs `model.reinit_class_embedding=true`, which keeps every other weight;
- FreezeD per architecture: the blocks each arch declares in the registry leave `parameters()`,
  keep their state-dict keys, and stay fixed (and in eval mode) through optimizer steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.checkpoint import read_checkpoint
from distgan.config import load_config
from distgan.data.shards import write_shards
from distgan.errors import ConfigError
from distgan.finetune import class_embedding_keys, freeze_d_blocks
from distgan.models import build_models, discriminator_blocks
from distgan.run import run
from distgan.trainer import TrainerHooks
from tests.helpers import make_image_folder, tiny_overrides

COND = ("model.conditional=true",)


def train(shards: Path, run_dir: Path, *extra: str, hooks=()) -> str:
    return run(load_config(None, tiny_overrides(shards, run_dir, *COND, *extra)), hooks=hooks)


def final(run_dir: Path) -> Path:
    return read_checkpoint(run_dir).path


def weights(ckpt: Path, net: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / f"{net}.safetensors"))


class FirstStep(TrainerHooks):
    """What the trainer holds when its first step starts (after restore)."""

    def __init__(self) -> None:
        self.seen: dict | None = None

    def step_start(self, trainer) -> None:
        if self.seen is None:
            b = trainer.backend
            self.seen = {
                "G": {k: v.clone() for k, v in b.module("G").state_dict().items()},
                "D": {k: v.clone() for k, v in b.module("D").state_dict().items()},
                "G_ema": {k: v.clone() for k, v in trainer.ema.module.state_dict().items()},
                "opt_state": {net: len(b.optimizer(net).state) for net in ("G", "D")},
                "D_opt_params": sum(len(g["params"]) for g in b.optimizer("D").param_groups),
                "D_params": [n for n, _ in b.module("D").named_parameters()],
                "counters": (trainer.state.step, trainer.state.nimg),
            }


@pytest.fixture(scope="module")
def source(tiny_shards, tmp_path_factory) -> Path:
    """A finished tiny conditional run (2 classes, 6 steps)."""
    run_dir = tmp_path_factory.mktemp("finetune") / "source"
    assert train(tiny_shards, run_dir) == "done"
    return run_dir


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    make_image_folder(root / "img", n_per_class=8, classes=("a", "b", "c"))
    write_shards(str(root / "img"), root / "shards", resolution=16, channels=3, crop="none", shard_size=8, workers=1,
                 progress=False)
    return root / "shards"


def test_finetune_starts_from_the_source_fresh_and_keeps_frozen_blocks(source, tiny_shards, tmp_path):
    src, hook, run_dir = final(source), FirstStep(), tmp_path / "ft"
    assert train(tiny_shards, run_dir, f"train.init_from={source}", "model.freeze_d=2", "train.steps=4",
                 hooks=[hook]) == "done"
    seen = hook.seen
    for net in ("G", "D", "G_ema"):
        expected = weights(src, net)
        assert seen[net].keys() == expected.keys()
        assert all(torch.equal(seen[net][k], expected[k]) for k in expected), f"{net} is not the source's"
    assert seen["counters"] == (0, 0) and seen["opt_state"] == {"G": 0, "D": 0}  # fresh counters and Adam
    # FreezeD: dcgan's first two strided convs are out of D's parameters and its optimizer.
    assert not [n for n in seen["D_params"] if n.startswith(("convs.0.", "convs.1."))]
    assert seen["D_opt_params"] == len(seen["D_params"]) > 0

    info = read_checkpoint(run_dir)
    assert (info.step, info.nimg) == (4, 4 * 2 * 8)  # counted from 0, not from the source's 6 steps
    before, after = weights(src, "D"), weights(info.path, "D")
    frozen = [k for k in before if k.startswith(("convs.0.", "convs.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["head.linear.weight"], after["head.linear.weight"])  # the rest trained
    g0, g1 = weights(src, "G"), weights(info.path, "G")
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)

    # A requeued fine-tune run resumes its own checkpoint: the source is not needed any more.
    moved = source.with_name("source-moved")
    shutil.move(source, moved)
    try:
        assert train(tiny_shards, run_dir, f"train.init_from={source}", "model.freeze_d=2", "train.steps=6") == "done"
    finally:
        shutil.move(moved, source)
    assert read_checkpoint(run_dir).step == 6
    assert all(torch.equal(before[k], weights(final(run_dir), "D")[k]) for k in frozen)


@pytest.mark.parametrize("extra, message", [
    (("model.g_width=16",), "model.g_width: the source has 8, this config has 16"),
    (("model.arch=resnet",), "model.arch: the source has 'dcgan', this config has 'resnet'"),
    (("model.conditional=false",), "model.conditional: the source has True, this config has False"),
    (("model.freeze_d=9",), "model.freeze_d=9: the dcgan discriminator at this resolution has 2 blocks"),
])
def test_incompatible_source_is_refused_naming_the_key(source, tiny_shards, tmp_path, extra, message):
    run_dir = tmp_path / "ft"
    with pytest.raises(ConfigError) as e:
        train(tiny_shards, run_dir, f"train.init_from={source}", *extra)
    assert message in str(e.value)
    assert not run_dir.exists()  # refused before the run folder is made


def test_freeze_d_needs_a_source(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="model.freeze_d=1 freezes blocks of a trained discriminator: set "
                                          "train.init_from"):
        train(tiny_shards, tmp_path / "ft", "model.freeze_d=1")


def test_other_class_count_needs_reinit_class_embedding(source, three_classes, tmp_path):
    with pytest.raises(ConfigError, match=r"trained on 2 classes \(circles, squares\) but .* has 3: set "
                                          r"model.reinit_class_embedding=true"):
        train(three_classes, tmp_path / "refused", f"train.init_from={source}")
    assert not (tmp_path / "refused").exists()

    hook = FirstStep()
    assert train(three_classes, tmp_path / "ft", f"train.init_from={source}", "model.reinit_class_embedding=true",
                 "train.steps=2", hooks=[hook]) == "done"
    src = final(source)
    for net in ("G", "D", "G_ema"):
        expected, seen = weights(src, net), hook.seen[net]
        fresh = {k for k in seen if "gain." in k or "bias.weight" in k or "embed." in k}
        assert fresh, net if net != "D" else "the projection embedding"
        for k, v in seen.items():
            if k in fresh:
                assert v.shape[0] == 3 and expected[k].shape[0] == 2  # re-made for 3 classes
            else:
                assert torch.equal(v, expected[k]), f"{net}.{k} was not loaded"


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_freeze_d_blocks_per_architecture(arch):
    cfg = load_config(None, {"model.arch": arch, "model.conditional": True, "model.d_width": 8, "model.g_width": 8,
                             "data.resolution": 16})
    torch.manual_seed(0)
    _, D = build_models(cfg.model, 16, 3, 2)
    keys, blocks = set(D.state_dict()), discriminator_blocks(arch, D)
    frozen_params = {id(p) for p in blocks[0].parameters()}
    assert freeze_d_blocks(D, arch, 1) == 1
    assert set(D.state_dict()) == keys  # checkpoints and exports see the same keys
    assert not frozen_params & {id(p) for p in D.parameters()}
    snapshot = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    opt = torch.optim.Adam(D.parameters(), lr=0.1)
    D.train()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    for _ in range(3):
        opt.zero_grad()
        out = D(x, torch.tensor([0, 1, 0, 1]))
        grad, = torch.autograd.grad(out.sum(), x, create_graph=True)  # R1-style input gradient still flows
        (out.mean() + grad.square().mean()).backward()
        opt.step()
    assert not blocks[0].training  # spectral norm's power iteration stays fixed with the weights
    assert all(torch.equal(v, snapshot[k]) for k, v in blocks[0].state_dict().items())
    assert class_embedding_keys(D) == {k for k in keys if k.startswith("head.embed.")}


def test_stylegan2_class_embeddings_are_found_for_reinit():
    """StyleGAN2 embeds labels with a linear map of one-hot vectors (G's and D's mapping networks),
    not an `nn.Embedding`: `model.reinit_class_embedding` must still reset exactly those."""
    cfg = load_config(None, {"model.arch": "stylegan2", "model.widths": [8, 8, 8], "model.z_dim": 8,
                             "model.mapping_layers": 2, "model.d_mapping_layers": 2, "data.resolution": 16,
                             "model.conditional": True})
    G, D = build_models(cfg.model, 16, 3, 5)
    for net, prefix in ((G, "mapping.embed."), (D, "mapping.embed.")):
        expected = {k for k in net.state_dict() if k.startswith(prefix)}
        assert expected and class_embedding_keys(net) == expected
