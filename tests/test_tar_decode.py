"""TarSource decoding on shards written by webdataset's ShardWriter: the batch gathers
(``read_batch``) and the per-record path (``src[i]``) give the same values as webdataset."""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest

from loaders import DataError, TarSource
from loaders._gather import ONE_GATHER


def write_shards(folder, samples, *, maxcount=64):
    """``samples`` (dicts of field -> value) written by webdataset's ShardWriter, keys ``s000000`` ..."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(os.path.join(str(folder), "part-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:06d}", **sample})
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))


def webdataset_decodes(shards):
    """Every sample as ``webdataset.WebDataset(shards).decode()`` yields it, in order."""
    import webdataset as wds

    with warnings.catch_warnings():  # webdataset leaves its shard files for the GC to close
        warnings.simplefilter("ignore", ResourceWarning)
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode()
        out = list(ds)
        del ds
        gc.collect()
    return out


@pytest.fixture(params=[True, False], ids=["shards-in-one-range", "map-per-shard"])
def one_range(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr("loaders._tar.map_span", lambda paths: None)
    return request.param


# --------------------------------------------------------------------------- integers
@pytest.mark.parametrize("value", [2**70, -(2**70), 2**63])
def test_int_member_beyond_int64_is_a_data_error(tmp_path, one_range, value):
    shards = write_shards(tmp_path / "big", [{"cls": 3}, {"cls": value}, {"cls": 5}])
    src = TarSource(shards)
    assert (src._all_shards() is not None) == one_range
    expected = f"{shards[0]}: member s000001.cls: expected an integer that fits int64, got {str(value).encode()!r}"
    with pytest.raises(DataError) as batch_error:
        src.read_batch([0, 1, 2])
    assert str(batch_error.value) == expected
    with pytest.raises(DataError) as record_error:
        src[1]
    assert str(record_error.value) == expected
    assert src[0]["cls"] == 3 and src.read_batch([2, 0])["cls"].tolist() == [5, 3]


def test_int_member_that_is_not_a_number(tmp_path, one_range):
    shards = write_shards(tmp_path / "text", [{"cls": b"7"}, {"cls": b" 12\n"}, {"cls": b"x7"}])
    src = TarSource(shards)
    assert src.read_batch([1, 0])["cls"].tolist() == [12, 7]  # int() accepts surrounding whitespace, as webdataset
    expected = f"{shards[0]}: member s000002.cls: expected an integer that fits int64, got b'x7'"
    with pytest.raises(DataError) as batch_error:
        src.read_batch([0, 2])
    assert str(batch_error.value) == expected
    with pytest.raises(DataError) as record_error:
        src[2]
    assert str(record_error.value) == expected


def test_int_members_at_the_int64_limits(tmp_path):
    values = [2**63 - 1, -(2**63), 7]
    src = TarSource(write_shards(tmp_path / "edge", [{"cls": v} for v in values]))
    assert src.data_format == TarSource.data_format == "tar"
    batch = src.read_batch([0, 1, 2])
    assert batch["cls"].dtype == np.int64 and batch["cls"].tolist() == values
    assert [src[i]["cls"] for i in range(3)] == values


def test_cls_of_different_widths_in_one_batch(tmp_path, one_range):
    values = [7, 12345, 0, 999999999, 42, 100000000000000000, -3, 2**63 - 1]
    shards = write_shards(tmp_path / "widths", [{"cls": v} for v in values], maxcount=3)
    src = TarSource(shards)
    assert len(shards) == 3 and (src._all_shards() is not None) == one_range
    expected = [s["cls"] for s in webdataset_decodes(shards)]
    assert expected == values
    order = np.array([3, 0, 1, 2, 6, 4, 7, 5])
    batch = src.read_batch(order)
    assert batch["cls"].dtype == np.int64 and batch["cls"].tolist() == [values[i] for i in order]
    first_four = src.read_batch([0, 1, 2, 3])["cls"]  # only digits, of four widths: the one-gather path
    assert first_four.tolist() == [7, 12345, 0, 999999999]
    assert [src[i]["cls"] for i in range(len(values))] == values


# --------------------------------------------------------------------------- .npy members
def test_big_endian_npy_comes_out_native(tmp_path, one_range):
    written = [(np.arange(6) + k).astype(">i4") for k in range(5)]
    assert written[0].dtype.byteorder == ">"
    shards = write_shards(tmp_path / "be", [{"npy": a} for a in written], maxcount=2)
    src = TarSource(shards)
    assert (src._all_shards() is not None) == one_range
    ref = webdataset_decodes(shards)
    assert ref[0]["npy"].dtype == np.dtype(">i4")  # webdataset keeps the file's byte order
    batch = src.read_batch([4, 1, 2, 0])["npy"]
    assert batch.dtype == np.dtype("int32") and batch.dtype.isnative
    np.testing.assert_array_equal(batch, np.stack([written[i] for i in [4, 1, 2, 0]]))
    for i in range(len(written)):
        one = src[i]["npy"]
        assert one.dtype == np.dtype("int32") and one.dtype.isnative
        np.testing.assert_array_equal(one, ref[i]["npy"])
    records = src.read_records([3])
    assert records[0]["npy"].dtype.isnative


def test_big_endian_npy_with_a_record_on_the_slow_path(tmp_path):
    """A record whose header differs (Fortran order) is decoded on its own and still stacks."""
    written = [(np.arange(6).reshape(2, 3) * k).astype(">f8") for k in range(3)]
    written[1] = np.asfortranarray(written[1])
    assert all(a.dtype.byteorder == ">" for a in written)
    src = TarSource(write_shards(tmp_path / "bef", [{"npy": a} for a in written]))
    batch = src.read_batch([0, 1, 2])["npy"]
    assert batch.dtype == np.dtype("float64") and batch.dtype.isnative
    np.testing.assert_array_equal(batch, np.stack(written))


def _big_arrays(n, seed=0):
    """float32 arrays of 16 KiB: header and data are gathered apart (more than ONE_GATHER bytes)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 32, 32)).astype(np.float32) for _ in range(n)]


