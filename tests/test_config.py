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


def test_overrides_deep_merge_into_nested_mappings():
    """Regression: a dotted override into kwargs used to drop the other kwargs."""
    cnn = os.path.join(ROOT, "configs", "mnist1d_cnn.yaml")
    config = load_config(cnn, ["optimizer.kwargs.b1=0.8", "model.kwargs.channels=25"])
    assert config.optimizer.kwargs == {"weight_decay": 0.05, "b1": 0.8}
    assert config.model.kwargs == {"channels": 25, "num_outputs": 10}
    config = load_config(cnn, ["data.key_mapping.a=x", "data.key_mapping.b=y"])
    assert config.data.key_mapping == {"a": "x", "b": "y"}


def test_replace_tag_replaces_a_whole_mapping(tmp_path):
    cnn = os.path.join(ROOT, "configs", "mnist1d_cnn.yaml")
    assert load_config(cnn, ["model.kwargs=!replace {channels: 25}"]).model.kwargs == {"channels": 25}
    assert load_config(cnn, ["optimizer.kwargs=!replace {}"]).optimizer.kwargs == {}
    (tmp_path / "base.yaml").write_text("model: {name: mlp, kwargs: {hidden: [8], num_outputs: 3}}\n")
    (tmp_path / "merge.yaml").write_text("extends: base.yaml\nmodel: {kwargs: {hidden: [4]}}\n")
    (tmp_path / "swap.yaml").write_text("extends: base.yaml\nmodel:\n  kwargs: !replace {hidden: [4]}\n")
    assert load_config(str(tmp_path / "merge.yaml")).model.kwargs == {"hidden": [4], "num_outputs": 3}
    swapped = load_config(str(tmp_path / "swap.yaml"))
    assert swapped.model.kwargs == {"hidden": [4]} and type(swapped.model.kwargs) is dict  # no marker left behind


def test_shipped_configs_resolve_to_what_they_mean():
    mlp = load_config(os.path.join(ROOT, "configs", "mnist1d_mlp.yaml"))
    assert mlp.model.kwargs == {"hidden": [100, 100], "num_outputs": 10}  # not the CNN's channels
    vae = load_config(os.path.join(ROOT, "configs", "mnist1d_vae.yaml"))
    assert (vae.model.kwargs, vae.optimizer.name, vae.optimizer.kwargs) == ({"hidden": [32, 16], "latent": 4}, "adam", {})


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.source=h6", r"data\.source must be one of \('h5', 'h5_cached', 'tar'\), got 'h6'"),
        ("data.batch_size=0", r"data\.batch_size must be at least 1, got 0"),
        ("data.workers=-1", r"data\.workers must be at least 0, got -1"),
        ("train.keep_checkpoints=0", r"train\.keep_checkpoints must be at least 1, got 0"),
        ("model.kwargs=[1, 2]", r"model\.kwargs must be a mapping, got \[1, 2\]"),
        ("model.kwargs={a: [}", r"override 'model\.kwargs=\{a: \[\}': the value is not valid YAML"),
    ],
)
def test_values_out_of_the_schema_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml"), [override])


def test_a_registered_source_is_a_valid_data_source():
    from loaders import DATASET_REGISTRY

    class MySource:
        pass

    DATASET_REGISTRY.register(MySource, name="my_source_for_config_test")
    try:
        assert load_config(None, ["data.source=my_source_for_config_test"]).data.source == "my_source_for_config_test"
    finally:
        DATASET_REGISTRY._table.pop("my_source_for_config_test")
