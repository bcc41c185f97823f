"""The one typed config schema: frozen dataclasses, YAML files with ``extends``, dotted overrides.

Defaults live in these dataclasses and nowhere else. An unknown key is an error that
suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    ``dataset: mnist1d`` generates MNIST-1D once into ``cache_dir`` (HDF5 and tar
    shards) and fills ``train`` / ``eval`` itself; otherwise give paths (an HDF5 file,
    or tar shards as a list, glob, brace pattern or YAML shard list).
    """

    dataset: str | None = None
    source: str = "h5"  # a name in loaders.DATASET_REGISTRY (h5 | h5_cached | tar, or registered) or module:Class
    train: Any = None
    eval: Any = None
    cache_dir: str | None = None
    keys: list[str] | None = None
    key_mapping: dict[str, str] | None = None
    input_key: str = "x"
    label_key: str = "y"
    batch_size: int = 128
    eval_batch_size: int = 500
    shuffle: str = "full"  # full | block | none
    adapter: str = "grain"  # grain | torch
    workers: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A built-in model name (mlp, cnn1d, cnn2d, autoencoder, vae) or ``module:Class``."""

    name: str = "mlp"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A built-in loss (cross_entropy, mse, vae) or ``module:function``."""

    name: str = "cross_entropy"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer by name (``adam``, ``adamw``, ``sgd``, ...) with its keyword arguments."""

    name: str = "adam"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    clip_norm: float | None = None


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate, built from optax.

    ``constant``; ``warmup_cosine`` (linear warmup, then cosine decay to
    ``end_factor * lr`` at the end of training); ``cosine_restarts`` (AXOL1TL's
    CosineDecayRestarts with warmup: a warmup, then cosine cycles of ``cycle_steps``
    growing by ``cycle_mult``, each peak scaled by ``peak_decay``).
    """

    name: str = "constant"
    lr: float = 1e-3
    warmup_steps: int = 0
    end_factor: float = 0.0
    cycle_steps: int = 1000
    cycle_mult: float = 1.0
    peak_decay: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long, and how often to evaluate, log and checkpoint."""

    steps: int | None = 1000
    epochs: int | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    devices: int | None = None  # local devices for pmap (default: all)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


CHOICES = {
    ("data", "shuffle"): ("full", "block", "none"),
    ("data", "adapter"): ("grain", "torch"),
    ("schedule", "name"): ("constant", "warmup_cosine", "cosine_restarts"),
}
# The smallest value of each integer setting (None stays allowed where the type allows it).
MINIMUM = {
    ("data", "batch_size"): 1,
    ("data", "eval_batch_size"): 1,
    ("data", "workers"): 0,
    ("schedule", "warmup_steps"): 0,
    ("schedule", "cycle_steps"): 1,
    ("train", "steps"): 1,
    ("train", "epochs"): 1,
    ("train", "eval_every"): 0,
    ("train", "checkpoint_every"): 0,
    ("train", "keep_checkpoints"): 1,
    ("train", "log_every"): 1,
    ("train", "devices"): 1,
}


def _choices(section: str, key: str) -> tuple[str, ...] | None:
    if (section, key) == ("data", "source"):  # the registry is the one list of source kinds
        from loaders import DATASET_REGISTRY

        return tuple(DATASET_REGISTRY)
    return CHOICES.get((section, key))


def _suggest(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {where}{close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {where}{key!r}{hint} (valid: {', '.join(valid)})")


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any or value is None and (origin in (typing.Union, types.UnionType)):
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            if arm is type(None):
                continue
            try:
                return _check_type(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _suggest(key, names, where)
        hint = hints[key]
        if _is_dataclass_type(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, f"{where}{key}")
            choices = _choices(where.rstrip("."), key)
            by_path = (where, key) == ("data.", "source") and ":" in kwargs[key]  # module:Class
            if choices and kwargs[key] not in choices and not by_path:
                raise ConfigError(f"{where}{key} must be one of {choices}, got {kwargs[key]!r}")
            low = MINIMUM.get((where.rstrip("."), key))
            if low is not None and kwargs[key] is not None and kwargs[key] < low:
                raise ConfigError(f"{where}{key} must be at least {low}, got {kwargs[key]!r}")
    return cls(**kwargs)


class Replace(dict):
    """A mapping that replaces the one under it instead of merging into it (YAML tag ``!replace``)."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader plus the ``!replace`` tag on mappings."""


_Loader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def _load_yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged into ``base``: nested mappings merge key by key (``kwargs`` and
    ``key_mapping`` too); a :class:`Replace` mapping takes the place of the one below whole."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Replace):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, with ``extends: base.yaml`` merged under it (recursively)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(_seen + (path,))}")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path) as f:
        try:
            doc = _load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file must be a mapping")
    base = doc.pop("extends", None)
    if base is None:
        return doc
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return _merge(read_yaml(base_path, _seen + (path,)), doc)


def apply_override(doc: dict[str, Any], override: str) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) applied to a config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {e}") from None
    parts = dotted.strip().split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return _merge(doc, nested)


def _plain(value: Any) -> Any:
    """``value`` with every :class:`Replace` marker turned back into a plain dict (after merging)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved :class:`Config`: file (with ``extends``) < dotted overrides.

    Nested mappings merge key by key (``model.kwargs.channels=25`` keeps the other
    kwargs); a mapping tagged ``!replace`` replaces the one below it whole, in a file
    (``kwargs: !replace {hidden: [64]}``) or an override (``'model.kwargs=!replace {hidden: [64]}'``).
    """
    doc = read_yaml(path) if path else {}
    for o in overrides:
        doc = apply_override(doc, o)
    doc = _plain(doc)
    try:
        return _build(Config, doc)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
