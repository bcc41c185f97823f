"""TarSource reads shards exactly as ``webdataset.WebDataset(...).decode(...)`` does, sample by sample:
the decoders (``.gz``, ``.json``/``.jsn``, ``.npz``, msgpack, tenbin, ``.pth``), the image specs, the
``__key__``/``__url__`` fields, member names (``__meta__/...``, ``a.``), incomplete samples, members of
one key that are not consecutive, and a tar without its end-of-archive marker.

Shards are written by webdataset's own ShardWriter/TarWriter, Python's tarfile and GNU tar; images by PIL.
"""

from __future__ import annotations

import gc
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from loaders import DataError, Loader, Sampler, TarSource
from loaders._tar_format import INDEX_VERSION, TruncatedTarWarning, scan_tar

from .conftest import write_tar

torch = pytest.importorskip("torch")
wds = pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")


# --------------------------------------------------------------------------- helpers
def shard_writer(folder, samples, *, maxcount=4, mtime=None) -> list[str]:
    """``samples`` written by webdataset's ShardWriter (PAX headers unless ``mtime`` is an int), keys ``s000000`` ..."""
    os.makedirs(folder, exist_ok=True)
    kwargs = {} if mtime is None else {"mtime": mtime}
    with wds.ShardWriter(os.path.join(str(folder), "part-%06d.tar"), maxcount=maxcount, verbose=0, **kwargs) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:06d}", **sample})
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))


def webdataset_samples(shards, *specs, decode=True):
    """Every sample as ``webdataset.WebDataset(shards).decode(*specs)`` yields it (raw with ``decode=False``)."""
    with warnings.catch_warnings():  # webdataset leaves its shard files for the GC to close
        warnings.simplefilter("ignore", ResourceWarning)
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        if decode:
            ds = ds.decode(*specs)
        out = list(ds)
        del ds
        gc.collect()
    return out


