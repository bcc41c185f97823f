"""Hostile input: crafted or corrupted tar headers, ``.npy`` headers and index-cache files end in a
result or a :class:`DataError` naming the file, never a hang, another exception or a huge allocation.

Valid shards are written by webdataset's ShardWriter, Python's tarfile and GNU tar; the tests then
corrupt their bytes. Every scan and decode runs under a CPU-time alarm, so a hang fails in seconds.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from loaders import DataError, TarSource
from loaders._decode import decode
from loaders._tar_format import load_index, scan_tar

from .conftest import write_tar as tar_of

pytestmark = pytest.mark.timeout(60)  # a backstop: the CPU alarm below fails a hang long before
# No "explain" phase: with st.data() it reports some failures as FlakyStrategyDefinition, hiding the error.
FUZZ = settings(deadline=None, database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Hung(Exception):
    """Raised by the CPU-time alarm: the code under test spun for too long."""


@contextlib.contextmanager
def cpu_limit(seconds: float = 3.0):
    """Fail with :class:`Hung` after ``seconds`` of CPU time (SIGVTALRM: pytest-timeout keeps SIGALRM)."""

    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s of CPU time")

    if not hasattr(signal, "ITIMER_VIRTUAL"):  # Windows: pytest-timeout's limit is the only one
        yield
        return
    old = signal.signal(signal.SIGVTALRM, alarm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def scan(path) -> dict:
    with cpu_limit():
        return scan_tar(str(path))


# --------------------------------------------------------------------------- crafted tars
def header(name: str, size: int, kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.USTAR_FORMAT, pax=None) -> bytes:
    """One member's header block(s) as Python's tarfile writes them (``size`` may be a lie)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, size, dict(pax or {})
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def with_checksum(block: bytes) -> bytes:
    """``block`` with its checksum field recomputed, as a tar writer would."""
    block = block[:148] + b" " * 8 + block[156:]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def write_tar(path: Path, *blocks: bytes) -> str:
    """Header blocks followed by a valid ``a.cls`` member and the end-of-archive marker."""
    path.write_bytes(b"".join(blocks) + header("a.cls", 1) + padded(b"1") + bytes(1024))
    return str(path)


def pax_block(payload: bytes) -> bytes:
    return header("././@PaxHeader", len(payload), tarfile.XHDTYPE) + padded(payload)


def test_valid_crafted_tar_scans(tmp_path):
    path = write_tar(tmp_path / "ok.tar", pax_block(b"14 path=b.cls\n"), header("x", 1) + padded(b"2"))
    index = scan(path)
    assert index["keys"] == ["b", "a"] and index["offsets"].tolist() == [[1536], [2560]]


def test_pax_record_of_length_zero(tmp_path):
    """Length 0 made the PAX parser advance by nothing: a hang."""
    path = write_tar(tmp_path / "zero.tar", pax_block(b"0 path=a\n"), header("b.cls", 1) + padded(b"2"))
    with pytest.raises(DataError) as e:
        scan(path)
    assert str(e.value).startswith(
        f"{path}: bad tar header at byte 0: malformed PAX record b'0 path=a\\n' at byte 512: "
        "expected '<length> <key>=<value>\\n', its length counting the whole record"
    )


@pytest.mark.parametrize(
    "payload", [b"3 path=a\n", b"99 path=a\n", b"x path=a\n", b"-9 path=a\n", b"10 path=ab\n", b"6 abc\n", b"+9 path=a\n"]
)
def test_malformed_pax_records(tmp_path, payload):
    path = write_tar(tmp_path / "bad.tar", pax_block(payload), header("b.cls", 1) + padded(b"2"))
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: bad tar header at byte 0: malformed PAX record .* at byte 512: "):
        scan(path)


