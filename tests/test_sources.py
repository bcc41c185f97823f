"""Sources read data written by other tools exactly as those tools read it back."""

from __future__ import annotations

import gc
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from loaders import DataError, H5CachedSource, H5Source, ProcessPart, TarSource, expand_shards
from loaders._tar_format import load_index

from .conftest import make_records, write_tar, write_wds


def webdataset_reads(shards):
    """What webdataset itself yields for these shards, in order."""
    import webdataset as wds

    with warnings.catch_warnings():  # webdataset leaves its shard files for the GC to close
        warnings.simplefilter("ignore", ResourceWarning)
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode()
        out = [(s["__key__"], s["npy"], s["cls"]) for s in ds]
        del ds
        gc.collect()
    return out


@pytest.mark.parametrize("one_range", [True, False], ids=["shards-in-one-range", "map-per-shard"])
@pytest.mark.parametrize("fixture", ["wds_shards", "wds_shards_plain", "gnu_tar_shards"])
def test_tar_matches_webdataset_record_by_record(fixture, one_range, request, records, monkeypatch):
    shards = request.getfixturevalue(fixture)
    if not one_range:
        monkeypatch.setattr("loaders._tar.map_span", lambda paths: None)
    src = TarSource(shards)
    assert (src._all_shards() is not None) == one_range
    expected = webdataset_reads(shards)
    assert len(src) == len(expected) == len(records[0])
    order = np.random.default_rng(0).permutation(len(src))
    batch = src.read_batch(order)
    for pos, i in enumerate(order):
        key, npy, cls = expected[i]
        assert src.sample_key(i) == key
        np.testing.assert_array_equal(batch["npy"][pos], npy)
        assert batch["cls"][pos] == cls
        single = src[int(i)]
        np.testing.assert_array_equal(single["npy"], npy)
    assert batch["npy"].dtype == np.uint8 and batch["npy"].shape == (len(src), 3, 8, 8)


def test_tar_matches_python_tarfile_members(gnu_tar_shards):
    """Offsets in the index point at the bytes tarfile reads, long names included."""
    index, how = load_index(gnu_tar_shards[1])
    assert how == "built"
    with tarfile.open(gnu_tar_shards[1]) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        for k, key in enumerate(index["keys"][:20]):
            for j, ext in enumerate(index["fields"]):
                m = next(m for m in members if m.name == f"{key}.{ext}")
                assert len(m.name) > 100
                assert index["offsets"][k, j] == m.offset_data and index["sizes"][k, j] == m.size


def test_shard_specs_list_glob_brace_and_atek_yaml(wds_shards, tmp_path):
    folder = os.path.dirname(wds_shards[0])
    n = len(wds_shards)
    assert expand_shards(os.path.join(folder, "*.tar")) == wds_shards
    assert expand_shards(os.path.join(folder, f"train-{{000000..{n - 1:06d}}}.tar")) == wds_shards
    assert expand_shards(wds_shards) == wds_shards
    listing = tmp_path / "local_train_tars.yaml"
    listing.write_text(yaml.safe_dump({"tars": {"0": wds_shards[:2], "1": wds_shards[2:]}}))
    assert expand_shards(str(listing)) == wds_shards
    # relative entries are taken from the YAML file's folder (as ATEK's downloader lays them out)
    rel = os.path.join(folder, "rel_tars.yaml")
    with open(rel, "w") as f:
        yaml.safe_dump({"tars": {"seq": [os.path.basename(p) for p in wds_shards]}}, f)
    assert [os.path.realpath(p) for p in expand_shards(rel)] == [os.path.realpath(p) for p in wds_shards]


def test_key_selection_rename_and_transform(wds_shards, records):
    x, y = records
    src = TarSource(wds_shards, keys=["cls"], rename={"cls": "label"})
    assert src.keys == ["label"]
    np.testing.assert_array_equal(src.read_batch([4, 2])["label"], y[[4, 2]])
    doubled = TarSource(wds_shards, transform=lambda s: {**s, "cls": s["cls"] * 2})
    np.testing.assert_array_equal(doubled.read_batch([4, 2])["cls"], 2 * y[[4, 2]])


def test_txt_json_and_raw_fields(tmp_path):
    x, y = make_records(10)
    shards = write_wds(tmp_path / "mixed", x, y, extra=lambda i: {"txt": f"caption {i}", "json": {"i": i},
                                                                    "bin": bytes([i, i])})
    src = TarSource(shards)
    b = src.read_batch([3, 7])
    assert b["txt"].tolist() == ["caption 3", "caption 7"]
    assert b["json"] == [{"i": 3}, {"i": 7}]
    assert b["bin"] == [b"\x03\x03", b"\x07\x07"]


