"""The index every process on a node shares: a combined tar index (and HDF5 chunk tables) in the
cache, memory-mapped read-only; pickled sources carry only its name."""

from __future__ import annotations

import io
import os
import pickle
import time
import warnings

import numpy as np
import pytest

import loaders._index as index_mod
import loaders._tar_format as tar_format
from loaders import H5Source, TarSource
from loaders._span import MAX_FILES
from loaders._tar import _MAX_OPEN

from .conftest import write_tar

_buf = io.BytesIO()
np.save(_buf, np.zeros(2, dtype=np.int64))
NPY_HEAD = _buf.getvalue()[:-16]  # the .npy header of an int64 (2,) array


def write_shards(folder, count: int, per: int, *, first: int = 0) -> list[str]:
    """``count`` shards of ``per`` records each: record ``i`` holds ``i.npy = [i, -i]`` (int64) and
    ``i.cls = i % 1000``, keys ``k<i>``."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(count):
        ids = range(first + s * per, first + (s + 1) * per)
        members = [(f"k{i:07d}.{ext}", data) for i in ids for ext, data in (
            ("npy", NPY_HEAD + np.array([i, -i], np.int64).tobytes()), ("cls", b"%d" % (i % 1000)))]
        paths.append(write_tar(os.path.join(str(folder), f"s{s:06d}.tar"), members))
    return paths


def check_batch(src: TarSource, idx) -> None:
    idx = np.asarray(idx, dtype=np.int64)
    batch = src.read_batch(idx)
    np.testing.assert_array_equal(batch["npy"], np.stack([idx, -idx], axis=1))
    np.testing.assert_array_equal(batch["cls"], idx % 1000)


def _spy(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# --------------------------------------------------------------------------- pickles
def test_pickled_source_is_small_whatever_the_records(tmp_path):
    sizes = {}
    for n in (2_000, 20_000):
        shards = write_shards(tmp_path / f"d{n}", 10, n // 10)
        src = TarSource(shards, index_dir=str(tmp_path / "idx"))
        assert len(src) == n
        blob = pickle.dumps(src)
        sizes[n] = len(blob)
        copy = pickle.loads(blob)
        idx = np.random.default_rng(n).integers(0, n, 300)
        expected = src.read_batch(idx)
        got = copy.read_batch(idx)
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
        check_batch(copy, idx)
        assert copy.shards == src.shards and copy.sample_key(n - 1) == f"k{n - 1:07d}" == copy.sample_key(-1)
        assert copy.describe() == src.describe() and repr(copy) == repr(src)
    assert sizes[20_000] < 64 << 10
    assert abs(sizes[20_000] - sizes[2_000]) < 64  # only the digits of a few numbers differ


def test_index_arrays_are_read_only_maps_in_the_index_dir(tmp_path):
    index_dir = str(tmp_path / "idx")
    src = TarSource(write_shards(tmp_path / "d", 4, 50), index_dir=index_dir)
    check_batch(src, [0, 199, 57])
    files = src._ix.files
    assert {"starts", "keys", "key_offsets", "paths", "offsets.0", "sizes.1", "ends.0"} <= set(files)
    for name, m in files.items():
        assert isinstance(m, np.memmap) and not m.flags.writeable, name
        assert os.path.dirname(m.filename) == os.path.realpath(src._ix.folder), name
        assert os.path.dirname(os.path.dirname(m.filename)) == os.path.realpath(index_dir), name
    view = src._view()
    for arr in (view.starts, *view.offsets, *view.sizes):
        assert not arr.flags.writeable and isinstance(arr.base, np.memmap)
    assert src._ix.meta["holes"] == [[0, -1], [0, -1]] and src._ix.fields == ["npy", "cls"]


def test_warm_open_neither_scans_nor_combines(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "d", 5, 20)
    TarSource(shards)
    scans = _spy(monkeypatch, tar_format, "scan_tar")
    combines = _spy(monkeypatch, index_mod, "_combine")
    loads = _spy(monkeypatch, index_mod, "load_index")
    src = TarSource(shards)
    assert (scans, combines, loads) == ([], [], [])
    check_batch(src, np.arange(100)[::-1])


def test_a_rewritten_shard_rebuilds_the_index_scanning_only_it(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "d", 5, 20)
    first = TarSource(shards)
    time.sleep(0.01)
    write_shards(tmp_path / "new", 1, 30, first=40)  # 30 records where shard 2 held 20
    os.replace(tmp_path / "new" / "s000000.tar", shards[2])
    scans = _spy(monkeypatch, tar_format, "scan_tar")
    combines = _spy(monkeypatch, index_mod, "_combine")
    src = TarSource(shards)
    assert [a[0] for a in scans] == [shards[2]] and len(combines) == 1
    assert src._ix.folder != first._ix.folder and len(src) == 110
    check_batch(src, [0, 39, 40, 69])
    assert src.sample_key(70) == "k0000060"  # shard 3 still holds records 60..79
    names = sorted(os.listdir(os.path.dirname(src._ix.folder)))
    assert sum(n.startswith(index_mod.SET_PREFIX) for n in names) == 2 and not [n for n in names if "tmp" in n]


def test_a_builder_that_lost_the_race_keeps_the_winners_index(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "d", 3, 10)
    winner = TarSource(shards)
    real, missed = index_mod._open_set, []

    def miss_once(folder, sizes):  # as if another process renamed its index into place meanwhile
        if not missed:
            missed.append(folder)
            return None
        return real(folder, sizes)

    monkeypatch.setattr(index_mod, "_open_set", miss_once)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = TarSource(shards)  # finds no index, builds one, cannot rename it into place: uses the winner's
    assert src._ix.folder == winner._ix.folder and src._ix.files
    check_batch(src, np.arange(30))


def test_unwritable_index_dir_warns_and_keeps_the_index_in_memory(tmp_path):
    shards = write_shards(tmp_path / "d", 3, 10)
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(RuntimeWarning) as got:
        src = TarSource(shards, index_dir=str(tmp_path / "file" / "idx"))
    combined = [str(w.message) for w in got if "combined index" in str(w.message)]
    assert len(combined) == 1 and "every worker process gets a copy of its own" in combined[0], combined
    assert src._ix.folder is None and not src._ix.files
    check_batch(src, np.arange(30)[::-1])
    copy = pickle.loads(pickle.dumps(src))  # the arrays travel with it
    check_batch(copy, [29, 3, 11])
    assert copy.shards == shards and copy.sample_key(12) == "k0000012"


def test_holes_are_reported_from_the_index_as_before(tmp_path):
    shards = write_shards(tmp_path / "d", 2, 5)
    holes = write_tar(tmp_path / "holes.tar", [("a.npy", NPY_HEAD + bytes(16)), ("a.cls", b"1"),
                                               ("b.npy", NPY_HEAD + bytes(16)), ("c.txt", b"x")])
    from loaders import DataError

    with pytest.raises(DataError, match=r"holes\.tar: sample 'b' has no 'cls' member \(expected fields \['npy', 'cls'\]; "
                                        r"3 missing in this shard\)"):
        TarSource([*shards, holes], keys=["npy", "cls"])
    with pytest.raises(DataError, match=r"s000000\.tar: sample 'k0000000' has no 'txt' member .*; 5 missing in this shard\)"):
        TarSource([*shards, holes])  # every field found, txt included
    with pytest.raises(DataError, match=r"holes\.tar: sample 'a' has no 'txt' member .*; 5 missing in this shard\)"):
        TarSource([holes, *shards], keys=["txt", "npy", "cls"])
    with pytest.raises(DataError, match=r"holes\.tar: sample 'c' has no 'npy' member .*; 1 missing in this shard\)"):
        TarSource([holes, *shards], keys=["npy"])


# --------------------------------------------------------------------------- more shards than one span holds
@pytest.mark.slow
def test_twenty_thousand_shards_hold_no_descriptor(tmp_path):
    count, per = 20_000, 3
    assert count > MAX_FILES
    shards = write_shards(tmp_path / "d", count, per)
    src = TarSource(str(tmp_path / "d" / "s*.tar"))
    n = count * per
    assert len(src) == n and src._all_shards() is None
    rng = np.random.default_rng(7)
    check_batch(src, rng.integers(0, n, 256))
    fds = len(os.listdir("/proc/self/fd"))
    order = rng.permutation(n)
    for a in range(0, n, 512):  # every shard, many times over the number kept mapped
        check_batch(src, order[a : a + 512])
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert len(src._open) <= _MAX_OPEN
    assert src[n - 1]["cls"] == (n - 1) % 1000 and src.sample_key(12_345) == "k0012345"
    assert len(pickle.dumps(src)) < 4096 and src.shards == shards


# --------------------------------------------------------------------------- HDF5 chunk tables
def test_h5_long_chunk_table_is_mapped_from_the_cache(tmp_path, monkeypatch):
    import h5py

    import loaders._h5 as h5_mod

    n = 6000  # 1-row chunks: one table entry per record, over INLINE_CHUNKS
    assert n > index_mod.INLINE_CHUNKS
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    path = str(tmp_path / "rows.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 4))
        f.create_dataset("y", data=np.arange(n), chunks=(1000,))  # a short table: kept inline
    src = H5Source(path)
    kx, ky = src._keys
    assert kx._starts_file is not None and isinstance(kx.starts.base, np.memmap) and not kx.starts.flags.writeable
    assert os.path.dirname(kx._starts_file) == os.path.realpath(index_mod.h5_index_dir())
    assert ky._starts_file is None and ky.starts is not None and not isinstance(ky.starts.base, np.memmap)
    idx = np.random.default_rng(1).permutation(n)[:500]
    np.testing.assert_array_equal(src.read_batch(idx)["x"], x[idx])
    walks, walk = [], h5_mod._chunk_starts
    monkeypatch.setattr(h5_mod, "_chunk_starts", lambda ds, *a: walks.append(ds.name) or walk(ds, *a))
    again = H5Source(path)
    assert walks == ["/y"]  # the long table came from the cache
    np.testing.assert_array_equal(again._keys[0].starts, kx.starts)
    blob = pickle.dumps(again)
    assert len(blob) < 8192
    copy = pickle.loads(blob)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(copy.read_batch(idx)["x"], f["x"][:][idx])
        np.testing.assert_array_equal(copy.read_batch(idx)["y"], f["y"][:][idx])
