"""`distgan import`: NVlabs StyleGAN2-ADA network pickles -> distgan exports, executing nothing.

The fixtures (tests/fixtures/stylegan2_ada_import, made by tools/make_import_fixtures.py from
NVlabs/stylegan2-ada-pytorch, commit in their metadata) are snapshots pickled exactly as the
reference's training loop pickles them, with the embedded module source replaced by a
placeholder, plus what the reference networks compute for fixed inputs in fp32. Checked here:

- the imported export reproduces the reference's G and G_ema images (noise_mode const) and D's
  logits; the config (widths, mapping depth, z/w dims, classes, mbstd group, clamp, fp16 stages)
  is inferred from the records; `distgan sample` draws from it; `train.init_from` fine-tunes G,
  D and G_ema from it;
- numpy-1 (`numpy.core.multiarray.scalar`) and numpy-2 (`numpy._core...`) pickles read alike;
- malicious pickles (a reduce to os.system or builtins.eval, a persistence record hiding one, an
  embedded module source that would write a file) are refused or ignored without running: the
  file they would create never appears;
- StyleGAN3 is refused naming why.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import pickletools
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
from distgan.interop.importer import convert_pickle, import_pickle, read_networks
from distgan.interop.safe_pickle import PersistentRecord, UnsafePickleError, load_records
from distgan.interop.stylegan2_ada import UnsupportedNetworkError, fill, flatten, infer_config, map_discriminator
from distgan.run import run
from distgan.sampling import load_generator
from tests.helpers import tiny_overrides

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stylegan2_ada_import"
TOL = 1e-5  # fp32; measured: G/G_ema images within 1.2e-6, D logits exactly equal
PLACEHOLDER = b"# module source removed: NVIDIA Source Code License-NC"


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.expected.safetensors"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    return import_pickle(FIXTURES / "uncond16.pkl", tmp_path_factory.mktemp("imp") / "uncond16", n=4)


@pytest.mark.parametrize("name", ["uncond16", "cond32"])
def test_imported_networks_reproduce_the_reference(name, tmp_path):
    ref = expected(name)
    with safe_open(str(FIXTURES / f"{name}.expected.safetensors"), "pt") as f:
        assert f.metadata()["commit"] == "d72cc7d041b42ec8e806021a205ed9349f87c6a4"
    out = import_pickle(FIXTURES / f"{name}.pkl", tmp_path / name, n=4)
    meta = json.loads((out / "config.json").read_text())
    labels = ref["labels"] if meta["generator"]["num_classes"] else None
    for raw, key in ((False, "g_ema_images"), (True, "g_images")):
        G, cfg, _ = load_generator(out, raw=raw)
        G.noise_mode = "const"
        torch.testing.assert_close(G(ref["z"], labels), ref[key], atol=TOL, rtol=0)
    from distgan.models import build_models

    _, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, len(meta["generator"]["class_names"]))
    D.load_state_dict(load_file(str(out / "D.safetensors")))
    assert cfg.model.mbstd_layout == "strided"  # NVlabs' groups: the batch in its own order
    with torch.no_grad():
        logits = D.eval()(ref["d_images"], labels)
    torch.testing.assert_close(logits, ref["d_logits"], atol=TOL, rtol=0)
    model = meta["config"]["model"]
    if name == "cond32":  # every inferred key differs from distgan's defaults here
        assert (model["widths"], model["mapping_layers"], model["d_mapping_layers"], model["z_dim"], model["w_dim"],
                model["mbstd_group"], model["conv_clamp"], model["lowp_stages"], model["conditional"]) == (
                    [8, 8, 8, 4], 3, 3, 8, 12, 2, 256.0, 2, True)
        assert meta["config"]["data"]["channels"] == 1 and meta["generator"]["num_classes"] == 3
    card = (out / "README.md").read_text()
    assert "NVIDIA Source Code License-NC" in card and meta["imported_from"]["sha256"] in card


def test_conditional_d_class_map_depth_is_read_from_the_pickle():
    """NVlabs' D maps labels through its own mapping network (8 layers unless set); a pickle whose
    D depth differs from G's imports with `model.d_mapping_layers` = D's (here G 3, D 2)."""
    records = read_networks(FIXTURES / "cond32.pkl")
    del records["D"].modules["mapping"].state["_modules"]["fc2"]
    overrides, classes = infer_config(records["G"], records["D"])
    assert (overrides["model.mapping_layers"], overrides["model.d_mapping_layers"]) == (3, 2)
    cfg = load_config(None, overrides)
    from distgan.models import build_models

    _, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, classes)
    D.load_state_dict(fill(D, map_discriminator(flatten(records["D"])[0], cfg.data.resolution), "D"))
    assert len(D.mapping.layers) == 2


def test_fixtures_carry_no_reference_source():
    for pkl in FIXTURES.glob("*.pkl"):
        data = pkl.read_bytes()
        assert PLACEHOLDER in data and b"NVIDIA CORPORATION" not in data and b"def forward" not in data


def _replace_string(data: bytes, old: str, new: str) -> bytes:
    """The same pickle with the short string `old` replaced by `new` (e.g. the module name numpy 2
    writes scalars under by numpy 1's). Protocol-4 frames hold byte counts, so they are dropped
    (framing is optional)."""
    ops = list(pickletools.genops(data))
    out, replaced = bytearray(), 0
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg == old:
            raw = new.encode()
            out += b"\x8c" + bytes([len(raw)]) + raw
            replaced += 1
        else:
            out += data[pos:end]
    assert replaced, f"{old!r} not found"
    return bytes(out)


def test_numpy_1_and_numpy_2_pickles_read_alike(tmp_path):
    data = (FIXTURES / "uncond16.pkl").read_bytes()
    assert b"numpy._core.multiarray" in data  # the fixture was written under numpy 2
    old = tmp_path / "numpy1.pkl"
    old.write_bytes(_replace_string(data, "numpy._core.multiarray", "numpy.core.multiarray"))
    assert b"numpy._core" not in old.read_bytes() and b"numpy.core.multiarray" in old.read_bytes()
    new_records, old_records = read_networks(FIXTURES / "uncond16.pkl"), read_networks(old)
    gain = old_records["G"].modules["mapping"].modules["fc0"].attr("weight_gain")
    assert type(gain) is float and gain == new_records["G"].modules["mapping"].modules["fc0"].attr("weight_gain")
    a, b = convert_pickle(FIXTURES / "uncond16.pkl")[2], convert_pickle(old)[2]
    assert all(torch.equal(a[net][k], b[net][k]) for net in a for k in a[net])


class _Shell:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Eval:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def _persistent_record_hiding(payload, tmp_path) -> bytes:
    """A well-formed NVlabs persistence record whose state holds `payload` (pickled under the
    reference's global name through a stand-in module)."""
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Net:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src="", class_name="Generator",
                        state={"_modules": {}, "evil": payload})
            return _reconstruct_persistent_obj, (meta,)

    sys.modules["torch_utils"] = types.ModuleType("torch_utils")
    sys.modules[module.__name__] = module
    try:
        return pickle.dumps({"G": Net(), "D": Net(), "G_ema": Net()})
    finally:
        del sys.modules[module.__name__], sys.modules["torch_utils"]


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "inside a persistence record"])
def test_malicious_pickles_are_refused_without_running(kind, tmp_path):
    target = tmp_path / "side-effect"
    payload = _Eval(target) if kind == "builtins.eval" else _Shell(target)
    data = _persistent_record_hiding(payload, tmp_path) if kind.startswith("inside") else pickle.dumps({"G": payload})
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(data)
    refused = "builtins.eval" if kind == "builtins.eval" else f"{os.system.__module__}.system"
    with pytest.raises(UnsafePickleError, match=f"the global {refused}, which is not on the allow-list"):
        load_records(io.BytesIO(data))
    result = CliRunner().invoke(main, ["import", str(pkl), "--out", str(tmp_path / "out")])
    assert result.exit_code == 4 and result.output.startswith("distgan: import refused:") and refused in result.output
    assert not target.exists() and not (tmp_path / "out").exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    """The real reference would exec each record's module_src while loading; here it is data."""
    target = tmp_path / "exec-ran"
    data = (FIXTURES / "uncond16.pkl").read_bytes()
    start = data.index(PLACEHOLDER)
    placeholder = data[start:data.index(b"\n", start) + 1].decode()
    pkl = tmp_path / "src.pkl"
    pkl.write_bytes(_replace_string(data, placeholder, f"open({str(target)!r}, 'w').write('x')\n"))
    out = import_pickle(pkl, tmp_path / "out", n=4)
    assert (out / "model.safetensors").is_file() and not target.exists()


