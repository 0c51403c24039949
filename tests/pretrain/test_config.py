"""The typed config system: presets, overrides, and rejection of unknown or invalid keys."""

import pytest
import yaml

from pretrain.config import ConfigError, TrainConfig, apply_overrides, load_config, save_config


def _write(tmp_path, data):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, {"stage": "baseline", "model": {"hidden_size": 64}})
    config = load_config(path, ["optim.lr=1e-3", "model.hidden_size=32", "wandb.mode=disabled", "max_steps=7"])
    assert config.optim.lr == pytest.approx(1e-3)
    assert isinstance(config.optim.lr, float)
    assert config.model["hidden_size"] == 32
    assert config.max_steps == 7
    assert config.wandb.mode == "disabled"


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"stage": "baseline", "micro_batchsize": 4}, [], "micro_batchsize"),
        ({"stage": "baseline"}, ["optim.learning_rate=1"], "learning_rate"),
        ({"stage": "baseline", "model": {"hiden_size": 8}}, [], "hiden_size"),
        ({"stage": "decoder"}, [], "stage"),
        ({"stage": "baseline"}, ["optim.schedule=linear"], "schedule"),
        ({"stage": "baseline"}, ["max_steps"], "key=value"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data), overrides)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="no preset"):
        load_config("no-such-preset")


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(_write(tmp_path, {"stage": "baseline"}), ["seed=7", "optim.warmup_steps=3"])
    save_config(config, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == config
    assert isinstance(again, TrainConfig)


def test_override_into_non_section_is_rejected():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