def test_npy_over_4k_across_shards(tmp_path, one_range):
    written = _big_arrays(40)
    assert written[0].nbytes > ONE_GATHER
    shards = write_shards(tmp_path / "large", [{"npy": a, "cls": k % 7} for k, a in enumerate(written)], maxcount=6)
    assert len(shards) == 7
    src = TarSource(shards)
    assert (src._all_shards() is not None) == one_range
    ref = webdataset_decodes(shards)
    order = np.random.default_rng(1).permutation(len(src))
    batch = src.read_batch(order)
    assert batch["npy"].dtype == np.float32 and batch["npy"].shape == (40, 4, 32, 32)
    assert batch["npy"].flags.c_contiguous
    np.testing.assert_array_equal(batch["npy"], np.stack([ref[i]["npy"] for i in order]))
    np.testing.assert_array_equal(batch["cls"], [ref[i]["cls"] for i in order])
    repeats = np.array([5, 5, 39, 0, 5])  # one shard, repeated records
    np.testing.assert_array_equal(src.read_batch(repeats)["npy"], np.stack([written[i] for i in repeats]))
    for i in (0, 17, 39):
        np.testing.assert_array_equal(src[i]["npy"], written[i])


def test_npy_over_4k_with_records_on_the_slow_path(tmp_path, one_range):
    """Fortran-order records among C-order ones: their headers differ, they are decoded one by one."""
    written = _big_arrays(12, seed=2)
    for k in (3, 8):
        written[k] = np.asfortranarray(written[k])
    shards = write_shards(tmp_path / "mixed", [{"npy": a} for a in written], maxcount=5)
    src = TarSource(shards)
    order = np.array([0, 8, 11, 3, 6, 1])
    batch = src.read_batch(order)["npy"]
    assert batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, np.stack([written[i] for i in order]))


def test_fortran_order_npy(tmp_path, one_range):
    rng = np.random.default_rng(3)
    written = [np.asfortranarray(rng.normal(size=(3, 5))) for _ in range(4)]
    written += [np.asfortranarray(rng.integers(0, 99, (4, 32, 32), dtype=np.int32)) for _ in range(2)]
    small = write_shards(tmp_path / "f-small", [{"npy": a} for a in written[:4]], maxcount=3)
    large = write_shards(tmp_path / "f-large", [{"npy": a} for a in written[4:]])
    for shards, arrays in ((small, written[:4]), (large, written[4:])):
        src = TarSource(shards)
        ref = webdataset_decodes(shards)
        assert ref[0]["npy"].flags.f_contiguous  # written in Fortran order
        order = list(range(len(arrays)))[::-1]
        batch = src.read_batch(order)["npy"]
        assert batch.flags.c_contiguous and batch.dtype == arrays[0].dtype
        np.testing.assert_array_equal(batch, np.stack([arrays[i] for i in order]))
        for i, a in enumerate(arrays):
            one = src[i]["npy"]
            assert one.flags.c_contiguous
            np.testing.assert_array_equal(one, a)
            np.testing.assert_array_equal(one, ref[i]["npy"])


def test_records_of_another_shape_read_alone(tmp_path, one_range):
    """A shard's cached layout (from the first record read) does not reject a batch whose
    records all share another shape."""
    written = [np.zeros(3), np.ones(4), np.full(4, 2.0), np.zeros(3)]
    src = TarSource(write_shards(tmp_path / "shapes", [{"npy": a} for a in written]))
    assert src.read_batch([0])["npy"].shape == (1, 3)
    np.testing.assert_array_equal(src.read_batch([1])["npy"], [written[1]])
    np.testing.assert_array_equal(src.read_batch([2, 1])["npy"], [written[2], written[1]])
    np.testing.assert_array_equal(src.read_batch([3, 0])["npy"], [written[3], written[0]])
    with pytest.raises(DataError, match=r"part-000000\.tar: member s000001\.npy: holds float64 \(4,\), but s000000\.npy"):
        src.read_batch([0, 1])