def test_stylegan3_is_refused_naming_why():
    records = read_networks(FIXTURES / "uncond16.pkl")
    synthesis = records["G"].modules["synthesis"]
    synthesis.state["_modules"]["input"] = PersistentRecord("SynthesisInput", {"_modules": {}})
    with pytest.raises(UnsupportedNetworkError, match="StyleGAN3 pickle .*Fourier features"):
        infer_config(records["G"], records["D"])


def test_not_a_network_pickle_is_refused(tmp_path):
    pkl = tmp_path / "dict.pkl"
    pkl.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with pytest.raises(UnsupportedNetworkError, match="not the G, D and G_ema networks"):
        import_pickle(pkl, tmp_path / "out")


def test_cli_import_then_sample(tmp_path):
    runner = CliRunner()
    out = tmp_path / "sg2"
    result = runner.invoke(main, ["import", str(FIXTURES / "cond32.pkl"), "--out", str(out), "--n", "6"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["sample", "--ckpt", str(out), "--n", "6", "--truncation", "0.7",
                                  "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    again = runner.invoke(main, ["import", str(FIXTURES / "cond32.pkl"), "--out", str(out)])
    assert again.exit_code == 4 and "already exists" in again.output


def test_init_from_an_import_refuses_other_stylegan2_shapes(imported):
    """Widths, w_dim and the mapping depths shape the networks: a fine-tuning config that differs
    on them is refused naming each key (minibatch-std settings change no weight and may differ)."""
    from distgan.errors import ConfigError
    from distgan.finetune import check_compatible
    from distgan.weights import open_weights

    model = json.loads((imported / "config.json").read_text())["config"]["model"]
    same = ["model.arch=stylegan2", "data.resolution=16", f"model.z_dim={model['z_dim']}",
            f"model.g_width={model['g_width']}", f"model.d_width={model['d_width']}",
            f"model.widths={json.dumps(model['widths'])}", f"model.w_dim={model['w_dim']}",
            f"model.mapping_layers={model['mapping_layers']}", f"train.init_from={imported}"]
    source = open_weights(imported)
    check_compatible(source, load_config(None, [*same, "model.mbstd_layout=consecutive", "model.mbstd_group=1"]), 0)
    other = ["model.widths=[8,8,8]", "model.w_dim=9", "model.mapping_layers=5", "model.d_mapping_layers=2"]
    with pytest.raises(ConfigError) as e:
        check_compatible(source, load_config(None, [*same, *other]), 0)
    for key in ("model.widths", "model.w_dim", "model.mapping_layers", "model.d_mapping_layers"):
        assert f"{key}: the source has" in str(e.value), key


def test_init_from_an_import_finetunes_g_d_and_ema(imported, tiny_shards, tmp_path, fresh_accelerator):
    model = json.loads((imported / "config.json").read_text())["config"]["model"]
    keys = ("arch", "z_dim", "w_dim", "widths", "mapping_layers", "mbstd_group", "g_width", "d_width")
    network = [f"model.{k}={json.dumps(model[k]) if isinstance(model[k], list) else model[k]}" for k in keys]
    args = tiny_overrides(tiny_shards, tmp_path / "ft", *network, f"train.init_from={imported}", "train.steps=2",
                          "optim.ema_rampup=0", "data.batch_size=4")
    assert run(load_config(None, args)) == "done"
    step = tmp_path / "ft" / "checkpoints" / "step-000000002"
    for net, file in (("G", "G.safetensors"), ("D", "D.safetensors"), ("G_ema", "model.safetensors")):
        src, tuned = load_file(str(imported / file)), load_file(str(step / f"{net}.safetensors"))
        assert src.keys() == tuned.keys()
        # Two steps of Adam move a weight by about lr each, a fresh init (or G_ema copied from G)
        # would be O(0.1-1) away. w_avg tracks w while training; the EMA's buffers follow G's.
        params = [k for k in src if not k.endswith("w_avg") and not (net == "G_ema" and k.endswith("noise_const"))]
        worst = max(params, key=lambda k: (src[k] - tuned[k]).abs().max().item())
        assert (src[worst] - tuned[worst]).abs().max().item() < 0.02, (net, worst)
    assert any(not torch.equal(src[k], tuned[k]) for k in src)