# --------------------------------------------------------------------------- bad tar input
_tar_with = write_tar


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_truncated_tar_names_file_and_member(wds_shards_plain, tmp_path):
    data = Path(wds_shards_plain[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 7 + 100])
    with pytest.raises(DataError, match=r"cut\.tar: truncated tar: member 'sample00000\d\.\w+' needs"):
        TarSource(str(cut))
    cut.write_bytes(data[: 512 * 8])  # cut at a header boundary: no end-of-archive marker
    from loaders._tar_format import TruncatedTarWarning

    with pytest.warns(TruncatedTarWarning, match=r"cut\.tar: truncated tar: ends at byte 4096 after its last complete "
                                                 r"member, without the end-of-archive marker; reading the (\d+) samples") as w:
        src = TarSource(str(cut))  # read as webdataset reads it: the complete samples before the cut
    count = int(re.search(r"reading the (\d+) samples", str(w[0].message)).group(1))
    assert len(src) == count >= 1 and src.sample_key(0) == TarSource(wds_shards_plain[0]).sample_key(0)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_one_range_lives_as_long_as_a_view_of_it(wds_shards_plain, tmp_path):
    from loaders._span import map_span

    shards = []  # copies no other test's source maps (those may be freed by a collection at any time)
    for i, path in enumerate(wds_shards_plain):
        shards.append(str(tmp_path / f"only-this-test-{i}.tar"))
        shutil.copy(path, shards[-1])

    def mapped():
        return Path("/proc/self/maps").read_text().count(os.path.basename(shards[0]))

    gc.collect()
    before = mapped()
    assert before == 0
    src = TarSource(shards)
    batch = src.read_batch(np.arange(len(src)))
    window = src._all_shards().windows.get(8)
    del src
    gc.collect()
    assert mapped() == before + 1 and bytes(window[0][:5]) == Path(shards[0]).read_bytes()[:5]
    del window
    gc.collect()
    assert mapped() == before  # unmapped with the last view; the batch read before is a copy and stays valid
    assert batch["npy"].shape[0] == len(batch["cls"]) and int(batch["npy"].sum()) > 0
    assert map_span([]) is None


@pytest.mark.parametrize("one_range", [True, False], ids=["shards-in-one-range", "map-per-shard"])
def test_shard_that_shrank_after_indexing(wds_shards_plain, tmp_path, one_range, monkeypatch):
    if not one_range:
        monkeypatch.setattr("loaders._tar.map_span", lambda paths: None)
    paths = []
    for k, shard in enumerate(wds_shards_plain):
        paths.append(tmp_path / f"s{k}.tar")
        paths[-1].write_bytes(Path(shard).read_bytes())
    src = TarSource([str(p) for p in paths])
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size // 2)
    in_s1 = int(src.block_starts[1])
    shrank = rf"s1\.tar: the shard shrank since it was indexed \({size // 2} bytes, index needs \d+\)"
    with pytest.raises(DataError, match=shrank):
        src.read_batch([0, in_s1])


def test_sample_missing_a_field(tmp_path):
    path = _tar_with(tmp_path / "holes.tar", [("a.npy", _npy(np.zeros(2))), ("a.cls", b"1"),
                                               ("b.npy", _npy(np.ones(2)))])
    with pytest.raises(DataError, match=r"holes\.tar: sample 'b' has no 'cls' member \(expected fields \['npy', 'cls'\]"):
        TarSource(path)
    assert len(TarSource(path, keys=["npy"])) == 2  # selecting the fields every sample has works


def test_duplicate_key_and_extension(tmp_path):
    path = _tar_with(tmp_path / "dup.tar", [("a.cls", b"1"), ("a.cls", b"2")])
    with pytest.raises(DataError, match=r"dup\.tar: duplicate member 'a\.cls': sample 'a' already has a 'cls' field"):
        TarSource(path)
    path = _tar_with(tmp_path / "split.tar", [("a.cls", b"1"), ("b.cls", b"2"), ("a.txt", b"x")])
    with pytest.raises(DataError, match=r"split\.tar: member 'a\.txt' belongs to sample 'a'.*consecutive"):
        TarSource(path)


