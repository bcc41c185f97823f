"""The one typed config schema: frozen dataclasses, YAML files with ``extends``, dotted overrides.

Defaults live in these dataclasses and nowhere else. An unknown key is an error that
suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
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
    or tar shards as a list, glob, brace pattern or YAML shard list), or a ``module``:
    a Helios ``DataModule`` whose ``setup()`` builds the sources (then ``dataset``,
    ``train``, ``eval``, ``source`` and ``source_options`` must be left unset; order and
    batch size still come from ``batch_size``, ``shuffle`` and the run's ``seed``).
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
    # Keyword arguments for the source class, e.g. HDF5's chunk cache: {rdcc_nbytes: 0}
    source_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A Helios-style DataModule (module:Class): its train (and valid) datasets are the sources
    module: str | None = None


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
    audit: bool = False  # write per-step hashes of the data read (audit/): python -m trainers.audit RUN_A RUN_B


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """AXOL1TL's data preparation, run before training when ``source`` is set; the prepared
    train and validation files then feed ``data`` (a re-run with the same inputs and settings
    reuses them: they are cached by a hash of both).

    ``source``: ``mnist1d`` (the built-in MNIST-1D, train and test together), a raw HDF5
    file, or WebDataset tar shards (a ``.tar`` path, brace pattern, glob or YAML shard list);
    ``features`` its dataset of events (rows) x features (for shards: a member extension
    such as ``x.npy``), ``labels`` the dataset (or extension, e.g. ``y.cls``) whose
    values pick the ``background`` (a list of values; default: every value no signal takes)
    and each signal. ``signals``: ``{name: [label values]}`` or ``{name: other_file.h5}`` (every
    row of that file's ``features`` dataset is that signal). The background is shuffled by
    ``seed`` and split by ``split`` (train, validation, test fractions).

    Per feature, in this order: ``saturation`` ``{maxima: x or [x per feature], flag: bool}``
    clips values to +-maxima (``flag`` stores which events saturated); ``normalization``
    (``standard``: mean/std, ``robust``: median/IQR, ``none``), fitted on the training split
    only; ``quantization`` ``{total_bits, integer_bits}`` rounds to the fixed-point grid
    firmware uses, saturating at its range.
    """

    source: str | None = None
    features: str = "x"
    labels: str | None = "y"
    feature_names: list[str] | None = None
    background: list[Any] | None = None
    signals: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: list[float] = dataclasses.field(default_factory=lambda: [0.6, 0.1, 0.3])
    seed: int = 0
    saturation: dict[str, Any] | None = None
    normalization: str = "standard"  # standard | robust | none
    quantization: dict[str, Any] | None = None
    cache_dir: str | None = None  # default: data.cache_dir, else $TANDEM_CACHE_DIR/datasets


@dataclasses.dataclass(frozen=True)
class AnomalyConfig:
    """AXOL1TL's stages after training (``enabled``; needs ``prepare``): anomaly scores of the
    background test set and every signal, thresholds at target rates, efficiencies, ROC
    AUC, plots, ``complete.h5`` / ``lite.h5`` and the HTML (and PDF) report, all in the workdir.

    ``scores``: ``reconstruction`` (mean squared error per event), ``reconstruction_mae``,
    ``ad_score`` (sum of squared latent means, the firmware's score), ``kl`` (the latent's KL
    divergence), or ``module:function`` taking ``(outputs, x)`` and returning one score per
    event. ``rates_khz``: target trigger rates; ``total_rate_khz``: the input rate (default:
    the LHC's filled bunch crossings, 28,552 kHz). ``baselines``: ``[isolation_forest]``
    fits scikit-learn's IsolationForest on the same training split for comparison.
    Changing these settings never changes training, so a resumed run may.
    """

    enabled: bool = False
    scores: list[str] = dataclasses.field(default_factory=lambda: ["reconstruction", "ad_score"])
    rates_khz: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0, 10.0, 100.0, 1000.0])
    total_rate_khz: float = 40_000 * 2_544 / 3_564
    batch_size: int = 4096
    baselines: list[str] = dataclasses.field(default_factory=list)
    plots: bool = True
    store: bool = True
    report: bool = True
    pdf: bool = True  # print report.html to report.pdf with headless Chromium (skipped with a warning if absent)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    anomaly: AnomalyConfig = dataclasses.field(default_factory=AnomalyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


CHOICES = {
    ("data", "shuffle"): ("full", "block", "none"),
    ("data", "adapter"): ("grain", "torch"),
    ("schedule", "name"): ("constant", "warmup_cosine", "cosine_restarts"),
    ("prepare", "normalization"): ("standard", "robust", "none"),
}


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting: from ``low`` (excluded if ``low_open``) up to ``high``; always finite."""

    low: float
    high: float | None = None
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        finite = isinstance(value, int) or math.isfinite(value)  # an int of any size is finite (isfinite overflows)
        return finite and above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = f"greater than {self.low}" if self.low_open else f"at least {self.low}"
        if self.high is None:
            return low
        return f"greater than {self.low} and at most {self.high}" if self.low_open else f"between {self.low} and {self.high}"


INT_MAX = 2**63 - 1  # no integer setting may exceed a 64-bit integer (libraries convert them to C ints or floats)
# The allowed values of every numeric setting ("" is the top level); None stays allowed where the type allows it.
RANGES = {
    ("", "seed"): Range(0, 2**63 - 1),
    ("data", "batch_size"): Range(1),
    ("data", "eval_batch_size"): Range(1),
    ("data", "workers"): Range(0),
    ("optimizer", "clip_norm"): Range(0, low_open=True),
    ("schedule", "lr"): Range(0, low_open=True),
    ("schedule", "warmup_steps"): Range(0),
    ("schedule", "end_factor"): Range(0, 1),
    ("schedule", "cycle_steps"): Range(1),
    ("schedule", "cycle_mult"): Range(1),
    ("schedule", "peak_decay"): Range(0, 1, low_open=True),
    ("train", "steps"): Range(1),
    ("train", "epochs"): Range(1),
    ("train", "eval_every"): Range(0),  # 0: only at the end
    ("train", "checkpoint_every"): Range(0),  # 0: only at the end
    ("train", "keep_checkpoints"): Range(1),
    ("train", "log_every"): Range(1),
    ("train", "devices"): Range(1),
    ("prepare", "seed"): Range(0, 2**63 - 1),
    ("anomaly", "total_rate_khz"): Range(0, low_open=True),
    ("anomaly", "batch_size"): Range(1),
}
# What a resumed run may change: settings that alter neither the train state nor the training data and its order.
# Every other difference from the checkpoint's config is refused (see resume_changes).
RESUMABLE = frozenset({
    "train.steps", "train.epochs", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.log_every", "train.devices", "train.audit", "data.adapter", "data.workers", "data.eval_batch_size",
})
RESUMABLE_SECTIONS = ("anomaly.",)  # every setting under these: the stages after training


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
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {value} is too large for a float") from None
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
            rule = RANGES.get((where.rstrip("."), key))
            value = kwargs[key]
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
                shown = f"{str(value)[:12]}... ({len(str(value))} digits)"
                raise ConfigError(f"{where}{key} must be at most {INT_MAX} (a 64-bit integer), got {shown}")
            if rule is not None and value is not None and value not in rule:
                raise ConfigError(f"{where}{key} must be {rule}, got {value!r}")
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
    """A config file as a dict, with ``extends: base.yaml`` (or a list of files, merged in order, the
    later over the earlier) merged under it, recursively."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(_seen + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path) as f:
        try:
            doc = _load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file must be a mapping")
    raw = doc.pop("extends", None)
    bases = [raw] if isinstance(raw, str) else [] if raw is None else raw
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: 'extends' must be a file name or a list of file names, got {raw!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, read_yaml(os.path.join(os.path.dirname(path), base), _seen + (path,)))
    return _merge(merged, doc)


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


def load_config(path: str | dict[str, Any] | None = None,
                overrides: list[str] | tuple[str, ...] | dict[str, Any] = ()) -> Config:
    """The resolved :class:`Config`: file (with ``extends``) < overrides.

    ``path`` is a YAML file, or a dict in the same form (its ``extends`` names files
    relative to the working directory). ``overrides`` are ``dotted.key=value`` strings or
    a nested dict, deep-merged over it (AXOL1TL's ``main(slave={...})``). Nested mappings
    merge key by key (``model.kwargs.channels=25`` keeps the other kwargs); a mapping
    tagged ``!replace`` replaces the one below it whole, in a file
    (``kwargs: !replace {hidden: [64]}``) or an override (``'model.kwargs=!replace {hidden: [64]}'``).
    """
    if isinstance(path, dict):
        doc = dict(path)
        raw = doc.pop("extends", None)
        merged: dict[str, Any] = {}
        for base in [raw] if isinstance(raw, str) else raw or []:
            merged = _merge(merged, read_yaml(base))
        doc, where = _merge(merged, doc), "config"
    else:
        doc, where = (read_yaml(path) if path else {}), path or "config"
    if isinstance(overrides, dict):
        doc = _merge(doc, overrides)
    else:
        for o in overrides:
            doc = apply_override(doc, o)
    doc = _plain(doc)
    try:
        return _build(Config, doc)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


_UNSET = object()


def _leaves(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every non-mapping value of ``doc`` by its dotted key (nested mappings, ``kwargs`` included, are walked)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The settings in which ``current`` differs from a checkpoint's ``saved`` resolved config, each as
    ``key: old -> new`` (values as JSON), split into (refused, allowed): allowed are only the keys in
    :data:`RESUMABLE`. A schema setting the saved config lacks (an older Tandem) counts as its default."""
    old, new = _leaves(saved), _leaves(json.loads(json.dumps(current)))
    defaults = _leaves(Config().to_dict())
    refused: list[str] = []
    allowed: list[str] = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, defaults.get(key, _UNSET)), new.get(key, _UNSET)
        if a != b:
            a_text, b_text = ("(unset)" if v is _UNSET else json.dumps(v) for v in (a, b))
            ok = key in RESUMABLE or key.startswith(RESUMABLE_SECTIONS)
            (allowed if ok else refused).append(f"{key}: {a_text} -> {b_text}")
    return refused, allowed