def same(a, b, where="") -> None:
    """``a`` and ``b`` hold the same values of the same types (arrays: dtype, shape and every element)."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{where}: {type(a).__name__}, expected a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: {a!r} != {b!r}"
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray), f"{where}: {type(a).__name__}, expected an ndarray"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(b, Image.Image):
        assert isinstance(a, Image.Image) and a.mode == b.mode and a.size == b.size, where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in b:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{k}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- decoders
def rich(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "txt.gz": f"caption {i} \u00fcn\u00efcode",
        "json": {"i": i, "tags": ["a", str(i)], "x": 0.5 * i},
        "jsn": [i, i + 0.25, None, True],
        "json.gz": {"deep": {"i": i}},
        "npz": {"a": rng.normal(size=(2, 3)), "b": np.arange(i + 1, dtype=np.int16)},
        "mp": {"i": i, "name": f"s{i}", "v": [1.5, i], "raw": b"\x00\x01"},
        "msg": [i, "x"],
        "ten": [rng.normal(size=(3, 2)).astype(np.float32), np.arange(4, dtype=np.int64) + i],
        "tb": np.full((2, 2), i, dtype=np.uint8),
        "pth": torch.arange(3, dtype=torch.float64) * i,
        "npy.gz": np.arange(5) * i,
        "cls": i,
    }


@pytest.mark.parametrize("mtime", [None, 0], ids=["pax-headers", "ustar-headers"])
def test_every_default_decoder_matches_webdataset(tmp_path, mtime):
    shards = shard_writer(tmp_path / "rich", [rich(i) for i in range(7)], maxcount=3, mtime=mtime)
    assert len(shards) == 3
    expected = webdataset_samples(shards)
    src = TarSource(shards)
    assert sorted(src.fields) == sorted(rich(0))
    assert len(src) == len(expected) == 7
    for i, ref in enumerate(expected):
        got = src[i]
        for field in rich(0):
            same(got[field], ref[field], f"record {i} field {field}")
    order = [6, 0, 3, 5]
    batch = src.read_batch(order)
    for pos, i in enumerate(order):
        ref = expected[i]
        for field in ("json", "jsn", "json.gz", "npz", "mp", "msg", "ten", "tb", "pth"):
            same(batch[field][pos], ref[field], f"batch row {pos} field {field}")
        assert batch["txt.gz"][pos] == ref["txt.gz"] and batch["cls"][pos] == ref["cls"]
        np.testing.assert_array_equal(batch["npy.gz"][pos], ref["npy.gz"])
    assert batch["npy.gz"].shape == (4, 5) and batch["txt.gz"].dtype.kind == "U"


def test_msgpack_extension_is_decoded_too(tmp_path):
    """webdataset writes ``.msgpack`` but reads back only ``.mp``/``.msg``; Tandem decodes all three."""
    msgpack = pytest.importorskip("msgpack")
    value = {"a": [1, 2.5, "x"], "b": None}
    shards = shard_writer(tmp_path / "mp", [{"msgpack": value, "mp": value, "msg": value}])
    ref = webdataset_samples(shards)[0]
    got = TarSource(shards)[0]
    assert ref["msgpack"] == msgpack.packb(value)  # webdataset: undecoded
    same(got["msgpack"], value)
    same(got["mp"], ref["mp"])
    same(got["msg"], ref["msg"])


def test_cbor_members(tmp_path, monkeypatch):
    payload = {"k": [1, 2, {"x": b"\x00"}], "f": 1.5}
    cbor2 = pytest.importorskip("cbor2")
    path = write_tar(tmp_path / "c.tar", [("a.cbor", cbor2.dumps(payload)), ("b.cbor", b"\xff\xff")])
    src = TarSource(path)
    assert src[0]["cbor"] == payload
    with pytest.raises(DataError, match=r"c\.tar: member b\.cbor: not valid CBOR \("):
        src[1]
    monkeypatch.setitem(sys.modules, "cbor2", None)
    with pytest.raises(DataError, match=r"c\.tar: member a\.cbor: decoding \.cbor needs the cbor2 package"):
        TarSource(path)[0]


def test_gz_member_that_is_not_gzip(tmp_path):
    good = gzip.compress(b"hello")
    path = write_tar(tmp_path / "g.tar", [("a.txt.gz", good), ("b.txt.gz", b"plain text")])
    src = TarSource(path)
    assert src[0]["txt.gz"] == "hello"
    with pytest.raises(DataError, match=r"g\.tar: member b\.txt\.gz: not valid gzip data \("):
        src[1]
    assert TarSource(path, decode=False)[1]["txt.gz"] == b"plain text"


def test_decompression_bombs_are_refused_by_name(tmp_path, monkeypatch):
    """A .gz or .npz member that expands past MEMBER_LIMIT is an error naming it, not an OOM;
    one just under the limit is read."""
    import loaders._decode as decode

    monkeypatch.setattr(decode, "MEMBER_LIMIT", 10_000)
    bomb, fits = gzip.compress(b"\0" * 10_001), gzip.compress(b"a" * 10_000)
    small, big = io.BytesIO(), io.BytesIO()
    np.savez_compressed(small, x=np.zeros(100, np.uint8))
    np.savez_compressed(big, x=np.zeros(5_000, np.uint8), y=np.zeros(5_000, np.uint8))  # 10,000 bytes + headers
    path = write_tar(tmp_path / "b.tar", [("a.txt.gz", fits), ("a.npz", small.getvalue()),
                                          ("b.txt.gz", bomb), ("b.npz", big.getvalue())])
    src = TarSource(path)
    assert src[0]["txt.gz"] == "a" * 10_000 and src[0]["npz"]["x"].shape == (100,)
    with pytest.raises(DataError) as e:
        TarSource(path, keys=["txt.gz"])[1]
    assert str(e.value).endswith("member b.txt.gz: decompresses to more than 10000 bytes; refusing it "
                                 "(read such members with decode=False)")
    with pytest.raises(DataError, match=r"member b\.npz: a \.npz whose arrays take 10256 bytes, more than 10000; "):
        TarSource(path, keys=["npz"])[1]
    assert len(TarSource(path, decode=False)[1]["txt.gz"]) == len(bomb)


def test_npz_with_objects_is_refused(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, ok=np.arange(3), bad=np.array([{"a": 1}], dtype=object))
    path = write_tar(tmp_path / "z.tar", [("a.npz", buf.getvalue()), ("b.npz", b"PK not a zip")])
    src = TarSource(path)
    with pytest.raises(DataError, match=r"z\.tar: member a\.npz: not a readable \.npz \(.*allow_pickle"):
        src[0]
    with pytest.raises(DataError, match=r"z\.tar: member b\.npz: not a readable \.npz \("):
        src[1]


def test_tenbin_is_read_without_pickle_and_checked(tmp_path):
    from webdataset import tenbin

    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7], dtype=np.int16)]
    good = bytes(tenbin.encode_buffer(arrays))
    assert len(good) == 4 * 80  # two arrays: a header and a data chunk each, 16 + 64 bytes
    cut = good[:240]  # the second array's data chunk is gone
    huge = bytearray(good)
    huge[8:16] = (1 << 62).to_bytes(8, sys.byteorder)  # a chunk length past the member
    path = write_tar(tmp_path / "t.tar", [("a.ten", good), ("b.ten", cut), ("c.ten", bytes(huge)), ("d.ten", b"junk")])
    src = TarSource(path)
    same(src[0]["ten"], [np.asarray(a) for a in tenbin.decode_buffer(good)])
    assert all(a.flags.writeable for a in src[0]["ten"])
    with pytest.raises(DataError, match=r"t\.tar: member b\.ten: not valid tenbin data \(a header chunk without its data"):
        src[1]
    with pytest.raises(DataError, match=r"t\.tar: member c\.ten: not valid tenbin data \(chunk at byte 0 claims"):
        src[2]
    with pytest.raises(DataError, match=r"t\.tar: member d\.ten: not valid tenbin data \(no ~TenBin~ magic at byte 0\)"):
        src[3]


class Custom:
    """An object only a full unpickler can rebuild."""

    def __init__(self, v):
        self.v = v


def test_pth_loads_tensors_safely_and_refuses_other_pickles(tmp_path, monkeypatch):
    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    tensor = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    path = write_tar(tmp_path / "p.tar", [("a.pth", saved(tensor)), ("b.pth", saved({"w": tensor, "n": 3})),
                                          ("c.pth", saved(Custom(5)))])
    src = TarSource(path)
    same(src[0]["pth"], tensor)
    same(src[1]["pth"], {"w": tensor, "n": 3})
    refused = r"p\.tar: member c\.pth: torch\.load\(weights_only=True\) refused it \(WeightsUnpickler error: .*allow_pickle=True"
    with pytest.raises(DataError, match=refused):
        src[2]
    assert TarSource(path, allow_pickle=True)[2]["pth"].v == 5  # the user's opt-in: a full unpickle
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: refused, as any pickle
    with pytest.raises(DataError, match=r"p\.tar: member a\.pth: is a pickle; refusing to unpickle"):
        TarSource(path)[0]


# --------------------------------------------------------------------------- images
def encoded(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def images(size=(6, 5)) -> dict[str, bytes]:
    """One image in each PIL mode a shard may hold, as PNG or JPEG bytes."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=7)
    transparent = palette.copy()
    transparent.info["transparency"] = 2
    return {
        "rgb": encoded(rgb, "PNG"),
        "rgba": encoded(rgba, "PNG"),
        "l": encoded(rgb.convert("L"), "PNG"),
        "la": encoded(rgba.convert("LA"), "PNG"),
        "p": encoded(palette, "PNG"),
        "p-transparent": encoded(transparent, "PNG"),
        "1": encoded(rgb.convert("1"), "PNG"),
        "i16": encoded(Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16)), "PNG"),
        "cmyk-jpeg": encoded(rgb.convert("CMYK"), "JPEG"),
        "l-jpeg": encoded(rgb.convert("L"), "JPEG"),
        "rgb-jpeg": encoded(rgb, "JPEG"),
    }


