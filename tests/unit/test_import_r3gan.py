"""`distgan import` of brownvc/R3GAN snapshot pickles (fixtures: tools/make_r3gan_import_fixtures.py).

The fixture pickle is what R3GAN's training loop writes (its networks are plain modules pickled by
class: no source inside); the importer reads it with the restricted unpickler and must reproduce
the reference's G, G_ema and D outputs within 1e-5 in fp32.
"""

import contextlib
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from distgan.cli import main
from distgan.config import load_config
from distgan.interop import r3gan
from distgan.interop.importer import import_pickle
from distgan.interop.safe_pickle import UnsafePickleError, load_records
from distgan.interop.stylegan2_ada import UnsupportedNetworkError
from distgan.models import build_models
from distgan.sampling import load_generator
from tests.unit.test_import import _Shell

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "r3gan_import"
PKL = FIXTURES / "cond32.pkl"
ATOL = 1e-5


def expected():
    with safe_open(str(FIXTURES / "cond32.expected.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return import_pickle(PKL, tmp_path_factory.mktemp("r3gan") / "export", n=4)


def test_imported_networks_reproduce_the_reference(imported):
    t, meta = expected()
    assert meta["reference"] == "brownvc/R3GAN" and len(meta["commit"]) == 40
    config = json.loads((imported / "config.json").read_text())
    assert config["generator"]["arch"] == "r3gan" and config["imported_from"]["format"] == "brownvc/R3GAN"
    model = config["config"]["model"]
    assert model["widths"] == [16, 8, 8, 4] and model["conditional"] and model["lowp_stages"] == 3
    assert "NVIDIA Source Code License-NC" in (imported / "README.md").read_text()
    G_ema, _, _ = load_generator(imported)
    cfg = load_config(None, {f"model.{k}": v for k, v in model.items()} | {
        "data.resolution": 32, "data.channels": 3})
    G, D = build_models(cfg.model, 32, 3, 3)
    G.load_state_dict(load_file(str(imported / "G.safetensors")))
    D.load_state_dict(load_file(str(imported / "D.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(G_ema(t["z"], t["labels"]), t["g_ema_images"], atol=ATOL, rtol=0)
        torch.testing.assert_close(G.eval()(t["z"], t["labels"]), t["g_images"], atol=ATOL, rtol=0)
        torch.testing.assert_close(D.eval()(t["d_images"], t["labels"]), t["d_logits"], atol=ATOL, rtol=0)
    assert not torch.allclose(t["g_images"], t["g_ema_images"])  # so a swapped G / G_ema would show


def test_fixture_is_data_only():
    """R3GAN pickles hold class names, module __dict__s and tensors: no source code to strip."""
    data = PKL.read_bytes()
    assert b"training.networks" in data and b"def forward" not in data and b"NVIDIA CORPORATION" not in data


def test_cli_import_then_sample(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r3"
    result = runner.invoke(main, ["import", str(PKL), "--out", str(out), "--n", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["sample", "--ckpt", str(out), "--n", "3", "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0


@contextlib.contextmanager
def stand_in_class(qualified: str, reduce=None):
    """A class pickled under the name `qualified` (only its name is written), e.g. R3GAN's
    `training.networks.Generator`, with `reduce` as its `__reduce__` when given."""
    module_name, name = qualified.rsplit(".", 1)
    cls = type(name, (), {"__module__": module_name, "__qualname__": name,
                          **({"__reduce__": reduce} if reduce else {})})
    parts = module_name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update({k: types.ModuleType(k) for k in names})
    setattr(sys.modules[module_name], name, cls)
    try:
        yield cls
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def test_a_record_smuggling_a_call_is_refused_without_running(tmp_path):
    """R3GAN's shape (G, D, G_ema of class training.networks.Generator, pickled by class as R3GAN's
    networks are) with a module state that would call os.system while loading."""
    target = tmp_path / "side-effect"
    with stand_in_class("training.networks.Generator") as Generator:
        nets = {name: Generator() for name in ("G", "D", "G_ema")}
        for net in nets.values():
            net.__dict__.update(_modules={}, _parameters={}, evil=_Shell(target))
        data = pickle.dumps(nets)
    refused = f"{os.system.__module__}.system"
    with pytest.raises(UnsafePickleError, match=f"the global {refused}, which is not on the allow-list"):
        load_records(io.BytesIO(data))
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(data)
    result = CliRunner().invoke(main, ["import", str(pkl), "--out", str(tmp_path / "out")])
    assert result.exit_code == 4 and result.output.startswith("distgan: import refused:") and refused in result.output
    assert not target.exists() and not (tmp_path / "out").exists()


def test_other_r3gan_classes_and_constructor_calls_are_refused():
    with stand_in_class("R3GAN.Trainer.AdversarialTraining") as Trainer:  # code, not a network
        data = pickle.dumps({"G": Trainer()})
    with pytest.raises(UnsafePickleError, match=r"R3GAN\.Trainer\.AdversarialTraining, which is not on the allow-list"):
        load_records(io.BytesIO(data))
    # An allowed module class called with arguments (REDUCE, not NEWOBJ) is refused, not built.
    with stand_in_class("training.networks.Generator", reduce=lambda self: (type(self), ("x",))) as Generator:
        data = pickle.dumps({"G": Generator()})
    with pytest.raises(UnsafePickleError, match="built with arguments"):
        load_records(io.BytesIO(data))


def test_structures_distgan_cannot_build_are_refused_naming_the_tensor():
    with open(PKL, "rb") as f:
        data = load_records(f)
    up = data["G"].modules["Model"].modules["MainLayers"].modules["1"].modules["Layers"].modules["0"]
    up.modules["Resampler"].state["_buffers"]["Kernel"] = torch.ones(4, 4) / 16  # a box filter
    kernel = r"Model\.MainLayers\.1\.Layers\.0\.Resampler\.Kernel is not R3GAN's default \[1,2,1\]"
    with pytest.raises(UnsupportedNetworkError, match=kernel):
        r3gan.convert(data)
