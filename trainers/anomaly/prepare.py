"""AXOL1TL's data preparation, as array functions: saturation, normalization, fixed-point quantization.

Each is a pure numpy function of its inputs, so a preparation is repeatable and its
constants (maxima, offsets, scales, bit widths) can be stored next to the model that
was trained on them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np


def saturate(x: np.ndarray, maxima: np.ndarray | float, *, flag: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Clip each feature to ``[-max, max]`` (``maxima``: one per feature, or one for all).

    With ``flag``, also returns a boolean array of x's shape: True where a value was at
    or beyond its maximum (the detector saturated there).
    """
    x = np.asarray(x)
    m = np.broadcast_to(np.asarray(maxima, dtype=x.dtype if x.dtype.kind == "f" else np.float64), x.shape[-1:])
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError(f"saturation maxima must be finite and positive, got {np.asarray(maxima).tolist()}")
    out = np.clip(x, -m, m)
    return (out, np.abs(x) >= m) if flag else out


def fit_normalization(train: np.ndarray, kind: str = "standard") -> dict[str, Any]:
    """Per-feature ``offset`` and ``scale`` from the training split only.

    ``standard``: mean and standard deviation; ``robust``: median and interquartile
    range (robust to the long tails of momentum spectra). A feature that does not vary
    gets scale 1 (it normalizes to 0, not to NaN).
    """
    x = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    if len(x) == 0:
        raise ValueError("no training events to fit the normalization on")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"training data holds {int(bad.sum())} NaN or infinite value(s) (first: event {row}, feature {col})")
    if kind == "standard":
        offset, scale = x.mean(axis=0), x.std(axis=0)
    elif kind == "robust":
        q1, med, q3 = np.percentile(x, [25, 50, 75], axis=0)
        offset, scale = med, q3 - q1
    else:
        raise ValueError(f"unknown normalization {kind!r} (known: standard, robust)")
    scale = np.where(scale > 0, scale, 1.0)
    return {"kind": kind, "offset": offset, "scale": scale}


