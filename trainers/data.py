"""The trainer's data: built-in datasets written once to a cache, sources and adapters from the config."""

from __future__ import annotations

import fcntl
import glob
import io
import os
import shutil
import tarfile
import tempfile
from typing import Any

import numpy as np

from loaders import DATASET_REGISTRY, Loader, ProcessPart, Sampler

from .config import DataConfig

MNIST1D_TAR_FIELDS = {"x.npy": "x", "y.cls": "y"}


def default_cache_dir() -> str:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(root, "datasets")


def _write_h5(path: str, x: np.ndarray, y: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(min(len(x), 512), x.shape[1]))
        f.create_dataset("y", data=y)


def _write_tar(path: str, x: np.ndarray, y: np.ndarray, start: int) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(len(x)):
            buf = io.BytesIO()
            np.save(buf, x[i])
            for name, data in ((f"{start + i:06d}.x.npy", buf.getvalue()), (f"{start + i:06d}.y.cls", str(int(y[i])).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_mnist1d(cache_dir: str | None = None, shard_size: int = 1000) -> dict[str, Any]:
    """Generate MNIST-1D (4000 train, 1000 test, 40 features) once, as HDF5 and as tar shards.

    One process at a time (a lock file in the cache dir) writes a temporary folder there, flushes it to
    disk and renames it into place, so a killed run never leaves half a dataset in use; the next run
    removes what a killed one left (temporary folders, a folder without its DONE file) and writes it
    again. Returns the paths.
    """
    cache = cache_dir or default_cache_dir()
    root = os.path.join(cache, "mnist1d")
    paths = {
        "h5_train": os.path.join(root, "train.h5"),
        "h5_eval": os.path.join(root, "test.h5"),
        "tar_train": os.path.join(root, "train-{000000..000003}.tar"),
        "tar_eval": os.path.join(root, "test-000000.tar"),
    }
    if os.path.exists(os.path.join(root, "DONE")):
        return paths
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".mnist1d.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if os.path.exists(os.path.join(root, "DONE")):  # another process wrote it while we waited
            return paths
        for stale in glob.glob(os.path.join(cache, ".mnist1d-*")) + ([root] if os.path.lexists(root) else []):
            print(f"removing {stale}: left incomplete by a killed run", flush=True)
            _remove(stale)
        from mnist1d.data import get_dataset_args, make_dataset

        print(f"generating MNIST-1D into {root} (first use only) ...", flush=True)
        data = make_dataset(get_dataset_args())
        tmp = tempfile.mkdtemp(prefix=".mnist1d-", dir=cache)
        x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
        xt, yt = data["x_test"].astype(np.float32), data["y_test"].astype(np.int64)
        _write_h5(os.path.join(tmp, "train.h5"), x, y)
        _write_h5(os.path.join(tmp, "test.h5"), xt, yt)
        for s in range(0, len(x), shard_size):
            _write_tar(os.path.join(tmp, f"train-{s // shard_size:06d}.tar"), x[s : s + shard_size], y[s : s + shard_size], s)
        _write_tar(os.path.join(tmp, "test-000000.tar"), xt, yt, 0)
        open(os.path.join(tmp, "DONE"), "w").close()
        for name in [*os.listdir(tmp), "."]:  # on disk before the rename, so a power cut cannot leave empty files
            _fsync(os.path.join(tmp, name))
        os.replace(tmp, root)
        _fsync(cache)
    return paths


def source_class(cfg: DataConfig) -> type:
    """The class ``data.source`` names: a name in :data:`loaders.DATASET_REGISTRY` (the one list of
    source kinds) or an import path ``module:Class``. It is called as
    ``cls(path, keys=..., rename=...)``, plus ``part=`` when its ``holds_part`` is true."""
    if ":" in cfg.source:
        from .models import import_path

        return import_path(cfg.source)
    return DATASET_REGISTRY.get(cfg.source)


def holds_part(cfg: DataConfig) -> bool:
    """Whether the configured source loads only one process's part (then its sampler reads that part)."""
    return bool(getattr(source_class(cfg), "holds_part", False))


def _paths(cfg: DataConfig) -> tuple[Any, Any]:
    if cfg.dataset is None:
        if cfg.train is None:
            raise ValueError("data.train is not set: give a path (or set data.dataset: mnist1d)")
        return cfg.train, cfg.eval
    if cfg.dataset != "mnist1d":
        raise ValueError(f"unknown built-in dataset {cfg.dataset!r} (known: mnist1d); or set data.train paths")
    fmt = getattr(source_class(cfg), "data_format", None)
    if fmt not in ("tar", "hdf5"):
        raise ValueError(f"data.source {cfg.source!r} reads {fmt or 'an unknown format'}; the built-in dataset "
                         "comes as tar shards or HDF5: set data.train / data.eval paths for it")
    p = prepare_mnist1d(cfg.cache_dir)
    kind = "tar" if fmt == "tar" else "h5"
    return (cfg.train or p[f"{kind}_train"]), (cfg.eval or p[f"{kind}_eval"])


def _check_options(cls: type, options: dict[str, Any]) -> None:
    """Refuse ``data.source_options`` the source class does not take, naming them and the ones it does."""
    import inspect

    from .config import ConfigError

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    taken = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(taken) | set(options) & {"path", "keys", "rename", "part"})
    if unknown:
        allowed = [n for n in taken if n not in ("path", "keys", "rename", "part")]
        raise ConfigError(f"data.source_options {', '.join(map(repr, unknown))}: {cls.__name__} does not take "
                          f"{'it' if len(unknown) == 1 else 'them'} here (it takes: {', '.join(allowed) or 'none'})")


def _source(cfg: DataConfig, path: Any, part: ProcessPart | None) -> Any:
    cls = source_class(cfg)
    tar = getattr(cls, "data_format", None) == "tar"
    keys, rename = cfg.keys, cfg.key_mapping
    if cfg.dataset == "mnist1d" and tar and rename is None:
        rename, keys = MNIST1D_TAR_FIELDS, list(MNIST1D_TAR_FIELDS)
    if keys is None and rename and tar:
        keys = list(rename)  # ATEK's dict_key_mapping: the mapping selects the fields too
    extra = {"part": part} if holds_part(cfg) and part is not None else {}
    _check_options(cls, cfg.source_options)
    return cls(path, keys=keys, rename=rename, **extra, **cfg.source_options)


def open_data_module(cfg: DataConfig) -> Any:
    """The ``data.module`` DataModule, prepared (on the primary process) and set up.

    ``prepare_data()`` runs on process 0 only, the others wait for it; every process
    then calls ``setup()``. The caller calls ``teardown()`` when training is over.
    """
    from . import distributed
    from .config import ConfigError
    from .models import import_path

    given = [k for k in ("dataset", "train", "eval") if getattr(cfg, k) is not None]
    given += ["source_options"] if cfg.source_options else []
    if given:
        raise ConfigError(f"data.module {cfg.module!r} builds the sources: leave data.{', data.'.join(given)} unset")
    try:
        cls = import_path(cfg.module)
    except ValueError as e:
        raise ConfigError(f"data.module: {e}") from None
    module = cls()
    if not callable(getattr(module, "setup", None)) or not hasattr(module, "train_dataset"):
        raise ConfigError(f"data.module {cfg.module!r} is not a DataModule (it needs setup() and train_dataset; "
                          "subclass adapters.helios.DataModule)")
    module.is_distributed = distributed.process_count() > 1
    if distributed.is_primary():
        module.prepare_data()
    if distributed.process_count() > 1:
        distributed.barrier("tandem-data-module-prepared")
    module.setup()
    return module


def module_sources(cfg: DataConfig, module: Any) -> tuple[Any, Any | None]:
    """The training source (``train_dataset.dataset``) and evaluation source (``valid_dataset``'s, if any)."""
    from .config import ConfigError

    train = module.train_dataset
    if train is None:
        raise ConfigError(f"data.module {cfg.module!r}: setup() set no training dataset "
                          "(assign self._train_dataset = self._create_dataset(source, params))")
    valid = module.valid_dataset
    return train.dataset, (valid.dataset if valid is not None else None)


def build_sources(cfg: DataConfig, part: ProcessPart) -> tuple[Any, Any | None]:
    """The training source (this process's part for a source that ``holds_part``) and the evaluation source."""
    train_path, eval_path = _paths(cfg)
    train = _source(cfg, train_path, part)
    evaluation = _source(cfg, eval_path, None) if eval_path is not None else None
    return train, evaluation


def build_adapter(cfg: DataConfig, source: Any, sampler: Sampler):
    """The configured adapter over ``source`` (imported only when named); the trainer reads it
    through ``iter_from(step)`` and keeps the resume position itself."""
    if cfg.adapter == "torch":
        from adapters.torch import TorchLoader

        return TorchLoader(source, sampler, num_workers=cfg.workers)
    from adapters.grain import GrainLoader

    return GrainLoader(source, sampler, worker_count=cfg.workers)


def to_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors (torch adapter) or arrays (Grain) as plain numpy."""
    return {k: v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
            for k, v in batch.items()}


def eval_loader(cfg: DataConfig, source: Any, batch_size: int, part: ProcessPart | None = None) -> Loader:
    """Every evaluation record once, in file order, in batches of ``batch_size`` (this process's slice
    of each, in ``global`` mode), the last one padded and masked by ``_valid``."""
    sampler = Sampler(len(source), batch_size, shuffle=False, drop_remainder=False, num_epochs=1, part=part)
    return Loader(source, sampler, prefetch=2)
