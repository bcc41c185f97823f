"""The config schema: every shipped file loads; typos are errors with a suggestion."""

from __future__ import annotations

import glob
import os

import pytest

from trainers.config import Config, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"mnist1d_cnn.yaml", "mnist1d_mlp.yaml", "mnist1d_vae.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.train.steps and config.data.batch_size > 0


def test_extends_and_overrides(tmp_path):
    mlp = load_config(os.path.join(ROOT, "configs", "mnist1d_mlp.yaml"))
    assert mlp.model.name == "mlp" and mlp.data.adapter == "grain"  # from the base
    assert mlp.optimizer.name == "adamw" and mlp.optimizer.kwargs == {"weight_decay": 0.2}
    over = load_config(os.path.join(ROOT, "configs", "mnist1d_mlp.yaml"),
                       ["data.adapter=torch", "data.workers=2", "train.steps=7", "seed=3", "schedule.lr=1e-3"])
    assert (over.data.adapter, over.data.workers, over.train.steps, over.seed) == ("torch", 2, 7, 3)
    assert over.schedule.lr == 0.001 and isinstance(over.schedule.lr, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trian.steps=5", r"unknown config key 'trian'; did you mean 'train'\?"),
        ("train.step=5", r"unknown config key train\.'step'; did you mean train\.'steps'\?"),
        ("data.adaptor=torch", r"unknown config key data\.'adaptor'; did you mean data\.'adapter'\?"),
        ("data.adapter=jax", r"data\.adapter must be one of \('grain', 'torch'\), got 'jax'"),
        ("train.steps=many", r"train\.steps must be int, got 'many'"),
        ("seed", r"override 'seed' must look like dotted\.key=value"),
    ],
)
def test_bad_keys_and_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml"), [override])


def test_extends_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(str(tmp_path / "nope.yaml"))