@pytest.mark.parametrize("spec", ["rgb8", "rgba8", "l8", "rgb", "rgba", "l", "pil", "pilrgb", "pilrgba", "pill"])
def test_image_specs_match_webdataset(tmp_path, spec):
    modes = images()
    shards = shard_writer(tmp_path / "img", [{"png" if "jpeg" not in m else "jpg": b, "txt": m} for m, b in modes.items()],
                          maxcount=100)
    for field in ("png", "jpg"):
        src = TarSource(shards, image=spec, keys=[field, "txt"], incomplete="skip")
        expected = [s for s in webdataset_samples(shards, spec) if field in s]
        assert len(src) == len(expected) > 0
        for i, ref in enumerate(expected):
            got = src[i]
            assert got["txt"] == ref["txt"]
            same(got[field], ref[field], f"{ref['txt']} as {spec}")
        if not spec.startswith("pil"):  # every mode converts to one shape: the batch stacks
            batch = src.read_batch(np.arange(len(src)))[field]
            assert isinstance(batch, np.ndarray) and batch.shape[0] == len(src)
            np.testing.assert_array_equal(batch, np.stack([s[field] for s in expected]))


def test_mixed_mode_jpeg_shard_batches_with_an_image_spec(tmp_path):
    """The user's report: grayscale JPEGs among RGB ones broke the batch."""
    modes = images(size=(8, 8))
    samples = [{"jpg": modes[m], "cls": k} for k, m in enumerate(["rgb-jpeg", "l-jpeg", "cmyk-jpeg", "rgb-jpeg"])]
    shards = shard_writer(tmp_path / "mixed", samples, maxcount=100)
    with pytest.raises(DataError) as e:
        TarSource(shards).read_batch([0, 1])  # as stored: RGB and L do not stack
    assert str(e.value) == (
        f"{shards[0]}: member s000001.jpg: holds uint8 (8, 8), but the batch's first record holds uint8 (8, 8, 3); "
        "cannot stack (use read_records or a collate function; for images of several modes, "
        "TarSource(image='rgb8') converts them all to RGB)"
    )
    batch = TarSource(shards, image="rgb8").read_batch([0, 1, 2, 3])
    assert batch["jpg"].shape == (4, 8, 8, 3) and batch["jpg"].dtype == np.uint8
    expected = np.stack([s["jpg"] for s in webdataset_samples(shards, "rgb8")])
    np.testing.assert_array_equal(batch["jpg"], expected)