def test_invalid_npy_member(tmp_path):
    path = _tar_with(tmp_path / "bad.tar", [("a.npy", _npy(np.zeros(3))), ("b.npy", b"not an array at all")])
    src = TarSource(path)
    np.testing.assert_array_equal(src[0]["npy"], np.zeros(3))
    with pytest.raises(DataError, match=r"bad\.tar: member b\.npy: not a valid \.npy member \(no NUMPY magic\)"):
        src[1]
    with pytest.raises(DataError, match=r"bad\.tar: member b\.npy: not a valid \.npy member"):
        src.read_batch([0, 1])
    truncated = _npy(np.zeros(3))[:-4]
    path = _tar_with(tmp_path / "short.tar", [("a.npy", _npy(np.zeros(3))), ("b.npy", truncated)])
    with pytest.raises(DataError, match=r"short\.tar: member b\.npy: not a valid \.npy member: 148 bytes"):
        TarSource(path).read_batch([0, 1])


def test_npy_of_other_shape_in_a_batch(tmp_path):
    path = _tar_with(tmp_path / "ragged.tar", [("a.npy", _npy(np.zeros(3))), ("b.npy", _npy(np.zeros(4)))])
    src = TarSource(path)
    with pytest.raises(DataError, match=r"ragged\.tar: member b\.npy: holds float64 \(4,\), but a\.npy"):
        src.read_batch([0, 1])
    assert [r["npy"].shape for r in src.read_records([0, 1])] == [(3,), (4,)]


def test_pickle_members_are_refused_unless_allowed(tmp_path):
    payload = pickle.dumps({"x": 1})
    path = _tar_with(tmp_path / "p.tar", [("a.pyd", payload), ("a.cls", b"0")])
    src = TarSource(path)
    with pytest.raises(DataError, match=r"p\.tar: member a\.pyd: is a pickle; refusing to unpickle"):
        src[0]
    assert TarSource(path, allow_pickle=True)[0]["pyd"] == {"x": 1}
    obj = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    path = _tar_with(tmp_path / "objnpy.tar", [("a.npy", buf.getvalue())])
    with pytest.raises(DataError, match=r"objnpy\.tar: member a\.npy: \.npy member holds Python objects"):
        TarSource(path)[0]


def test_not_a_tar_and_missing_shards(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(DataError, match=r"junk\.tar: .*(checksum mismatch|not octal)"):
        TarSource(str(junk))
    with pytest.raises(DataError, match=r"nope-000001\.tar: shard not found"):
        TarSource([_tar_with(tmp_path / "ok.tar", [("a.cls", b"1")]), str(tmp_path / "nope-000001.tar")])
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump({"tars": {"s": ["gone.tar"]}}))
    with pytest.raises(DataError, match=r"gone\.tar: shard not found \(listed in .*list\.yaml\)"):
        TarSource(str(listing))
    with pytest.raises(DataError, match="matches no file"):
        TarSource(str(tmp_path / "none-*.tar"))


def test_stale_index_is_rebuilt_never_trusted(tmp_path):
    path = _tar_with(tmp_path / "s.tar", [("a.cls", b"1"), ("b.cls", b"2")])
    assert load_index(path)[1] == "built"
    assert load_index(path)[1] == "cached"
    time.sleep(0.01)
    _tar_with(tmp_path / "s.tar", [("a.cls", b"1"), ("b.cls", b"2"), ("c.cls", b"3")])
    src = TarSource(path)  # the cached index describes the old file: it must be rebuilt
    assert len(src) == 3 and src.read_batch([2])["cls"].tolist() == [3]
    assert load_index(path)[1] == "cached"


def test_index_cache_goes_only_to_the_cache_dir(wds_shards, tmp_path):
    before = set(os.listdir(os.path.dirname(wds_shards[0])))
    TarSource(wds_shards, index_dir=str(tmp_path / "idx"))
    assert set(os.listdir(os.path.dirname(wds_shards[0]))) == before
    names = os.listdir(tmp_path / "idx")  # one index per shard, and the shard list's combined index
    assert sorted(n[-4:] if n.endswith(".npz") else n[:4] for n in names) == [".npz"] * len(wds_shards) + ["set-"]