def normalize(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """``(x - offset) / scale`` with the constants of :func:`fit_normalization`, as float32."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if flat.shape[1] != len(stats["offset"]):
        raise ValueError(f"data has {flat.shape[1]} features, the normalization {len(stats['offset'])}")
    return ((flat - stats["offset"]) / stats["scale"]).astype(np.float32).reshape(np.shape(x))


def quantize(x: np.ndarray, total_bits: int, integer_bits: int, *, signed: bool = True) -> np.ndarray:
    """Round to the fixed-point grid ``<total_bits, integer_bits>`` and saturate, as firmware stores values.

    The grid step is ``2 ** -(total_bits - integer_bits)``; values round to the nearest
    step (halves to even) and clip to ``[-2 ** (integer_bits - 1), 2 ** (integer_bits - 1) - step]``
    (signed, the sign counted in ``integer_bits``) or ``[0, 2 ** integer_bits - step]``.
    In HLS terms: ``ap_fixed<total, integer, AP_RND_CONV, AP_SAT>``.
    """
    if not 0 < total_bits <= 32 or integer_bits > total_bits:
        raise ValueError(f"fixed-point <{total_bits}, {integer_bits}> needs 0 < total bits <= 32 and integer bits <= total")
    step = 2.0 ** -(total_bits - integer_bits)
    if signed:
        lo, hi = -(2.0 ** (integer_bits - 1)), 2.0 ** (integer_bits - 1) - step
    else:
        lo, hi = 0.0, 2.0 ** integer_bits - step
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.round(x / step) * step, lo, hi).astype(np.float32)


# --------------------------------------------------------------------------- the configured stage
PREPARE_VERSION = 1  # bump when the stage's output changes for the same inputs
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Where a preparation's files are: ``train``, ``validation``, ``test`` and ``signals[name]``
    (HDF5 files with dataset ``x``, plus ``row``, the event's row in its raw file, and
    ``saturated`` when flagged), and its ``constants`` (also in ``constants.json``)."""

    folder: str
    train: str
    validation: str
    test: str
    signals: dict[str, str]
    constants: dict[str, Any]
    cached: bool  # True when an earlier run had prepared it (no work done)


class PrepareError(ValueError):
    """Raw data or ``prepare`` settings that cannot be prepared (the message names the file and dataset)."""


def _raw_identity(path: str) -> dict[str, Any]:
    from loaders._guard import file_digest

    st = os.stat(path)
    return {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sampled": file_digest(path)}


def _read_dataset(path: str, name: str, what: str, bar: Any) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path}: cannot open the {what} as HDF5: {e}") from None
    with f:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            found = []
            f.visititems(lambda k, v: found.append(k) if isinstance(v, h5py.Dataset) else None)
            raise PrepareError(f"{path}: no dataset {name!r} for the {what} (datasets in the file: {found})")
        if ds.ndim == 0:
            raise PrepareError(f"{path}:{name} is a scalar; the {what} must have one row per event")
        out = np.empty(ds.shape, dtype=ds.dtype)
        step = max(1, (1 << 22) // max(1, out[:1].nbytes))  # ~4 MiB a read
        for a in range(0, len(out), step):
            out[a : a + step] = ds[a : a + step]
            bar.update(min(step, len(out) - a))
    return out


def _is_tar(source: str) -> bool:
    """Whether ``source`` names tar shards (a .tar path, a brace pattern, a glob, or a YAML shard list)."""
    return source.endswith((".tar", ".yaml", ".yml")) or any(c in source for c in "{*?")


def _read_tar(source: str, features: str, labels: str | None, bar: Any) -> dict[str, Any]:
    """Every sample's ``features`` (and ``labels``) field of WebDataset shards, in shard order."""
    from loaders import DataError, TarSource

    keys = [features] + ([labels] if labels is not None else [])
    try:
        src = TarSource(source, keys=keys)
    except (DataError, ValueError, OSError) as e:
        raise PrepareError(f"prepare.source {source!r}: {e}") from None
    out: dict[str, Any] = {k: [] for k in keys}
    step = 65536
    for a in range(0, len(src), step):
        batch = src.read_batch(np.arange(a, min(a + step, len(src))))
        for k in keys:
            out[k].append(np.asarray(batch[k]))
        bar.update(min(step, len(src) - a))
    out = {k: np.concatenate(v) for k, v in out.items()}
    out["__shards__"] = list(src.shards)
    return out


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.dtype.kind not in "fiub":
        raise PrepareError(f"{where}: features must be numbers, got dtype {x.dtype}")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise PrepareError(f"{where} holds {int(bad.sum())} NaN or infinite value(s) (first: event {row}, "
                               f"feature {col}: {x.reshape(len(x), -1)[row, col]}); clean or drop them before preparing")


def _raw_sets(cfg: Any, cache_dir: str, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """The raw features of the background and of each signal, each event's row in its file, and the
    raw files read."""
    from loaders._progress import progress as bar_of

    if cfg.source == "mnist1d":
        from ..data import prepare_mnist1d

        paths = prepare_mnist1d(cache_dir)
        files = [paths["h5_train"], paths["h5_eval"]]
    elif _is_tar(cfg.source):
        files = []
    else:
        if not os.path.isfile(cfg.source):
            raise PrepareError(f"prepare.source {cfg.source!r}: no such file (give an HDF5 file, tar shards, or 'mnist1d')")
        files = [cfg.source]
    signal_files = {k: v for k, v in cfg.signals.items() if isinstance(v, str)}
    for name, v in cfg.signals.items():
        if not name or not set(name) <= _NAME_OK or name == "background":
            raise PrepareError(f"prepare.signals: {name!r} cannot name a signal (letters, digits, '_' and '-' only; "
                               "not 'background'): it names the signal's file")
        if not isinstance(v, str | list) or isinstance(v, list) and not v:
            raise PrepareError(f"prepare.signals.{name} must be a list of label values or an HDF5 file, got {v!r}")
        if isinstance(v, str) and not os.path.isfile(v):
            raise PrepareError(f"prepare.signals.{name}: no such file {v!r}")
    bar = bar_of(None, "reading raw data", progress, unit="event")
    try:
        if not files:  # tar shards: the features and labels are fields (member extensions) of each sample
            read = _read_tar(cfg.source, cfg.features, cfg.labels, bar)
            xs, labels, files = [read[cfg.features]], read.get(cfg.labels), read["__shards__"]
        else:
            xs = [_read_dataset(p, cfg.features, "features (prepare.features)", bar) for p in files]
            labels = None
            if cfg.labels is not None:
                labels = np.concatenate([_read_dataset(p, cfg.labels, "labels (prepare.labels)", bar) for p in files])
        signal_x = {k: _read_dataset(p, cfg.features, f"signal {k!r} features (prepare.features)", bar)
                    for k, p in signal_files.items()}
    finally:
        bar.close()
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise PrepareError(f"{cfg.features}: the raw files' events differ in shape: {sorted(shapes)}")
    x = np.concatenate(xs)
    where = f"{cfg.source}:{cfg.features}"
    _check_finite(x, where)
    n_features = int(np.prod(x.shape[1:], dtype=np.int64))
    if cfg.feature_names is not None and len(cfg.feature_names) != n_features:
        raise PrepareError(f"prepare.feature_names lists {len(cfg.feature_names)} names; {where} has {n_features} "
                           f"features per event (shape {x.shape[1:]})")
    if labels is not None and len(labels) != len(x):
        raise PrepareError(f"{cfg.source}: {cfg.labels!r} has {len(labels)} rows, {cfg.features!r} {len(x)}")
    rows = np.arange(len(x), dtype=np.int64)
    sets: dict[str, np.ndarray] = {}
    set_rows: dict[str, np.ndarray] = {}
    taken: set = set()
    for name, v in cfg.signals.items():
        if isinstance(v, str):
            sx = signal_x[name]
            _check_finite(sx, f"{v}:{cfg.features}")
            if sx.shape[1:] != x.shape[1:]:
                raise PrepareError(f"{v}:{cfg.features}: signal {name!r} events have shape {sx.shape[1:]}, the "
                                   f"background's {x.shape[1:]} (the feature lists do not match)")
            sets[name], set_rows[name] = sx, np.arange(len(sx), dtype=np.int64)
            continue
        if labels is None:
            raise PrepareError(f"prepare.signals.{name} selects by label values, but prepare.labels is not set")
        mask = np.isin(labels, v)
        if not mask.any():
            raise PrepareError(f"prepare.signals.{name}: no event of {cfg.source} has a {cfg.labels!r} value in {v} "
                               f"(values found: {np.unique(labels).tolist()[:20]})")
        taken.update(v)
        sets[name], set_rows[name] = x[mask], rows[mask]
    if labels is None:
        bg = np.ones(len(x), dtype=bool)
    elif cfg.background is not None:
        bg = np.isin(labels, cfg.background)
    else:
        bg = ~np.isin(labels, list(taken))
    if not bg.any():
        raise PrepareError(f"prepare: no background events in {cfg.source} (background labels {cfg.background})")
    sets["background"], set_rows["background"] = x[bg], rows[bg]
    return sets, set_rows, files + list(signal_files.values())


def _write_set(path: str, x: np.ndarray, rows: np.ndarray, extra: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        chunk = (max(1, min(len(x), 4096)), *x.shape[1:])
        f.create_dataset("x", data=x, chunks=chunk if len(x) else None)
        f.create_dataset("row", data=rows)
        for k, v in extra.items():
            f.create_dataset(k, data=v)


def prepare_dataset(cfg: Any, cache_dir: str | None = None, *, progress: bool = True) -> Prepared:
    """Run the ``prepare`` stage (a :class:`trainers.config.PrepareConfig`): read the raw data,
    select background and signals, split, saturate, normalize, quantize, and write the files
    under ``cache_dir/prepared/<hash>/``. The hash covers the settings and each raw file's
    name, size, modification time and sampled content, so a re-run with the same inputs
    returns the files already there without reading anything. One process at a time
    prepares (a lock file); a killed preparation leaves only a temporary folder, removed
    by the next one.
    """
    from ..data import default_cache_dir

    cache = cache_dir or default_cache_dir()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    if cfg.source is None:
        raise PrepareError("prepare.source is not set (an HDF5 file, or mnist1d)")
    split = [float(f) for f in cfg.split]
    if len(split) != 3 or any(f <= 0 for f in split) or sum(split) > 1 + 1e-9:
        raise PrepareError(f"prepare.split must be three positive fractions (train, validation, test) summing to at most 1, "
                           f"got {cfg.split}")
    if cfg.source == "mnist1d":
        raw = []
    elif _is_tar(cfg.source):
        from loaders import expand_shards

        try:
            raw = expand_shards(cfg.source)
        except (ValueError, OSError) as e:
            raise PrepareError(f"prepare.source {cfg.source!r}: {e}") from None
    else:
        raw = [cfg.source]
    raw += [v for v in cfg.signals.values() if isinstance(v, str) and os.path.isfile(v)]
    try:
        identity = [_raw_identity(p) for p in raw if os.path.isfile(p)]
    except OSError as e:
        raise PrepareError(f"cannot read {e.filename}: {e.strerror}") from None
    key = json.dumps({"version": PREPARE_VERSION, "settings": settings, "raw": identity}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.path.join(cache, "prepared")
    folder = os.path.join(root, digest)
    if os.path.exists(os.path.join(folder, "DONE")):
        return _load_prepared(folder, cached=True)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if os.path.exists(os.path.join(folder, "DONE")):
            return _load_prepared(folder, cached=True)
        for stale in glob.glob(os.path.join(root, f".{digest}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        if os.path.lexists(folder):
            shutil.rmtree(folder)
        sets, rows, files = _raw_sets(cfg, cache, progress)
        _transform_and_write(cfg, sets, rows, split, root, digest, files)
        return _load_prepared(folder, cached=False)


def _transform_and_write(cfg: Any, sets: dict[str, np.ndarray], rows: dict[str, np.ndarray], split: list[float],
                         root: str, digest: str, files: list[str]) -> dict[str, Any]:
    bg, bg_rows = sets["background"], rows["background"]
    order = np.random.default_rng(cfg.seed).permutation(len(bg))
    n_train, n_val = int(len(bg) * split[0]), int(len(bg) * split[1])
    n_test = int(len(bg) * split[2])
    if min(n_train, n_val, n_test) < 1:
        raise PrepareError(f"prepare.split {cfg.split} of {len(bg)} background events leaves a split empty")
    parts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val],
             "test": order[n_train + n_val : n_train + n_val + n_test]}
    outputs = {name: (bg[idx], bg_rows[idx]) for name, idx in parts.items()}
    outputs.update({f"signal-{k}": (v, rows[k]) for k, v in sets.items() if k != "background"})
    shape = bg.shape[1:]
    n_features = int(np.prod(shape, dtype=np.int64))
    constants: dict[str, Any] = {"version": PREPARE_VERSION, "source": cfg.source, "features": cfg.features,
                                 "feature_names": cfg.feature_names, "event_shape": list(shape), "raw_files": files,
                                 "events": {}, "signals": sorted(k for k in sets if k != "background")}
    flag = False
    maxima = None
    if cfg.saturation is not None:
        unknown = set(cfg.saturation) - {"maxima", "flag"}
        if unknown or "maxima" not in cfg.saturation:
            raise PrepareError(f"prepare.saturation must be {{maxima: x or [one per feature], flag: bool}}, got {cfg.saturation}")
        maxima = np.asarray(cfg.saturation["maxima"], dtype=np.float64).reshape(-1)
        if maxima.size not in (1, n_features):
            raise PrepareError(f"prepare.saturation.maxima has {maxima.size} values for {n_features} features")
        flag = bool(cfg.saturation.get("flag", False))
        constants["saturation"] = {"maxima": np.broadcast_to(maxima, (n_features,)).tolist(), "flag": flag}
    bits = None
    if cfg.quantization is not None:
        if set(cfg.quantization) != {"total_bits", "integer_bits"}:
            raise PrepareError(f"prepare.quantization must be {{total_bits: N, integer_bits: M}}, got {cfg.quantization}")
        bits = (int(cfg.quantization["total_bits"]), int(cfg.quantization["integer_bits"]))
        constants["quantization"] = {"total_bits": bits[0], "integer_bits": bits[1]}

    def saturated(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        flat = x.reshape(len(x), -1).astype(np.float64)
        if maxima is None:
            return flat, None
        try:
            out, hit = saturate(flat, maxima, flag=True)
        except ValueError as e:
            raise PrepareError(f"prepare.saturation: {e}") from None
        return out, hit.sum(axis=1).astype(np.int32)

    train_sat, _ = saturated(outputs["train"][0])
    if cfg.normalization != "none":
        stats = fit_normalization(train_sat, cfg.normalization)
        constants["normalization"] = {"kind": stats["kind"], "offset": stats["offset"].tolist(), "scale": stats["scale"].tolist()}
    else:
        stats = None
    tmp = tempfile.mkdtemp(prefix=f".{digest}-", dir=root)
    for name, (x, r) in outputs.items():
        flat, hits = saturated(x)
        out = normalize(flat, stats) if stats is not None else flat.astype(np.float32)
        if bits is not None:
            out = quantize(out, *bits)
        extra = {"saturated": hits} if flag and hits is not None else {}
        if name == "train":
            extra["x_raw"] = x.reshape(len(x), *shape)
        _write_set(os.path.join(tmp, f"{name}.h5"), out.reshape(len(x), *shape).astype(np.float32), r, extra)
        constants["events"][name] = int(len(x))
    with open(os.path.join(tmp, "constants.json"), "w") as f:
        json.dump(constants, f, indent=1)
    open(os.path.join(tmp, "DONE"), "w").close()
    os.replace(tmp, os.path.join(root, digest))
    return constants


def _load_prepared(folder: str, cached: bool) -> Prepared:
    with open(os.path.join(folder, "constants.json")) as f:
        constants = json.load(f)
    return Prepared(folder=folder, train=os.path.join(folder, "train.h5"), validation=os.path.join(folder, "validation.h5"),
                    test=os.path.join(folder, "test.h5"),
                    signals={k: os.path.join(folder, f"signal-{k}.h5") for k in constants["signals"]},
                    constants=constants, cached=cached)