def test_palette_png_is_expanded_by_default(tmp_path):
    """The user's report: a palette PNG gave palette indices. As stored, palettes are now expanded."""
    modes = images()
    path = write_tar(tmp_path / "p.tar", [("a.png", modes["p"]), ("b.png", modes["p-transparent"]),
                                          ("c.png", modes["l"]), ("d.png", modes["rgba"])])
    src = TarSource(path)
    with Image.open(io.BytesIO(modes["p"])) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(src[0]["png"], np.asarray(im.convert("RGB")))
    with Image.open(io.BytesIO(modes["p-transparent"])) as im:
        np.testing.assert_array_equal(src[1]["png"], np.asarray(im.convert("RGBA")))
    assert src[0]["png"].shape == (5, 6, 3) and src[1]["png"].shape == (5, 6, 4)
    assert src[2]["png"].shape == (5, 6) and src[3]["png"].shape == (5, 6, 4)  # other modes: as stored


def test_image_spec_is_checked():
    with pytest.raises(ValueError, match=r"image='rgb32': not an image spec; one of \['l8', 'rgb8', 'rgba8', 'l', 'rgb'"):
        TarSource("unused.tar", image="rgb32")
    with pytest.raises(ValueError, match=r"image='torchrgb8': torch specs are not read here"):
        TarSource("unused.tar", image="torchrgb8")


