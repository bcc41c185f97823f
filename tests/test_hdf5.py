"""HDF5 sources on files with more than plain record arrays: scalars, NULL dataspaces,
compound and string dtypes, big-endian data, and block shuffles over a cached part."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle

import h5py
import numpy as np
import pytest

from loaders import DataError, H5CachedSource, H5Source, Loader, ProcessPart, Sampler
from loaders.shm import SharedArrays

N = 300
COMPOUND = np.dtype([("a", "<i4"), ("b", "<f8")])
BIG_COMPOUND = np.dtype([("a", ">i4"), ("b", ">f8", (2,))])
PADDED = np.dtype({"names": ["a", "b"], "formats": ["<i2", "<f4"], "offsets": [0, 8], "itemsize": 16})


def _compound(n: int, dtype: np.dtype) -> np.ndarray:
    out = np.zeros(n, dtype)
    out["a"] = np.arange(n)
    out["b"] = (np.arange(n) * 0.5).reshape((n,) + (1,) * (out["b"].ndim - 1))
    return out


@pytest.fixture(scope="module")
def odd_h5(tmp_path_factory):
    """Record datasets (gzip, lzf) next to a scalar, a NULL dataspace, a group and attributes."""
    path = tmp_path_factory.mktemp("odd") / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(N * 4, dtype=np.float32).reshape(N, 4), chunks=(37, 3), compression="gzip")
        f.create_dataset("y", data=np.arange(N) % 10, chunks=(50,), compression="lzf")
        f["version"] = 3
        f["empty"] = h5py.Empty("f4")
        f["meta/notes"] = np.arange(5)  # in a group: never a default key
        f.attrs["created_by"] = "test"
    return str(path)


@pytest.fixture(scope="module")
def typed_h5(tmp_path_factory):
    """Compound, padded compound, big-endian compound, fixed strings, array dtype, and variable-length data."""
    path = tmp_path_factory.mktemp("typed") / "typed.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("comp", data=_compound(N, COMPOUND), chunks=(7,), compression="gzip")
        f.create_dataset("bigcomp", data=_compound(N, BIG_COMPOUND), chunks=(41,), compression="lzf")
        f.create_dataset("padded", data=_compound(N, PADDED))  # contiguous
        f.create_dataset("name", data=np.array([b"rec%d" % i for i in range(N)], dtype="S10"), chunks=(23,),
                         compression="gzip")
        arr = f.create_dataset("arr", shape=(N,), dtype=np.dtype((">f4", (3,))), chunks=(64,))
        arr[:] = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
        f.create_dataset("text", data=[f"s{i}" for i in range(N)], dtype=h5py.string_dtype())
        ragged = f.create_dataset("ragged", shape=(N,), dtype=h5py.vlen_dtype(np.int32))
        for i in range(3):
            ragged[i] = np.arange(i + 1, dtype=np.int32)
    return str(path)


@pytest.fixture(scope="module")
def big_endian_h5(tmp_path_factory):
    """Big-endian data behind every read path: gzip, chunked uncompressed, odd chunks, contiguous."""
    path = tmp_path_factory.mktemp("be") / "be.h5"
    v = np.arange(N, dtype=np.int64) * 1000 + 7
    rows = np.arange(N * 3, dtype=np.float64).reshape(N, 3) + 0.25
    with h5py.File(path, "w") as f:
        f.create_dataset("gz", data=v.astype(">i4"), chunks=(37,), compression="gzip")
        f.create_dataset("chunked", data=v.astype(">i4"), chunks=(29,))  # uncompressed: direct path
        f.create_dataset("oddchunks", data=rows.astype(">f8"), chunks=(31, 2))  # chunks split rows: h5py path
        f.create_dataset("cont", data=rows.astype(">f8"))  # contiguous: direct path
        f.create_dataset("lzf", data=rows.astype(">f4"), chunks=(17, 3), compression="lzf")
    return str(path), v, rows


# --------------------------------------------------------------------------- datasets that are not records
def test_default_keys_skip_scalars_and_null_dataspaces(odd_h5):
    src = H5Source(odd_h5)
    assert src.keys == ["x", "y"] and len(src) == N
    assert src.skipped == {"empty": "empty (NULL dataspace)", "version": "scalar"}
    assert "skipped={'empty': 'empty (NULL dataspace)', 'version': 'scalar'}" in repr(src)
    # The fingerprint text names what is read, not what was skipped: the same as asking for x and y.
    assert src.describe() == H5Source(odd_h5, keys=["x", "y"]).describe()
    assert "version" not in src.describe() and "empty" not in src.describe()
    np.testing.assert_array_equal(src.read_batch([5, 299])["x"], np.arange(N * 4, dtype=np.float32).reshape(N, 4)[[5, 299]])
    assert H5Source(odd_h5, keys=["x"]).skipped == {}
    with H5CachedSource(odd_h5, part=ProcessPart(1, 2, "contiguous")) as cached:
        assert cached.keys == ["x", "y"] and cached.skipped == src.skipped
        assert "version" not in cached.describe()
        np.testing.assert_array_equal(cached.read_batch([150, 299])["y"], [0, 9])


def test_asking_for_a_scalar_or_empty_dataset_names_it(odd_h5):
    with pytest.raises(DataError, match=r"odd\.h5: dataset 'version' is a scalar; records need a first dimension$"):
        H5Source(odd_h5, keys=["x", "version"])
    with pytest.raises(DataError, match=r"odd\.h5: dataset 'empty' has no data \(NULL dataspace\)$"):
        H5Source(odd_h5, keys=["empty"])
    with pytest.raises(DataError, match=r"odd\.h5: 'meta' is a group, not a dataset; its datasets: meta/notes$"):
        H5Source(odd_h5, keys=["meta"])
    with pytest.raises(DataError, match=r"odd\.h5: dataset 'version' is a scalar"):
        H5CachedSource(odd_h5, keys="version")
    assert H5Source(odd_h5, keys="meta/notes").keys == ["meta/notes"]  # nested datasets by path still work


def test_a_file_without_record_datasets(tmp_path):
    path = tmp_path / "meta.h5"
    with h5py.File(path, "w") as f:
        f["version"] = 3
        f["empty"] = h5py.Empty("f4")
        f["g/x"] = np.arange(4)
    with pytest.raises(
        DataError,
        match=r"meta\.h5: no dataset with a record axis at the top level \(skipped: empty: empty \(NULL dataspace\), "
        r"version: scalar\); pass keys=\[\.\.\.\]$",
    ):
        H5Source(str(path))


def test_default_keys_of_different_lengths_stay_an_error(tmp_path):
    path = tmp_path / "short.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros((N, 2)), chunks=(16, 2), compression="gzip")
        f["short"] = np.arange(5)
        f["version"] = 1
    with pytest.raises(
        DataError,
        match=r"short\.h5: keys have different lengths \(short=5, x=300\); all selected keys must share the first "
        r"dimension: pass keys=\[\.\.\.\] to choose$",
    ):
        H5Source(str(path))
    assert len(H5Source(str(path), keys=["x"])) == N


# --------------------------------------------------------------------------- dtypes in the cache
@pytest.mark.parametrize("key", ["comp", "bigcomp", "padded", "name", "arr"])
def test_cached_matches_lazy_for_compound_strings_and_array_dtypes(typed_h5, key):
    idx = np.array([0, 299, 5, 5, 123, 77])
    lazy = H5Source(typed_h5, keys=[key]).read_batch(idx)[key]
    with h5py.File(typed_h5) as f:
        expected = f[key][:][idx]
    np.testing.assert_array_equal(lazy, expected)
    assert lazy.dtype.isnative and lazy.dtype == expected.dtype.newbyteorder("=")
    for share in (True, False):
        with H5CachedSource(typed_h5, keys=[key], part=ProcessPart(0, 1, "contiguous"), share=share) as src:
            for s in (src, pickle.loads(pickle.dumps(src))):
                got = s.read_batch(idx)[key]
                assert got.dtype == lazy.dtype and got.shape == lazy.shape
                np.testing.assert_array_equal(got, lazy)
                if lazy.dtype.names:
                    for name in lazy.dtype.names:
                        np.testing.assert_array_equal(got[name], lazy[name])


def test_shared_arrays_keep_full_dtypes():
    specs = {"c": ((4,), COMPOUND), "p": ((4, 2), PADDED), "big": ((3,), BIG_COMPOUND), "s": ((2,), np.dtype("S10")),
             "sub": ((5,), np.dtype(("<f4", (3,))))}
    arrays = SharedArrays(specs, share=False)
    assert arrays.arrays["c"].dtype == COMPOUND and arrays.arrays["p"].dtype == PADDED
    assert arrays.arrays["p"].dtype.itemsize == 16 and arrays.arrays["big"].dtype == BIG_COMPOUND
    assert arrays.arrays["sub"].shape == (5, 3) and arrays.arrays["sub"].dtype == np.float32
    layout = json.loads(json.dumps(arrays.layout))  # the layout is plain data: dtypes survive JSON
    for name, (_, shape, descr) in layout.items():
        assert np.lib.format.descr_to_dtype(descr) == arrays.arrays[name].dtype
        assert tuple(shape) == arrays.arrays[name].shape
    shared = SharedArrays(specs)
    try:
        shared.arrays["c"][:] = _compound(4, COMPOUND)
        again = pickle.loads(pickle.dumps(shared))
        assert again.arrays["c"].dtype == COMPOUND
        np.testing.assert_array_equal(again.arrays["c"], _compound(4, COMPOUND))
    finally:
        shared.close()
    with pytest.raises(TypeError, match=r"shared memory cannot hold Python objects: array 'o' has dtype object"):
        SharedArrays({"o": ((2,), np.dtype(object))}, share=False)


def _read_in_child(src, queue):
    queue.put(src.read_batch(np.arange(10, 20)))


def test_cached_compound_in_a_spawned_process(typed_h5):
    with H5CachedSource(typed_h5, keys=["comp", "bigcomp", "name"]) as src:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_read_in_child, args=(src, queue))
        proc.start()
        got = queue.get(timeout=120)
        proc.join(timeout=60)
        expected = H5Source(typed_h5, keys=["comp", "bigcomp", "name"]).read_batch(np.arange(10, 20))
        for key, arr in expected.items():
            assert got[key].dtype == arr.dtype
            np.testing.assert_array_equal(got[key], arr)


@pytest.mark.parametrize(
    ("key", "what"),
    [("text", r"variable-length strings \(utf-8\)"), ("ragged", r"variable-length arrays of int32")],
)
def test_cached_refuses_variable_length_data(typed_h5, key, what):
    lazy = H5Source(typed_h5, keys=[key])  # the lazy source reads them
    assert len(lazy.read_batch([0, 1])[key]) == 2
    with pytest.raises(
        DataError,
        match=rf"typed\.h5: dataset {key!r} holds {what}, which cannot be placed in shared memory: read it with "
        r"H5Source \(lazy\), or pass keys=\[\.\.\.\] without it$",
    ):
        H5CachedSource(typed_h5, keys=["comp", key])
    with pytest.raises(DataError, match=rf"dataset {key!r} holds variable-length"):
        H5CachedSource(typed_h5, rename={key: "renamed"}, keys=[key])


# --------------------------------------------------------------------------- byte order
def test_every_read_path_returns_native_byte_order(big_endian_h5):
    path, v, rows = big_endian_h5
    idx = np.array([298, 0, 31, 30, 31, 150, 7])
    expected = {"gz": v[idx], "chunked": v[idx], "oddchunks": rows[idx], "cont": rows[idx], "lzf": rows[idx]}
    dtypes = {"gz": np.dtype("=i4"), "chunked": np.dtype("=i4"), "oddchunks": np.dtype("=f8"), "cont": np.dtype("=f8"),
              "lzf": np.dtype("=f4")}
    direct = {k.name: k.starts is not None for k in H5Source(path)._keys}
    assert direct == {"chunked": True, "cont": True, "gz": False, "lzf": False, "oddchunks": False}
    sources = [H5Source(path), H5Source(path, direct=False), H5Source(path, rdcc_nbytes=0)]
    for part in (ProcessPart(), ProcessPart(0, 1, "interleave")):
        sources.append(H5CachedSource(path, part=part))
    for src in sources:
        batch = src.read_batch(idx)
        for key, want in expected.items():
            assert batch[key].dtype.isnative and batch[key].dtype.byteorder in "=|", (src, key, batch[key].dtype)
            assert batch[key].dtype == dtypes[key]
            np.testing.assert_array_equal(batch[key], want.astype(dtypes[key]))
        single = src[31]
        assert all(a.dtype.isnative for a in single.values())
        empty = src.read_batch(np.array([], dtype=np.int64)) if isinstance(src, H5Source) else None
        if empty is not None:
            assert all(a.dtype.isnative and len(a) == 0 for a in empty.values())


# --------------------------------------------------------------------------- block shuffle over a cached part
@pytest.mark.parametrize("mode", ["contiguous", "interleave"])
def test_block_shuffle_drives_a_cached_part(tmp_path, mode):
    path = tmp_path / "blocks.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(N, dtype=np.int64), chunks=(23,), compression="gzip")
        f.create_dataset("x", data=np.arange(N * 2, dtype=np.float32).reshape(N, 2), chunks=(40, 2))
    lazy = H5Source(str(path))
    for rank in range(2):
        part = ProcessPart(rank, 2, mode)
        with H5CachedSource(str(path), part=part) as src:
            np.testing.assert_array_equal(src.block_starts, lazy.block_starts)
            np.testing.assert_array_equal(src.block_starts, np.arange(0, N, 23))
            sampler = Sampler(len(src), 20, shuffle="block", blocks=src.block_starts, part=part, num_epochs=2, window=2)
            batches = list(Loader(src, sampler))
            assert len(batches) == 2 * sampler.steps_per_epoch
            mine = part.records(N)
            orders = []
            per_epoch = sampler.steps_per_epoch
            for e in range(2):
                epoch = batches[e * per_epoch : (e + 1) * per_epoch]
                seen = np.concatenate([b["idx"] for b in epoch])
                np.testing.assert_array_equal(np.sort(seen), mine)  # each epoch: a permutation of this rank's records
                orders.append(seen)
                for b in epoch:
                    np.testing.assert_array_equal(b["x"][:, 0], b["idx"] * 2)
            assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], mine)


def test_source_kind_attributes(h5_path):
    assert H5Source.data_format == "hdf5" and H5CachedSource.data_format == "hdf5"
    assert H5CachedSource.holds_part is True and H5Source.holds_part is False
    with H5CachedSource(h5_path, keys=["y"]) as src:
        assert src.data_format == "hdf5" and src.holds_part


def test_fingerprint_tells_compound_layouts_of_one_size_apart(tmp_path):
    paths = []
    for name, dtype in (("a.h5", [("a", "<i4"), ("b", "<f8")]), ("b.h5", [("b", "<f8"), ("a", "<i4")])):
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            f.create_dataset("rec", data=np.zeros(4, dtype=dtype))
        paths.append(path)
    first, second = (H5Source(p).describe().split("keys=")[1] for p in paths)
    assert first != second and "('a', '<i4')" in first


def test_cli_inspects_a_file_with_scalar_and_empty_datasets(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((5, 2), dtype="f4")
        f["version"] = 3
        f["empty"] = h5py.Empty("f4")
    out = subprocess.run([sys.executable, "-m", "loaders", "inspect", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert "shape=None records=-" in lines["empty"] and "shape=[] records=-" in lines["version"]
    assert "shape=[5, 2] records=5" in lines["x"]


def test_fingerprint_tells_subarray_dtypes_of_one_size_apart(tmp_path):
    texts = []
    for name, dtype in (("f.h5", ("<f4", (3,))), ("i.h5", ("<i4", (3,)))):
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            f.create_dataset("rec", shape=(4,), dtype=np.dtype(dtype))
        texts.append(H5Source(path).describe().split("keys=")[1])
    assert texts[0] != texts[1] and "(3,)" in texts[0]
