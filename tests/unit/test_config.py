"""Config: defaults < YAML file < command line, and errors that name the key."""

import dataclasses

import pytest

from distgan.config import Config, ConfigError, describe, field_docs, load_config, parse_override, rule_of


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.data.source == "builtin:twemoji"
    assert cfg.optim.d_steps >= 1 and cfg.train.resume == "auto"


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "train:\n  steps: 50\n  seed: 3\noptim:\n  g_lr: 0.001\n")
    cfg = load_config(path, ["train.steps=7"])
    assert cfg.train.steps == 7  # command line wins over file
    assert cfg.train.seed == 3  # file wins over default
    assert cfg.optim.g_lr == 0.001
    assert cfg.optim.d_lr == Config().optim.d_lr  # untouched default


def test_override_types_are_coerced():
    cfg = load_config(None, ["optim.g_betas=[0.0, 0.99]", "logging.tags=[a,b]", "data.hflip=false",
                             "optim.d_lr=1e-3", "train.steps=1_000"])
    assert cfg.optim.g_betas == (0.0, 0.99)
    assert cfg.logging.tags == ["a", "b"]
    assert cfg.data.hflip is False
    assert cfg.optim.d_lr == pytest.approx(1e-3)
    assert cfg.train.steps == 1000


def test_dict_overrides():
    cfg = load_config(None, {"train.steps": 11, "model.arch": "resnet"})
    assert cfg.train.steps == 11 and cfg.model.arch == "resnet"


@pytest.mark.parametrize("override, expected", [
    ("train.step=5", "Did you mean 'train.steps'"),
    ("optim.dsteps=5", "Did you mean 'optim.d_steps'"),
    ("trian.steps=5", "Did you mean 'train'"),
    ("steps=5", "section.key"),
])
def test_unknown_key_names_it_and_suggests(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("override", ["train.steps=abc", "optim.d_lr=fast", "data.hflip=maybe", "optim.g_betas=[1]",
                                      "train.steps=2.5", "data.batch_size=true"])
def test_wrong_type_names_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "model:\n  archh: dcgan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "model.archh" in str(err.value) and "model.arch" in str(err.value)


@pytest.mark.parametrize("override, match", [
    ("loss.objective=hinj", "Did you mean 'hinge'"),
    ("data.resolution=48", r"'dcgan' does not support resolution 48 \(data\.resolution\); supported resolutions: "
                           "16, 32, 64, 128, 256"),
    ("data.resolution=512", r"'dcgan' does not support resolution 512 \(data\.resolution\); supported resolutions: "
                            "16, 32, 64, 128, 256"),
    ("data.channels=4", "1 or 3"),
    ("optim.d_steps=0", "at least 1"),
    ("loss.diffaugment=color,transl", "translation"),
    ("dist.mixed_precision=fp8", "bf16"),
    ("optim.g_lr=-1", r"optim\.g_lr=-1\.0: must be greater than 0"),
    ("optim.d_lr=0", r"optim\.d_lr=0\.0: must be greater than 0"),
    ("data.batch_size=0", r"data\.batch_size=0: must be at least 1"),
    ("data.batch_size=-4", r"data\.batch_size=-4: must be at least 1"),
    ("optim.g_betas=[0.5,1.0]", r"optim\.g_betas=\[0\.5, 1\.0\]: each value must be at least 0 and less than 1"),
    ("optim.d_betas=[-0.1,0.9]", r"optim\.d_betas=\[-0\.1, 0\.9\]: each value must be at least 0 and less than 1"),
    ("optim.grad_clip=-1", r"optim\.grad_clip=-1\.0: must be at least 0"),
    ("data.max_skip_fraction=1.5", r"data\.max_skip_fraction=1\.5: must be at least 0 and at most 1"),
    ("model.g_width=0", r"model\.g_width=0: must be at least 1"),
    ("model.z_dim=0", r"model\.z_dim=0: must be at least 1"),
    ("model.g_norm=layer", r"model\.g_norm='layer': must be 'batch' or 'none'"),
    ("model.arch=dcgn", r"model\.arch='dcgn' is not a known architecture\. Did you mean 'dcgan'\?"),
    ("dist.zero_stage=5", r"dist\.zero_stage=5: must be 0, 1, 2 or 3"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_resolution_limits_come_from_the_architecture():
    """The registry, not config.py, says which sizes an arch supports."""
    from distgan.models import register_arch
    from distgan.models import registry

    @register_arch("test-only-32", resolutions=(32,))
    def _build(cfg, resolution, channels, num_classes):  # pragma: no cover - never built
        raise AssertionError

    try:
        assert load_config(None, ["model.arch=test-only-32", "data.resolution=32"]).data.resolution == 32
        with pytest.raises(ConfigError, match=r"'test-only-32' does not support resolution 64 \(data\.resolution\)"):
            load_config(None, ["model.arch=test-only-32", "data.resolution=64"])
    finally:
        registry._REGISTRY.pop("test-only-32")
        registry.ARCHS.remove("test-only-32")


def test_rules_are_declared_with_the_fields_and_listed_by_help_config():
    assert rule_of("optim.g_lr").greater_than == 0 and rule_of("data.source") is None
    assert "optim.g_lr = 0.0002 (must be greater than 0)" in describe()


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.steps")


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(Config):
        docs = field_docs(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
    assert "data.source" in describe()


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=9", "optim.g_betas=[0.1,0.2]", "logging.tags=[x]"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        load_config(recipe)


def test_yaml_words_stay_strings(tmp_path):
    cfg = load_config(write(tmp_path, "logging:\n  wandb: off\n"), ["train.resume=none", "data.hflip=false"])
    assert cfg.logging.wandb == "off" and cfg.train.resume == "none" and cfg.data.hflip is False
    assert load_config(None, ["logging.wandb=off"]).logging.wandb == "off"


def test_device_policy_keys():
    """The GPU policy keys: defaults that keep CPU runs as they were, and their rules."""
    cfg = load_config()
    assert (cfg.dist.cudnn_benchmark, cfg.dist.channels_last, cfg.train.deterministic, cfg.optim.adam_impl) == \
        (True, False, False, "auto")
    cfg = load_config(None, ["dist.mixed_precision=auto", "train.deterministic=true", "optim.adam_impl=loop",
                             "dist.channels_last=true", "dist.cudnn_benchmark=false"])
    assert (cfg.dist.mixed_precision, cfg.train.deterministic, cfg.optim.adam_impl) == ("auto", True, "loop")
    with pytest.raises(ConfigError, match="optim.adam_impl.*Did you mean 'fused'"):
        load_config(None, ["optim.adam_impl=fusd"])
    assert "compute capability" in field_docs(type(cfg.dist))["mixed_precision"]