def test_pax_payload_padded_with_nuls_is_valid(tmp_path):
    path = write_tar(tmp_path / "nul.tar", pax_block(b"10 path=b\n" + bytes(20)), header("x.cls", 1) + padded(b"2"))
    assert scan(path)["keys"] == ["a"]  # the member took the PAX path "b": no extension, not a field
    path = write_tar(tmp_path / "nul2.tar", pax_block(b"14 path=b.cls\n" + bytes(20)), header("x.cls", 1) + padded(b"2"))
    assert scan(path)["keys"] == ["b", "a"]


def sign_magnitude(block: bytes) -> bytes:
    """The size field as ``0xc0`` + magnitude: what the old parser read as -512."""
    return with_checksum(block[:124] + b"\xc0" + (512).to_bytes(11, "big") + block[136:])


@pytest.mark.parametrize("encode", [lambda b: b, sign_magnitude], ids=["gnu-twos-complement", "sign-bit"])
def test_directory_of_negative_base256_size(tmp_path, encode):
    """A negative size walked the scan back onto the same header: a hang."""
    directory = encode(header("d/", -512, tarfile.DIRTYPE, tarfile.GNU_FORMAT))
    path = write_tar(tmp_path / "neg.tar", directory)
    expected = rf"^{re.escape(path)}: bad tar header at byte 0: size -\d+ is negative \(expected a size >= 0\)"
    with pytest.raises(DataError, match=expected):
        scan(path)


def test_directory_of_size_minus_512_reads_as_tarfile_does(tmp_path):
    raw = header("d/", -512, tarfile.DIRTYPE, tarfile.GNU_FORMAT)
    assert tarfile.TarInfo.frombuf(raw, "utf-8", "surrogateescape").size == -512
    with pytest.raises(DataError, match=r"size -512 is negative"):
        scan(write_tar(tmp_path / "neg.tar", raw))


@pytest.mark.parametrize("value", ["-1536", "abc", "1e3", "0x10", " 5", "", "١٢"])
def test_pax_size_that_is_not_a_size(tmp_path, value):
    """``size=-1536`` walked the scan backwards (a hang); ``size=abc`` raised ValueError."""
    path = write_tar(tmp_path / "size.tar", header("noext", 0, fmt=tarfile.PAX_FORMAT, pax={"size": value}))
    with pytest.raises(DataError) as e:
        scan(path)
    assert str(e.value) == f"{path}: bad tar header at byte 0: PAX size {value!r} is not a size (expected decimal digits)"


def test_member_past_the_end(tmp_path):
    path = write_tar(tmp_path / "long.tar", header("noext", 0, fmt=tarfile.PAX_FORMAT, pax={"size": "99999999"}))
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: truncated tar: member 'noext' needs 99999999 bytes at byte 1536"):
        scan(path)


def test_size_field_that_is_not_octal(tmp_path):
    block = header("a.cls", 1)
    path = write_tar(tmp_path / "oct.tar", with_checksum(block[:124] + b"-0000000001\0" + block[136:]) + padded(b"1"))
    expected = rf"^{re.escape(path)}: bad tar header at byte 0: size field b'-0000000001\\x00' is not octal"
    with pytest.raises(DataError, match=expected):
        scan(path)


# --------------------------------------------------------------------------- fuzzed tar headers
def _gnu_tar(root: Path, fmt: str) -> str:
    src = root / f"src-{fmt}"
    long_dir = "d" * 70 + "/" + "e" * 70  # paths over 100 characters: GNU long-name or PAX path headers
    (src / long_dir).mkdir(parents=True)
    for i in range(2):
        np.save(src / long_dir / f"k{i}.npy", np.arange(3, dtype=np.int16) + i)
        (src / long_dir / f"k{i}.cls").write_text(str(i))
    shard = root / f"gnu-{fmt}.tar"
    members = [f"{long_dir}/k{i}.{ext}" for i in range(2) for ext in ("cls", "npy")]
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(shard), "-C", str(src), *members], check=True)
    return str(shard)


