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


# --------------------------------------------------------------------------- ranges of numeric settings
@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=-5", r"train\.steps must be at least 1, got -5"),
        ("train.log_every=0", r"train\.log_every must be at least 1, got 0"),
        ("train.eval_every=-1", r"train\.eval_every must be at least 0, got -1"),
        ("train.epochs=0", r"train\.epochs must be at least 1, got 0"),
        ("seed=-1", r"seed must be between 0 and 9223372036854775807, got -1"),
        ("schedule.lr=0", r"schedule\.lr must be greater than 0, got 0\.0"),
        ("schedule.lr=-1e-3", r"schedule\.lr must be greater than 0, got -0\.001"),
        ("schedule.lr=.nan", r"schedule\.lr must be greater than 0, got nan"),
        ("schedule.lr=1e400", r"schedule\.lr must be greater than 0, got inf"),
        ("schedule.end_factor=1.5", r"schedule\.end_factor must be between 0 and 1, got 1\.5"),
        ("schedule.cycle_mult=0.5", r"schedule\.cycle_mult must be at least 1, got 0\.5"),
        ("schedule.peak_decay=0", r"schedule\.peak_decay must be greater than 0 and at most 1, got 0\.0"),
        ("optimizer.clip_norm=0", r"optimizer\.clip_norm must be greater than 0, got 0\.0"),
        ("train.steps=" + "9" * 400, r"train\.steps must be at most 9223372036854775807 .*, got 9+\.\.\. \(400 digits\)"),
        ("optimizer.clip_norm=" + "9" * 400, r"optimizer\.clip_norm: 9+ is too large for a float"),
    ],
)
def test_numeric_settings_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml"), [override])


def test_every_numeric_setting_has_a_range():
    """Each int / float field of the schema has a rule in RANGES, and its default is inside it."""
    import dataclasses
    import typing

    from trainers.config import RANGES

    def numeric(hint) -> bool:  # int, float, or optional ones (lists of numbers are checked where they are used)
        args = typing.get_args(hint)
        return hint in (int, float) or typing.get_origin(hint) is not list and any(a in (int, float) for a in args)

    found = []
    sections = [("", Config())] + [(f.name, getattr(Config(), f.name)) for f in dataclasses.fields(Config)
                                   if dataclasses.is_dataclass(getattr(Config(), f.name))]
    for section, obj in sections:
        for name, hint in typing.get_type_hints(type(obj)).items():
            if numeric(hint):
                found.append((section, name))
                default = getattr(obj, name)
                assert (section, name) in RANGES, f"{section}.{name} has no range"
                assert default is None or default in RANGES[section, name], f"{section}.{name} default {default}"
    assert set(found) == set(RANGES)  # and no rule for a setting that is gone


# --------------------------------------------------------------------------- extends
def test_extends_takes_a_list_of_files_merged_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\nmodel: {name: mlp, kwargs: {hidden: [8], num_outputs: 3}}\n")
    (tmp_path / "b.yaml").write_text("seed: 2\nmodel: {kwargs: {hidden: [4]}}\n")
    (tmp_path / "run.yaml").write_text("extends: [a.yaml, b.yaml]\ntrain: {steps: 7}\n")
    config = load_config(str(tmp_path / "run.yaml"))
    assert (config.seed, config.model.kwargs, config.train.steps) == (2, {"hidden": [4], "num_outputs": 3}, 7)
    (tmp_path / "none.yaml").write_text("extends: []\nseed: 4\n")
    assert load_config(str(tmp_path / "none.yaml")).seed == 4


@pytest.mark.parametrize("value", ["5", "[a.yaml, 5]", "{a: b}", "''", "[.]"])
def test_extends_must_name_files(tmp_path, value):
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    (tmp_path / "run.yaml").write_text(f"extends: {value}\n")
    message = r"run\.yaml: 'extends' must be a file name or a list of file names, got " if value != "[.]" \
        else r"no such config file"
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "run.yaml"))


# --------------------------------------------------------------------------- what a resumed run may change
def test_resume_changes_refuse_all_but_the_allowlist():
    from trainers.config import resume_changes

    saved = load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml")).to_dict()
    same = load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml"),
                       ["train.steps=9000", "data.workers=2", "data.adapter=torch", "train.keep_checkpoints=1",
                        "train.eval_every=7", "train.log_every=3", "train.checkpoint_every=9", "train.devices=2",
                        "data.eval_batch_size=10"]).to_dict()
    refused, allowed = resume_changes(saved, same)
    assert refused == [] and len(allowed) == 9 and "train.steps: 6000 -> 9000" in allowed
    other = load_config(os.path.join(ROOT, "configs", "mnist1d_cnn.yaml"),
                        ["model.kwargs.channels=32", "model.kwargs.extra=1", "optimizer.kwargs=!replace {}", "seed=1",
                         "data.batch_size=10", "data.shuffle=none", "data.source=tar", "data.cache_dir=/x",
                         "loss.name=mse", "schedule.warmup_steps=0", "optimizer.clip_norm=1"]).to_dict()
    refused, allowed = resume_changes(saved, other)
    assert allowed == [] and refused == [
        "data.batch_size: 50 -> 10", 'data.cache_dir: null -> "/x"', 'data.shuffle: "full" -> "none"',
        'data.source: "h5" -> "tar"', 'loss.name: "cross_entropy" -> "mse"', "model.kwargs.channels: 64 -> 32",
        "model.kwargs.extra: (unset) -> 1", "optimizer.clip_norm: null -> 1.0", "optimizer.kwargs.weight_decay: 0.05 -> (unset)",
        "schedule.warmup_steps: 100 -> 0", "seed: 0 -> 1"]
    old = {k: v for k, v in saved.items() if k != "seed"}  # saved by a Tandem without that setting: its default
    assert resume_changes(old, saved) == ([], [])