# --------------------------------------------------------------------------- HDF5
def test_h5_matches_h5py_on_every_layout(h5_path):
    import h5py

    src = H5Source(h5_path)
    direct = {k.name: k.starts is not None for k in src._keys}
    assert direct == {"big": True, "cont": True, "feat": True, "odd": False, "x": False, "y": False}
    idx = np.random.default_rng(2).integers(0, len(src), 150)  # with repeats
    batch = src.read_batch(idx)
    with h5py.File(h5_path) as f:
        for key in f:
            expected = f[key][:][idx]
            np.testing.assert_array_equal(batch[key], expected)
            assert batch[key].dtype == expected.dtype.newbyteorder("=")
    h5py_only = H5Source(h5_path, direct=False, rdcc_nbytes=0).read_batch(idx)
    for key in batch:
        np.testing.assert_array_equal(h5py_only[key], batch[key])


def test_h5_keys_rename_and_single_records(h5_path, records):
    src = H5Source(h5_path, keys=["x", "y"], rename={"y": "label"})
    assert src.keys == ["x", "label"]
    rec = src[5]
    np.testing.assert_array_equal(rec["x"], records[0][5])
    assert rec["label"] == records[1][5]


def test_h5_bad_input(tmp_path, h5_path):
    import h5py

    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.h5: not an HDF5 file"):
        H5Source(str(text))
    data = Path(h5_path).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.h5: (truncated HDF5 file|cannot open as HDF5)"):
        H5Source(str(cut))
    with pytest.raises(DataError, match=r"data\.h5: no dataset 'z'; the file has: big, cont, feat, odd, x, y"):
        H5Source(h5_path, keys=["x", "z"])
    uneven = tmp_path / "uneven.h5"
    with h5py.File(uneven, "w") as f:
        f["a"] = np.zeros(10)
        f["b"] = np.zeros(9)
    with pytest.raises(DataError, match=r"uneven\.h5: keys have different lengths \(a=10, b=9\)"):
        H5Source(str(uneven))
    with pytest.raises(DataError, match=r"missing\.h5: no such HDF5 file"):
        H5Source(str(tmp_path / "missing.h5"))


def test_h5_file_changed_under_a_source(tmp_path):
    import h5py

    path = tmp_path / "live.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(10)
    src = H5Source(str(path))
    time.sleep(0.01)
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(20)
    with pytest.raises(DataError, match=r"live\.h5: the file changed or vanished"):
        src.read_batch([0])


def test_cached_source_holds_only_its_part(h5_path, records):
    x, y = records
    part = H5CachedSource(h5_path, keys=["x", "y"], part=ProcessPart(1, 3, "interleave"))
    assert part.nbytes < x.nbytes
    b = part.read_batch([1, 4, 298])
    np.testing.assert_array_equal(b["y"], y[[1, 4, 298]])
    with pytest.raises(IndexError, match=r"record 2 is not in this rank's part \(interleave 1/3\)"):
        part.read_batch([2])
    cont = H5CachedSource(h5_path, keys=["y"], part=ProcessPart(1, 2, "contiguous"))
    np.testing.assert_array_equal(cont.read_batch([150, 299])["y"], y[[150, 299]])
    with pytest.raises(IndexError, match="record 149 is not in this rank's part"):
        cont.read_batch([149])
    with pytest.raises(ValueError, match="H5CachedSource holds one rank's part"):
        H5CachedSource(h5_path, part=ProcessPart(0, 2, "global"))
    part.close()
    cont.close()


def test_cli_inspect_and_index(wds_shards, h5_path, tmp_path):
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path / "c")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "loaders", *args], capture_output=True, text=True, env=env)

    out = run("inspect", h5_path, os.path.join(os.path.dirname(wds_shards[0]), "*.tar"))
    assert out.returncode == 0, out.stderr
    assert "data.h5: hdf5" in out.stdout and "x                        uint8" in out.stdout
    assert "records=300 chunks=(37, 3, 8, 8) compression=gzip" in out.stdout
    assert f"webdataset tar, {len(wds_shards)} shard(s), 300 records" in out.stdout
    assert "npy                      uint8 [3, 8, 8]" in out.stdout
    first = run("index", "--rebuild", *wds_shards)  # inspect above built them already
    n = len(wds_shards)
    assert f"{n} shard(s), 300 samples: 0 index(es) cached and valid, 0 built, {n} rebuilt" in first.stdout
    again = run("index", "--verify", *wds_shards)
    assert f"{len(wds_shards)} index(es) cached and valid, 0 built, 0 rebuilt" in again.stdout
    bad = run("index", str(tmp_path / "missing.tar"))
    assert bad.returncode == 1 and "missing.tar: shard not found" in bad.stderr


def test_loaders_imports_no_framework():
    code = "import loaders, sys; print(json.dumps([m for m in ('torch', 'jax', 'grain') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