# --------------------------------------------------------------------------- __key__, __url__ and names
@pytest.mark.parametrize("one_range", [True, False], ids=["shards-in-one-range", "map-per-shard"])
def test_key_and_url_fields_on_request(tmp_path, monkeypatch, one_range):
    if not one_range:
        monkeypatch.setattr("loaders._tar.map_span", lambda paths: None)
    shards = shard_writer(tmp_path / "ku", [{"cls": i, "txt": f"t{i}"} for i in range(9)], maxcount=4)
    expected = webdataset_samples(shards)
    src = TarSource(shards, keys=["cls", "__key__", "__url__"], rename={"__url__": "url"})
    assert src.keys == ["cls", "__key__", "url"] and "__key__" not in TarSource(shards).fields
    for i, ref in enumerate(expected):
        got = src[i]
        assert got == {"cls": ref["cls"], "__key__": ref["__key__"], "url": ref["__url__"]}
    order = [8, 0, 4, 4]
    batch = src.read_batch(order)
    assert batch["__key__"].tolist() == [expected[i]["__key__"] for i in order]
    assert batch["url"].tolist() == [expected[i]["__url__"] for i in order] and batch["url"].dtype.kind == "U"
    assert batch["cls"].tolist() == [8, 0, 4, 4]
    empty = src.read_batch([])
    assert empty["__key__"].shape == (0,) and empty["url"].shape == (0,)
    only_keys = TarSource(shards, keys=["__key__"])
    assert only_keys.read_batch([1, 2])["__key__"].tolist() == ["s000001", "s000002"]


TRICKY = [
    ("__meta__/info.json", b'{"about": "skipped"}'),
    ("__index__", b"skipped too"),
    ("s0.cls", b"0"),
    ("s0.", b"no extension after the dot"),
    ("s0.TXT", b"upper case"),
    ("dir.v1/s1.cls", b"1"),
    ("dir.v1/s1.", b"e1"),
    ("dir.v1/s1.txt", b"t1"),
    (".hidden", b"h"),
    ("noext", b"n"),
    ("d/__e.f__", b"a key in a folder"),
    ("d/s2.a.b.cls", b"2"),
    ("__meta__.json", b"a key of its own"),
]


def _index_samples(path) -> list[tuple[str, list[str]]]:
    index = scan_tar(path)
    return [(key, sorted(f for j, f in enumerate(index["fields"]) if index["offsets"][i, j] >= 0))
            for i, key in enumerate(index["keys"])]


def _wds_samples(path) -> list[tuple[str, list[str]]]:
    return [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in webdataset_samples([path], decode=False)]


def test_member_names_split_as_webdataset_does(tmp_path):
    path = write_tar(tmp_path / "names.tar", TRICKY)
    expected = _wds_samples(path)
    assert expected == [("s0", ["", "cls", "txt"]), ("dir.v1/s1", ["", "cls", "txt"]), ("d/__e", ["f__"]),
                        ("d/s2", ["a.b.cls"]), ("__meta__", ["json"])]
    assert _index_samples(path) == expected
    src = TarSource(path, keys=["", "cls"], incomplete="skip")
    assert [src.sample_key(i) for i in range(len(src))] == ["s0", "dir.v1/s1"]
    assert src[0][""] == b"no extension after the dot" and src[1]["cls"] == 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_member_names_from_gnu_tar(tmp_path):
    root = tmp_path / "files"
    for name, data in TRICKY:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    path = str(tmp_path / "gnu.tar")
    subprocess.run(["tar", "--format=gnu", "-cf", path, "-C", str(root), *[n for n, _ in TRICKY]], check=True)
    assert _index_samples(path) == _wds_samples(path)
    assert [k for k, _ in _index_samples(path)] == ["s0", "dir.v1/s1", "d/__e", "d/s2", "__meta__"]


