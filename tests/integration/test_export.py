"""`distgan export` from a real (tiny, conditional) run, and what reads an export back.

- the folder holds the Hub layout (model.safetensors, config.json, samples.png, README.md with a
  YAML header); the card names the data source and the license its dataset.json records;
- `distgan.load_generator(export)` reproduces the run's EMA generator bit for bit (same samples
  for a fixed seed, and the export's own grid); `distgan sample --ckpt EXPORT` works;
- an export can seed a fine-tune run (G and EMA G from it, D fresh; FreezeD refused);
- `--push` without credentials refuses in one line, writes no export and sends no request (a
  local HTTP server stands in for the Hub endpoint and counts what reaches it);
- built-in data: the card carries Twemoji's CC-BY 4.0 attribution and the Hub license id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import distgan
from distgan.cli import main
from distgan.config import load_config
from distgan.data.builtin import TWEMOJI_LICENSE
from distgan.errors import ConfigError
from distgan.export.card import data_terms, model_card
from distgan.run import run
from distgan.sampling import fixed_latents, generate, load_generator, make_grid
from tests.helpers import REPO, tiny_overrides

LICENSE = "Test shapes by the distgan test suite, CC0 1.0 (public domain)"


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A finished tiny conditional run on a copy of the tiny shards whose dataset.json records a license."""
    root = tmp_path_factory.mktemp("export")
    shards = root / "shards"
    shards.mkdir()
    for f in tiny_shards.iterdir():
        (shards / f.name).symlink_to(f)
    manifest = json.loads((tiny_shards / "dataset.json").read_text())
    (shards / "dataset.json").unlink()
    (shards / "dataset.json").write_text(json.dumps({**manifest, "license": LICENSE}))
    assert run(load_config(None, tiny_overrides(shards, root / "run", "model.conditional=true"))) == "done"
    return root / "run"


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained.parent / "exports" / "tiny-shapes"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(trained), "--out", str(out), "--n", "8", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_export_folder_and_model_card(exported, trained):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert not list(exported.parent.glob("*.tmp-*"))
    meta = json.loads((exported / "config.json").read_text())
    assert meta["format"] == "distgan-generator" and meta["step"] == 6
    assert meta["generator"] == {"arch": "dcgan", "resolution": 16, "channels": 3, "z_dim": 16, "num_classes": 2,
                                 "class_names": ["circles", "squares"]}
    assert meta["samples"] == {"file": "samples.png", "n": 8, "per_row": 4, "seed": 3}
    card = (exported / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    assert yaml.safe_load(header) == {"library_name": "distgan", "license": "other", "pipeline_tag":
                                      "unconditional-image-generation",
                                      "tags": ["distgan", "gan", "dcgan", "image-generation", "class-conditional"]}
    shards = meta["config"]["data"]["source"]
    assert f"on `{shards}`" in body and LICENSE in body and "2 classes: circles, squares" in body
    assert "Not measured" in body and 'distgan.load_generator("path/to/this/folder"' in body
    # The weights are the checkpoint's EMA generator, byte for byte.
    ckpt = trained / "checkpoints" / "step-000000006"
    assert (exported / "model.safetensors").read_bytes() == (ckpt / "G_ema.safetensors").read_bytes()


def test_load_generator_reproduces_the_ema_generator_bit_for_bit(exported, trained):
    G = distgan.load_generator(exported)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    reference, _, info = load_generator(trained)  # the run's EMA generator, from its checkpoint
    z, c = fixed_latents(8, G.z_dim, G.num_classes, 3, "cpu")
    ours = generate(G, z, c)
    assert torch.equal(ours, generate(reference, z, c))
    # The export's own grid is exactly what the loaded generator draws from the recorded latents.
    grid = np.asarray(make_grid(ours, nrow=4))
    assert np.array_equal(grid, np.asarray(Image.open(exported / "samples.png")))
    _, cfg, export_info = load_generator(exported)
    assert (export_info.step, export_info.nimg, export_info.class_names) == (info.step, info.nimg, info.class_names)
    assert cfg.to_dict() == load_config(None, {f"{s}.{k}": v for s, sec in info.config.items()
                                               for k, v in sec.items()}).to_dict()


def test_sample_command_reads_an_export(exported, trained, tmp_path):
    runner = CliRunner()
    for name, ckpt in (("export", exported), ("run", trained)):
        result = runner.invoke(main, ["sample", "--ckpt", str(ckpt), "--n", "4", "--seed", "5",
                                      "--out", str(tmp_path / f"{name}.png")])
        assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "export.png")), np.asarray(Image.open(tmp_path / "run.png")))
    result = runner.invoke(main, ["sample", "--ckpt", str(exported), "--raw", "--out", str(tmp_path / "raw.png")])
    assert result.exit_code == 4 and "is a distgan export: it holds only the EMA generator, not G" in result.output


def test_export_seeds_a_finetune_run(exported, tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path / "ft", "model.conditional=true", f"train.init_from={exported}",
                          "train.steps=2")
    with pytest.raises(ConfigError, match="is an export without D weights"):
        run(load_config(None, [*args, "model.freeze_d=1"]))
    assert run(load_config(None, args)) == "done"
    assert f"init_from: {exported}" in (tmp_path / "ft" / "config.yaml").read_text()  # recorded with the run
    src = load_file(str(exported / "model.safetensors"))
    G = load_file(str(tmp_path / "ft" / "checkpoints" / "step-000000002" / "G.safetensors"))
    assert G.keys() == src.keys() and any(not torch.equal(G[k], src[k]) for k in G)  # trained on from there


def test_existing_out_is_refused_without_force(exported, trained):
    result = CliRunner().invoke(main, ["export", "--ckpt", str(trained), "--out", str(exported)])
    assert result.exit_code == 4 and "already exists and is not empty" in result.output


class _Counter(BaseHTTPRequestHandler):
    requests: list[str] = []

    def _any(self) -> None:
        _Counter.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _any

    def log_message(self, *args) -> None:
        pass


def test_push_without_credentials_refuses_and_sends_nothing(trained, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    out = tmp_path / "pushed"
    try:
        proc = subprocess.run([sys.executable, "-m", "distgan", "export", "--ckpt", str(trained), "--out", str(out),
                               "--push", "alice/tiny-shapes"], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "distgan: push refused: --push alice/tiny-shapes: no Hugging Face credentials found (set HF_TOKEN")
    assert not out.exists() and _Counter.requests == []
    bad = CliRunner().invoke(main, ["export", "--ckpt", str(trained), "--out", str(out), "--push", "no-owner"])
    assert bad.exit_code == 1 and "a Hub repo id looks like OWNER/NAME" in bad.output and not out.exists()


def test_builtin_data_license_goes_into_the_card():
    terms = data_terms("builtin:twemoji")
    assert (terms.license, terms.license_id) == (TWEMOJI_LICENSE, "cc-by-4.0")
    meta = {"generator": {"arch": "dcgan", "resolution": 32, "channels": 3, "z_dim": 128, "num_classes": 0,
                          "class_names": []}, "config": {"model": {"g_width": 32}, "loss": {"objective": "logistic"}},
            "samples": {"file": "samples.png", "seed": 0}, "kimg": 384.0, "step": 6000, "metrics": {"fid": 31.5},
            "source_checkpoint": "runs/default/checkpoints/step-000006000", "distgan_version": "0.1.0"}
    card = model_card(meta, terms, "emoji")
    assert "license: cc-by-4.0" in card.split("---")[1] and "Twitter, Inc and other contributors" in card
    assert "| fid | 31.5 |" in card and "unconditional" in card