def _shard_writer(root: Path, name: str, mtime: float) -> str:
    import webdataset as wds

    with wds.ShardWriter(str(root / f"{name}-%06d.tar"), maxcount=100, verbose=0, mtime=mtime) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}", "npy": np.full(2, i, np.float32), "cls": i, "txt": f"t{i}"})
    return str(root / f"{name}-000000.tar")


class Shard:
    """A valid shard's bytes and where its header blocks lie."""

    def __init__(self, path: str) -> None:
        self.path, self.data = path, Path(path).read_bytes()
        assert scan_tar(path)["keys"]
        self.positions: list[int] = []  # every byte of every header block, PAX and long-name payloads included
        self.fields: list[int] = []  # the bytes of the size, checksum, type and magic fields, and extended headers
        self.starts: list[int] = []  # where a header block (with a checksum) starts
        self.extended: list[int] = []  # where an extended header (PAX "x" or GNU long name "L") starts
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        for m in members:
            self.positions += range(m.offset, m.offset_data)
            for start in {m.offset, m.offset_data - 512}:
                self.starts.append(start)
                self.fields += [start + k for k in (*range(124, 136), *range(148, 157), *range(257, 265))]
            self.fields += range(m.offset + 512, m.offset_data - 512)
            if m.offset != m.offset_data - 512:
                self.extended.append(m.offset)
        end = members[-1].offset_data + -(-members[-1].size // 512) * 512
        self.positions += range(end, end + 512)  # the end-of-archive marker
        self.starts.append(end)

    def __repr__(self) -> str:
        return f"Shard({os.path.basename(self.path)!r})"


@pytest.fixture(scope="module")
def fuzz_shards(tmp_path_factory) -> list[Shard]:
    root = tmp_path_factory.mktemp("fuzz")
    paths = [_shard_writer(root, "wds-pax", 1.5e9 + 0.25), _shard_writer(root, "wds-ustar", 0)]
    if shutil.which("tar"):
        paths += [_gnu_tar(root, "gnu"), _gnu_tar(root, "pax")]
    shards = [Shard(p) for p in paths]
    assert shards[0].data[156:157] == b"x" and shards[0].extended  # ShardWriter wrote PAX headers (a float mtime)
    return shards


def encode_size(n: int, how: str) -> bytes:
    """``n`` as a 12-byte tar size field: octal text, GNU base-256 (two's complement), a sign bit, or decimal text."""
    if how == "octal" and 0 <= n < 8**11:
        return b"%011o\0" % n
    if how == "sign-bit":
        return b"\xc0" + (abs(n) % 256**11).to_bytes(11, "big")
    if how == "text":
        return str(n).encode()[:12].ljust(12, b"\0")
    n = max(-(256**11), min(n, 256**11 - 1))
    return (b"\x80" + n.to_bytes(11, "big")) if n >= 0 else (256**12 + n).to_bytes(12, "big")


_BYTES = st.one_of(st.integers(0, 255), st.sampled_from(b"0123456789 -=\n\0\x80\xff\x7fxgLK5S")).map(lambda b: bytes([b]))
_TOKENS = st.sampled_from(
    [b"0", b"00", b"-", b"-1", b"-1536", b"0 ", b"1 ", b"9", b" ", b"\n", b"=", b"size=", b"path=", b"abc", b"\0",
     b"\xff\xff", b"\xc0", b"\x80", b"x", b"L", b"5", b"99999999999"]
)
_SIZES = st.one_of(st.sampled_from([-1536, -512, -1, 0, 1, 511, 512, 513, 10**6]), st.integers(-(2**66), 2**66))
_PAX_VALUES = st.one_of(
    st.sampled_from(["-1536", "abc", "", "0", "512", "9" * 25, "a.cls", "x"]),
    st.integers(-2000, 2000).map(str),
    st.text(max_size=6),
)


@st.composite
def header_edits(draw, shard: Shard) -> list[tuple[int, bytes]]:
    """Edits ``(position, bytes)`` of a shard's header blocks: single bytes, tokens, a size field rewritten
    (octal, base-256, sign bit, decimal text), or a PAX record rewritten (with a right or wrong length)."""
    kind = draw(st.sampled_from(["byte", "token", "size", "pax"] if shard.extended else ["byte", "token", "size"]))
    if kind == "byte":
        return [(draw(st.sampled_from(shard.positions)), draw(_BYTES))]
    if kind == "token":
        return [(draw(st.sampled_from(shard.fields)), draw(_TOKENS))]
    if kind == "size":
        start = draw(st.sampled_from(shard.starts[:-1]))
        return [(start + 124, encode_size(draw(_SIZES), draw(st.sampled_from(["octal", "base-256", "sign-bit", "text"]))))]
    start = draw(st.sampled_from(shard.extended))
    key = draw(st.sampled_from([b"size", b"path", b"mtime", b"comment", b"", b"a=b"]))
    value = draw(_PAX_VALUES).encode("utf-8", "surrogateescape")
    body = b" %s=%s\n" % (key, value)
    length = next(n for n in itertools.count(len(body)) if n == len(body) + len(str(n)))  # counting its own digits
    length = draw(st.one_of(st.just(length), st.integers(-3, length + 3)))
    record = b"%d%s" % (length, body)
    return [(start + 512, record[:512]), (start + 124, b"%011o\0" % len(record[:512]))]


@settings(FUZZ, max_examples=400)
@given(data=st.data(), fix_checksums=st.sampled_from([True, True, True, False]))
def test_fuzzed_headers_give_an_index_or_a_data_error(fuzz_shards, tmp_path, data, fix_checksums):
    shard = data.draw(st.sampled_from(fuzz_shards), label="shard")
    edits = sum(data.draw(st.lists(header_edits(shard), min_size=1, max_size=4), label="edits"), [])
    buf = bytearray(shard.data)
    for pos, value in edits:
        buf[pos : pos + len(value)] = value[: len(buf) - pos]
    if fix_checksums:  # so the corrupt fields are parsed, not stopped by the checksum
        touched = {s for s in shard.starts for pos, _ in edits if s <= pos < s + 512 and any(buf[s : s + 512])}
        for start in touched:
            buf[start : start + 512] = with_checksum(bytes(buf[start : start + 512]))
    assert len(buf) == len(shard.data)
    path = tmp_path / ("fuzz-" + os.path.basename(shard.path))
    path.write_bytes(buf)
    try:
        index = scan(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    offsets, sizes = index["offsets"], index["sizes"]
    assert offsets.shape == sizes.shape == (len(index["keys"]), len(index["fields"]))
    assert ((offsets < 0) == (sizes < 0)).all() and (offsets + sizes <= len(buf)).all()
    assert (offsets[offsets >= 0] % 512 == 0).all()


# --------------------------------------------------------------------------- .npy headers
def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_with_header(header: dict, data: bytes = b"") -> bytes:
    """A ``.npy`` whose header numpy's own writer formats from ``header`` (which may lie)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data




@pytest.mark.parametrize(
    ("shape", "descr", "nbytes", "error"),
    [
        ((-1,), "<f8", 8, r"bad header: shape \(-1,\) is not a tuple of integers >= 0"),
        ((-1, -1), "<f8", 8, r"bad header: shape \(-1, -1\) is not a tuple"),  # once: ValueError from reshape
        ((-100,), "<f8", 8, r"bad header: shape \(-100,\) is not a tuple"),  # once: a gather of negative width
        ((2**62, 2**62), "<f8", 0, r"float64 \(4611686018427387904, 4611686018427387904\) is too large an array"),
        ((2**32, 2**32), "<f8", 0, r"float64 \(4294967296, 4294967296\) is too large"),  # int64 product: 0
        ((0, 2**61), "<f8", 0, r"float64 \(0, 2305843009213693952\) is too large"),  # numpy refuses its shape
        ((2**50,), "|u1", 64, r"uint8 \(1125899906842624,\) is too large"),
        ((2, True), "<f8", 16, r"bad header: shape \(2, True\) is not a tuple"),
        ((2.0,), "<f8", 16, r"bad header: shape \(2.0,\) is not a tuple"),
        ((1,) * 40, "<f8", 8, r"bad header: 40 dimensions, more than numpy's 32"),
        ((3,), "(2,)<f4", 24, r"bad header: descr '\(2,\)<f4' is a subarray dtype"),  # once: ValueError in the gather
        ((2**31,), "|S0", 0, r"bad header: descr '\|S0' is a string of no characters"),  # once: 2 GiB of b""
    ],
)
def test_npy_shape_negative_or_overflowing(tmp_path, shape, descr, nbytes, error):
    member = npy_with_header({"descr": descr, "fortran_order": False, "shape": shape}, bytes(nbytes))
    path = tar_of(tmp_path / "shape.tar", [("a.npy", npy(np.zeros(1))), ("b.npy", member)])
    src = TarSource(path)
    pattern = rf"^{re.escape(path)}: member b\.npy: not a valid \.npy member \({error}"
    with cpu_limit(), pytest.raises(DataError, match=pattern):
        src[1]
    for batch in ([1], [1, 0], [0, 1]):
        with cpu_limit(), pytest.raises(DataError, match=rf"^{re.escape(path)}: member b\.npy: "):
            src.read_batch(batch)
    with pytest.raises(DataError, match=pattern):
        decode("npy", member, f"{path}: member b.npy")


def test_npy_header_claiming_more_than_the_member_holds(tmp_path):
    """A header claiming 512 GiB: the batch gather must not allocate rows of it."""
    lie = npy_with_header({"descr": "|u1", "fortran_order": False, "shape": (2**39,)}, bytes(64))
    path = tar_of(tmp_path / "lie.tar", [("a.npy", lie), ("b.npy", lie)])
    src = TarSource(path)
    expected = f"{path}: member a.npy: not a valid .npy member: {len(lie)} bytes, header says {len(lie) - 64 + 2**39} for uint8"
    for read in (lambda: src.read_batch([0, 1]), lambda: src[0]):
        with cpu_limit(), pytest.raises(DataError, match=f"^{re.escape(expected)}"):
            read()


def test_npy_with_a_7kb_header_is_read(tmp_path):
    """300 fields: np.save writes a header of 6720 bytes (format 1.0), once refused as a bad header."""
    dtype = np.dtype([(f"field_{i:03d}", "<f4" if i % 2 else ">i2") for i in range(300)])
    arrays = [np.zeros(4, dtype) for _ in range(3)]
    for k, a in enumerate(arrays):
        for i, name in enumerate(dtype.names):
            a[name] = np.arange(4) * i + k
    members = [npy(a) for a in arrays]
    assert members[0][6] == 1 and 4096 < int.from_bytes(members[0][8:10], "little") + 10 < 8192
    path = tar_of(tmp_path / "wide.tar", [(f"s{k}.npy", m) for k, m in enumerate(members)])
    src = TarSource(path)
    expected = [np.load(io.BytesIO(m)) for m in members]
    for k in range(3):
        np.testing.assert_array_equal(src[k]["npy"], expected[k])
        assert src[k]["npy"].dtype == expected[k].dtype.newbyteorder("=")
    batch = src.read_batch([2, 0, 1])["npy"]
    np.testing.assert_array_equal(batch, np.stack([expected[2], expected[0], expected[1]]))
    np.testing.assert_array_equal(decode("npy", members[1], "m"), expected[1])


def test_npy_of_no_fields_and_version_3(tmp_path):
    empty = np.zeros(3, np.dtype([]))
    unicode_name = np.zeros(2, np.dtype([("\u03b1", "<i4")]))  # not latin-1: format 3.0 (utf-8)
    with pytest.warns(UserWarning, match="format 3.0"):
        assert npy(unicode_name)[6] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        members = [npy(empty), npy(unicode_name)]
    for arr, member in zip((empty, unicode_name), members, strict=True):
        got = decode("npy", member, "m")
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
    src = TarSource(tar_of(tmp_path / "empty.tar", [(f"s{k}.npy", members[0]) for k in range(3)]))
    batch = src.read_batch([2, 0])["npy"]  # once: ValueError viewing no bytes as a dtype of none
    assert batch.shape == (2, 3) and batch.dtype == empty.dtype


_VALID_NPY = [
    np.arange(12, dtype="<f4").reshape(3, 4),
    np.arange(5, dtype=">i8"),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array(3.5),
    np.zeros(2, [("a", "<i4"), ("b", "S3")]),
    np.array(["ab", "c"]),
    np.zeros((2, 0), bool),
]
_COUNT = itertools.count()
_NPY_EDITS = st.one_of(
    st.integers(0, 255).map(lambda b: bytes([b])),
    st.sampled_from([bytes([c]) for c in b"-0123456789(),'<>|=fiuUSVbO:{}[] \n\x00\x02\x03\xff"]),
    st.sampled_from([b"-1", b"0", b"2**", b"9" * 20, b"True", b"V0", b"O", b"(", b"\\", b"\\e", b"\xff\xff", b"{}"]),
)
_DESCRS = ["<f8", ">i2", "|u1", "|b1", "<U3", "|V0", "|S0", "|O", "<c16", "<m8[s]", "<f2", "<f0", "zz", 3,
           [("a", "<i4"), ("b", ">f8")], [], [("a", "<i4", (2**62,))], [("a", "|O")]]


def header_positions(member: bytes) -> st.SearchStrategy[int]:
    """Positions in a ``.npy`` header: anywhere, or in its shape or descr."""
    head = int.from_bytes(member[8:10], "little") + 10
    shape, descr = member.index(b"'shape'"), member.index(b"'descr'")
    return st.one_of(st.integers(0, head - 1), st.integers(shape + 9, shape + 20), st.integers(descr + 9, descr + 16))


def edit_header(member: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(member)
    for pos, value in edits:
        out[pos : pos + len(value)] = value[: len(out) - pos]
    return bytes(out)


@st.composite
def lying_headers(draw) -> tuple[bytes, tuple, int]:
    """A ``.npy`` header numpy's own writer formats from a drawn shape (maybe negative or huge), descr and
    order; with its shape and the itemsize of its descr (8 where there is none)."""
    dims = st.one_of(st.integers(-3, 6), st.sampled_from([-100, 2**31, 2**32, 2**36, 2**62, 2**63, 2**64]))
    shape = draw(st.one_of(st.lists(dims, max_size=4).map(tuple), st.just((1,) * 40)))
    descr = draw(st.sampled_from(_DESCRS))
    buf = io.BytesIO()
    writer = draw(st.sampled_from([np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0]))
    writer(buf, {"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape})
    try:
        itemsize = np.lib.format.descr_to_dtype(descr).itemsize
    except Exception:
        itemsize = 8
    return buf.getvalue(), shape, itemsize


@st.composite
def npy_members(draw) -> bytes:
    """A ``.npy`` member with a corrupt header: a valid one with bytes or tokens overwritten in its header,
    or a lying header with data of a drawn length (what it says, or what an int64 product wraps to)."""
    if draw(st.booleans()):
        member = npy(draw(st.sampled_from(_VALID_NPY)))
        return edit_header(member, draw(st.lists(st.tuples(header_positions(member), _NPY_EDITS), min_size=1, max_size=4)))
    header, shape, itemsize = draw(lying_headers())
    lengths = {0, 8, itemsize, math.prod(shape) * itemsize, math.prod(shape) % 2**64 * itemsize}
    return header + bytes(draw(st.sampled_from(sorted(n for n in lengths if 0 <= n <= 4096))))


@settings(FUZZ, max_examples=400)
@given(member=npy_members())
def test_fuzzed_npy_headers_give_an_array_or_a_data_error(member):
    where = "fuzz.tar: member k.npy"
    tracemalloc.start()
    try:
        with cpu_limit():
            arr = decode("npy", member, where)
        assert isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.dtype.isnative
    except DataError as e:
        assert str(e).startswith(where + ": ")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 24


class NpyShard:
    """A shard of three ``.npy`` members: its path, bytes and where each member starts."""

    def __init__(self, path: str) -> None:
        self.path, self.data = path, Path(path).read_bytes()
        with tarfile.open(path) as tf:
            self.starts = [m.offset_data for m in tf.getmembers()]

    def __repr__(self) -> str:
        return f"NpyShard({os.path.basename(self.path)!r})"


@pytest.fixture(scope="module")
def npy_shards(tmp_path_factory) -> list[NpyShard]:
    """Small members (read in one gather) and large ones (a header gather, then a data gather)."""
    root = tmp_path_factory.mktemp("npy")
    out = []
    for name, shape in (("small", (3, 5)), ("large", (40, 40))):
        arrays = [np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + k for k in range(3)]
        out.append(NpyShard(tar_of(root / f"{name}.tar", [(f"s{k}.npy", npy(a)) for k, a in enumerate(arrays)])))
    return out


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fuzzed_npy_headers_in_batches(npy_shards, tmp_path, data):
    """Batches (the gathers, which compare headers with the first record's) and records agree, or fail
    with a DataError naming the shard and member."""
    shard = data.draw(st.sampled_from(npy_shards), label="shard")
    buf = bytearray(shard.data)
    start = shard.starts[data.draw(st.sampled_from([0, 1]), label="member")]
    head = shard.data[start : start + 128]
    if data.draw(st.booleans(), label="rewrite the header"):
        new = data.draw(lying_headers(), label="header")[0]
        assume(len(new) == len(head))  # the member keeps its size
    else:
        edits = data.draw(st.lists(st.tuples(header_positions(head), _NPY_EDITS), min_size=1, max_size=3), label="edits")
        new = edit_header(head, edits)
    buf[start : start + 128] = new
    path = tmp_path / f"{next(_COUNT)}-{os.path.basename(shard.path)}"  # a new file: an older source may map the last
    path.write_bytes(buf)
    src = TarSource(str(path), index_dir=str(tmp_path / "idx"))
    tracemalloc.start()
    try:
        with cpu_limit():
            for batch in ([0, 1, 2], [1, 2, 0], [2, 1]):
                try:
                    got = src.read_batch(batch)["npy"]
                except DataError as e:
                    assert str(e).startswith(f"{path}: member s"), e  # s0.npy, s1.npy or s2.npy
                    continue
                for row, i in zip(got, batch, strict=True):
                    np.testing.assert_array_equal(row, src[i]["npy"])
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 24


# --------------------------------------------------------------------------- decoding errors
def test_invalid_utf8_text_member(tmp_path):
    path = tar_of(tmp_path / "text.tar", [("a.txt", b"caption"), ("b.txt", b"bad \xff\xfe byte")])
    src = TarSource(path)
    assert src[0]["txt"] == "caption"
    expected = rf"^{re.escape(path)}: member b\.txt: not valid UTF-8 text \('utf-8' codec can't decode byte 0xff in position 4"
    with pytest.raises(DataError, match=expected):
        src[1]
    with pytest.raises(DataError, match=expected):
        src.read_batch([0, 1])


def test_json_nested_too_deep(tmp_path):
    path = tar_of(tmp_path / "deep.tar", [("a.json", b"[" * 100_000)])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: member a\.json: not valid JSON"):
        TarSource(path)[0]


# --------------------------------------------------------------------------- index cache
@pytest.fixture
def indexed(tmp_path) -> tuple[str, str, dict, str]:
    """A shard, its index dir, its index, and the cache file holding it."""
    shard = tar_of(tmp_path / "s.tar", [(f"k{i}.{ext}", b"%d" % i) for i in range(5) for ext in ("cls", "txt")])
    index_dir = str(tmp_path / "idx")
    index, how = load_index(shard, index_dir)
    assert how == "built"
    (file,) = glob.glob(os.path.join(index_dir, "*.npz"))
    return shard, index_dir, index, file


def same_index(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and a["fields"] == b["fields"] and np.array_equal(a["offsets"], b["offsets"])
            and np.array_equal(a["sizes"], b["sizes"]))


def test_truncated_or_garbage_cache_is_rebuilt(indexed):
    shard, index_dir, index, file = indexed
    data = Path(file).read_bytes()
    for broken in (data[: len(data) // 2], data[:100], b"", os.urandom(len(data)), npy(np.zeros(3)), b"PK\x03\x04" * 50):
        Path(file).write_bytes(broken)
        got, how = load_index(shard, index_dir)
        assert how == "rebuilt" and same_index(got, index)
        assert load_index(shard, index_dir)[1] == "cached"  # written back whole
    assert os.listdir(index_dir) == [os.path.basename(file)]


def test_cache_cut_anywhere_or_flipped_is_rebuilt_or_still_right(indexed):
    shard, index_dir, index, file = indexed
    data = Path(file).read_bytes()
    rng = np.random.default_rng(0)
    for k in range(0, len(data), 97):
        cut = bytearray(data[:k]) if k % 2 else bytearray(data)
        if k % 2 == 0:
            cut[k] ^= int(rng.integers(1, 256))
        Path(file).write_bytes(cut)
        got, how = load_index(shard, index_dir)
        assert how in ("rebuilt", "cached") and same_index(got, index), k


def _rewrite(file: str, **arrays) -> None:
    with np.load(file) as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    with open(file, "wb") as f:
        np.savez(f, **{k: v for k, v in content.items() if v is not None})


@pytest.mark.parametrize(
    "change",
    [
        {"offsets": np.zeros(3, np.int64)},
        {"offsets": np.zeros((5, 2), np.float64)},
        {"sizes": np.zeros((5, 3), np.int64)},
        {"keys": np.array(["k0", "k1"])},
        {"fields": np.array(["cls"])},
        {"keys": np.arange(5)},
        {"keys": None},
        {"keys": np.array("k0")},
        {"meta": np.array(["not", "json"])},
        {"offsets": np.full((5, 2), 10**9, np.int64)},
        {"sizes": np.full((5, 2), -7, np.int64)},
        {"offsets": np.full((5, 2), 2**62, np.int64), "sizes": np.full((5, 2), 2**62, np.int64)},
    ],
    ids=lambda change: ",".join(change),
)
def test_cache_of_wrong_shapes_or_values_is_rebuilt(indexed, change):
    shard, index_dir, index, file = indexed
    _rewrite(file, **change)
    got, how = load_index(shard, index_dir)
    assert how == "rebuilt" and same_index(got, index)
    assert load_index(shard, index_dir)[1] == "cached"


def test_failed_cache_write_leaves_no_temp_file(indexed, monkeypatch):
    shard, index_dir, index, file = indexed
    before = Path(file).read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.warns(RuntimeWarning, match=r"its index could not be cached in .*No space left on device.*used from memory"):
        got, how = load_index(shard, index_dir, rebuild=True)
    assert how == "rebuilt" and got["keys"] == index["keys"]  # the shard is still read
    assert os.listdir(index_dir) == [os.path.basename(file)] and Path(file).read_bytes() == before