# --------------------------------------------------------------------------- incomplete samples
def _holey(tmp_path) -> list[str]:
    npy = {k: _npy(np.full(2, k)) for k in range(6)}
    a = write_tar(tmp_path / "h-0.tar", [("a.npy", npy[0]), ("a.cls", b"0"), ("b.npy", npy[1]),
                                         ("c.npy", npy[2]), ("c.cls", b"2")])
    b = write_tar(tmp_path / "h-1.tar", [("d.cls", b"3"), ("e.npy", npy[4]), ("e.cls", b"4"), ("f.cls", b"5"),
                                         ("f.npy", npy[5])])
    return [a, b]


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_incomplete_samples_raise_by_default(tmp_path):
    shards = _holey(tmp_path)
    with pytest.raises(DataError) as e:
        TarSource(shards)
    assert str(e.value) == (
        f"{shards[0]}: sample 'b' has no 'cls' member (expected fields ['npy', 'cls']; 1 missing in this shard). "
        "Select the fields every sample has with keys=[...], or skip incomplete samples with incomplete='skip'"
    )
    with pytest.raises(ValueError, match=r"incomplete='drop': expected 'error' or 'skip'"):
        TarSource(shards, incomplete="drop")


@pytest.mark.parametrize("one_range", [True, False], ids=["shards-in-one-range", "map-per-shard"])
def test_incomplete_samples_skipped_at_index_time(tmp_path, monkeypatch, one_range):
    if not one_range:
        monkeypatch.setattr("loaders._tar.map_span", lambda paths: None)
    shards = _holey(tmp_path)
    src = TarSource(shards, incomplete="skip", keys=["npy", "cls", "__key__"])
    expected = [s for s in webdataset_samples(shards) if "npy" in s and "cls" in s]  # what a wds .select() keeps
    assert src.skipped == 2 and len(src) == len(expected) == 4
    assert [src.sample_key(i) for i in range(4)] == [s["__key__"] for s in expected] == ["a", "c", "e", "f"]
    assert src.sample_key(-1) == "f" and src.block_starts.tolist() == [0, 2]
    for i, ref in enumerate(expected):
        got = src[i]
        assert got["cls"] == ref["cls"] and got["__key__"] == ref["__key__"]
        np.testing.assert_array_equal(got["npy"], ref["npy"])
    batch = src.read_batch([3, 0, 2, 1])
    assert batch["cls"].tolist() == [5, 0, 4, 2] and batch["__key__"].tolist() == ["f", "a", "e", "c"]
    np.testing.assert_array_equal(batch["npy"], [np.full(2, k) for k in (5, 0, 4, 2)])
    assert "skipped 2 incomplete" in repr(src)
    with pytest.raises(IndexError, match=r"record 4 is out of range \[0, 4\)"):
        src.read_batch([4])
    # another selection, another set: only 'd' lacks an .npy member
    npy_only = TarSource(shards, incomplete="skip", keys=["npy"])
    assert npy_only.skipped == 1 and len(npy_only) == 5
    assert [npy_only.sample_key(i) for i in range(5)] == ["a", "b", "c", "e", "f"]
    # nothing lacking: nothing skipped
    assert TarSource(shards[1:], incomplete="skip", keys=["cls"]).skipped == 0


def test_skipped_set_is_the_same_in_every_process_and_after_resume(tmp_path):
    shards = _holey(tmp_path)
    src = TarSource(shards, incomplete="skip")
    clone = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 4000  # the kept records are not carried in the pickle
    np.testing.assert_array_equal(clone.read_batch([0, 1, 2, 3])["cls"], src.read_batch([0, 1, 2, 3])["cls"])
    assert clone.skipped == 2 and clone.sample_key(2) == "e"
    again = TarSource(shards, incomplete="skip")  # from the cached index
    assert again.skipped == 2 and again.describe() == src.describe()
    sampler = Sampler(len(src), 2, seed=3, shuffle=True, num_epochs=2)
    straight = [b["cls"].tolist() for b in Loader(src, sampler)]
    first = Loader(src, sampler)
    it = iter(first)
    taken = [next(it)["cls"].tolist() for _ in range(3)]
    resumed = Loader(again, Sampler(len(again), 2, seed=3, shuffle=True, num_epochs=2))
    resumed.load_state_dict(first.state_dict())
    assert taken + [b["cls"].tolist() for b in resumed] == straight
    assert "records=4" in src.describe() and "records=6" not in src.describe()


