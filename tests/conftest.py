"""Shared fixtures: data written by other tools (webdataset, GNU tar, h5py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

N_RECORDS = 300
IMG = (3, 8, 8)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tar indexes go to this test's own folder, never ~/.cache."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))


def make_records(n: int = N_RECORDS, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *IMG), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    return x, y


@pytest.fixture(scope="session")
def records():
    return make_records()


def write_tar(path, members) -> str:
    """A plain ustar archive of ``(name, bytes)`` members, written by Python's tarfile."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def write_wds(folder, x, y, *, maxcount=64, mtime=None, extra=None):
    """Shards written by webdataset's own ShardWriter."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    pattern = os.path.join(str(folder), "train-%06d.tar")
    kwargs = {} if mtime is None else {"mtime": mtime}
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, **kwargs) as sink:
        for i in range(len(x)):
            sample = {"__key__": f"sample{i:06d}", "npy": x[i], "cls": int(y[i])}
            if extra:
                sample.update(extra(i))
            sink.write(sample)
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))


@pytest.fixture(scope="session")
def wds_shards(tmp_path_factory, records):
    """webdataset ShardWriter output with its default PAX headers (float mtime)."""
    x, y = records
    return write_wds(tmp_path_factory.mktemp("wds"), x, y)


@pytest.fixture(scope="session")
def wds_shards_plain(tmp_path_factory, records):
    """ShardWriter with an integer mtime: plain ustar headers."""
    x, y = records
    return write_wds(tmp_path_factory.mktemp("wds_plain"), x, y, mtime=0)


def write_member_files(folder, x, y, prefix):
    """One .npy and one .cls file per sample, as a user would before running GNU tar."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(len(x)):
        key = f"{prefix}{i:06d}"
        np.save(os.path.join(folder, f"{key}.npy"), x[i])
        with open(os.path.join(folder, f"{key}.cls"), "w") as f:
            f.write(str(int(y[i])))
        names += [f"{key}.cls", f"{key}.npy"]
    return names


@pytest.fixture(scope="session")
def gnu_tar_shards(tmp_path_factory, records):
    """Shards made with GNU tar: one in GNU format, one in PAX format, with long member names."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    x, y = records
    root = tmp_path_factory.mktemp("gnutar")
    long_dir = "d" * 60 + "/" + "e" * 60  # member paths longer than 100 characters
    half = len(x) // 2
    shards = []
    for n, (fmt, lo, hi) in enumerate([("gnu", 0, half), ("pax", half, len(x))]):
        src = root / f"src{n}"
        names = write_member_files(src / long_dir, x[lo:hi], y[lo:hi], prefix=f"{'s' * 40}{n}_")
        shard = root / f"gnu-{n}.tar"
        members = [f"{long_dir}/{name}" for name in names]
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(shard), "-C", str(src), *members], check=True)
        shards.append(str(shard))
    return shards


@pytest.fixture(scope="session")
def h5_path(tmp_path_factory, records):
    """HDF5 written by h5py: gzip, lzf, odd chunk shapes, a contiguous and a big-endian dataset."""
    import h5py

    x, y = records
    path = tmp_path_factory.mktemp("h5") / "data.h5"
    feats = np.random.default_rng(1).normal(size=(len(x), 7)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(37, 3, 8, 8), compression="gzip", compression_opts=4)
        f.create_dataset("y", data=y, chunks=(50,), compression="lzf")
        f.create_dataset("feat", data=feats, chunks=(13, 7))  # uncompressed chunked: direct path
        f.create_dataset("cont", data=feats)  # contiguous: direct path
        f.create_dataset("odd", data=feats, chunks=(29, 3))  # chunks split rows: h5py path
        f.create_dataset("big", data=y.astype(">i4"), chunks=(64,))
    return str(path)


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """MNIST-1D written once for the session's trainer tests (a ``data.cache_dir``)."""
    pytest.importorskip("jax")
    pytest.importorskip("grain")
    from trainers.data import prepare_mnist1d

    root = str(tmp_path_factory.mktemp("datasets"))
    prepare_mnist1d(root)
    return root