def test_every_sample_incomplete(tmp_path):
    path = write_tar(tmp_path / "none.tar", [("a.npy", _npy(np.zeros(1))), ("b.cls", b"1")])
    with pytest.raises(DataError, match=r"none\.tar: no sample has every selected field \['npy', 'cls'\] "
                                        r"\(2 incomplete samples skipped\)"):
        TarSource(path, incomplete="skip")


# --------------------------------------------------------------------------- member order
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_members_of_one_key_apart_are_an_error(tmp_path):
    """``tar`` of an unsorted listing interleaves samples; webdataset then yields fragments (two
    partial samples per key). Tandem refuses the shard rather than read other samples than webdataset."""
    root = tmp_path / "files"
    root.mkdir()
    for name in ("a.cls", "b.cls", "a.txt", "b.txt"):
        (root / name).write_text(str("ab".index(name[0])) if name.endswith(".cls") else name[0])
    path = str(tmp_path / "interleaved.tar")
    subprocess.run(["tar", "-cf", path, "-C", str(root), "a.cls", "b.cls", "a.txt", "b.txt"], check=True)
    assert [s["__key__"] for s in webdataset_samples([path], decode=False)] == ["a", "b", "a", "b"]
    with pytest.raises(DataError) as e:
        TarSource(path)
    assert str(e.value) == (
        f"{path}: member 'a.txt' belongs to sample 'a', whose other members came earlier; a sample's members "
        "must be consecutive (webdataset would read them as separate, partial samples with the same key). "
        "Write the shard with its members sorted by name (tar --sort=name, or webdataset's TarWriter)"
    )
    sorted_path = str(tmp_path / "sorted.tar")
    subprocess.run(["tar", "--sort=name", "-cf", sorted_path, "-C", str(root), "."], check=True)
    src = TarSource(sorted_path)
    assert [src.sample_key(i) for i in range(len(src))] == ["./a", "./b"]
    batch = src.read_batch([0, 1])
    assert batch["txt"].tolist() == ["a", "b"] and batch["cls"].tolist() == [0, 1]


# --------------------------------------------------------------------------- end of archive
def test_tar_without_end_of_archive_marker_is_read_with_a_warning(tmp_path):
    full = write_tar(tmp_path / "full.tar", [("a.cls", b"1"), ("a.txt", b"x"), ("b.cls", b"2"), ("b.txt", b"y")])
    data = Path(full).read_bytes()
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + 512  # the last member's one data block
    assert data[end:].strip(b"\0") == b"" and len(data) > end
    cut = tmp_path / "no-eoa.tar"
    cut.write_bytes(data[:end])
    expected = webdataset_samples([str(cut)])  # webdataset reads it without a word
    with pytest.warns(TruncatedTarWarning) as record:
        src = TarSource(str(cut))
    assert len(record) == 1 and str(record[0].message) == (
        f"{cut}: truncated tar: ends at byte {end} after its last complete member, without the end-of-archive "
        "marker; reading the 2 samples before it, as webdataset does (if the file was cut short, later samples are missing)"
    )
    assert issubclass(TruncatedTarWarning, DataError)  # under -W error it is a DataError like the others
    assert [(src.sample_key(i), src[i]["cls"], src[i]["txt"]) for i in range(2)] == [
        (s["__key__"], s["cls"], s["txt"]) for s in expected]
    part = tmp_path / "in-a-header.tar"
    part.write_bytes(data[: end + 100] + b"x")  # a partial header after the last member: still an error
    with pytest.raises(DataError, match=rf"in-a-header\.tar: truncated tar: ends at byte {end + 101} inside a header"):
        TarSource(str(part))


def test_index_version_was_bumped():
    """The split rule and end-of-archive handling changed what scan_tar records: older caches are rebuilt."""
    assert INDEX_VERSION >= 2
