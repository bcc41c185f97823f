"""Decoding of one tar member by its extension, as webdataset's default decoders do.

Safe by default: nothing is unpickled unless the caller passes ``allow_pickle=True``.
``.pth`` members are read with ``torch.load(weights_only=True)``, which loads tensors and
plain containers only; torch is imported then, and only then (loaders never need it).
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import math
import pickle
import sys
import warnings
import zlib
from typing import Any

import numpy as np

from ._errors import DataError

PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth")
IMAGE_EXTS = ("jpg", "jpeg", "jpe", "jfif", "png", "apng", "ppm", "pgm", "pbm", "pnm", "bmp", "dib", "webp", "tif",
              "tiff", "gif", "tga", "ico", "jp2", "j2k", "jpx", "psd", "pcx", "sgi")
INT_EXTS = ("cls", "cls2", "index", "inx", "id")
TEXT_EXTS = ("txt", "text", "transcript")
NPY_HEAD = 1 << 16  # most bytes a .npy header may take: every header numpy writes in format 1.0 (np.save pads
# headers to 64 bytes; a few hundred fields of a structured dtype take several KiB)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NPY_KEYS = {"descr", "fortran_order", "shape"}
_NPY_MAX = 1 << 40  # bytes of the largest .npy member read (also bounds a batch of them in int64)


class NpyLayout:
    """A parsed ``.npy`` header: where the data starts and what it holds.

    ``buf`` is the member or its first bytes (at least the header). ``native`` is ``dtype``
    in this machine's byte order: what every array read comes out as. A header that is
    malformed or longer than ``NPY_HEAD``, a negative shape, or an array over 1 TiB is a
    :class:`DataError`.
    """

    __slots__ = ("header", "header_words", "data_offset", "dtype", "native", "shape", "fortran", "nbytes")

    def __init__(self, buf: bytes | memoryview, where: Any) -> None:
        if bytes(buf[:6]) != b"\x93NUMPY":
            raise DataError(f"{where}: not a valid .npy member (no NUMPY magic)")
        major = buf[6] if len(buf) > 6 else 1
        if major == 1:
            hlen, start = int.from_bytes(buf[8:10], "little"), 10
        elif major in (2, 3):
            hlen, start = int.from_bytes(buf[8:12], "little"), 12
        else:
            raise DataError(f"{where}: not a valid .npy member (format version {major})")
        self.data_offset = start + hlen
        if self.data_offset > len(buf):
            limit = f"the {NPY_HEAD}-byte limit" if len(buf) >= NPY_HEAD else f"the member's {len(buf)} bytes"
            raise DataError(f"{where}: not a valid .npy member (a header of {self.data_offset} bytes is longer than {limit})")
        self.header = bytes(buf[: self.data_offset])
        try:
            import ast

            from numpy.lib.format import descr_to_dtype

            text = self.header[start:].decode("utf-8" if major == 3 else "latin1")
            if "\\" in text:  # an invalid escape only warns: make it an error (numpy never writes one)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    d = ast.literal_eval(text)
            else:
                d = ast.literal_eval(text)
            if not isinstance(d, dict) or d.keys() != _NPY_KEYS:
                raise ValueError(f"expected a dict of {sorted(_NPY_KEYS)}, got {str(d)[:80]}")
            self.shape = d["shape"]
            if not isinstance(self.shape, tuple) or not all(type(n) is int and n >= 0 for n in self.shape):
                raise ValueError(f"shape {self.shape!r} is not a tuple of integers >= 0")
            if len(self.shape) > 32:
                raise ValueError(f"{len(self.shape)} dimensions, more than numpy's 32")
            if not isinstance(d["fortran_order"], bool):
                raise ValueError(f"fortran_order {d['fortran_order']!r} is not a bool")
            self.fortran = d["fortran_order"]
            self.dtype = descr_to_dtype(d["descr"])
            if self.dtype.subdtype is not None:  # np.save folds a subarray dtype into the shape
                raise ValueError(f"descr {d['descr']!r} is a subarray dtype")
            if self.dtype.itemsize == 0 and self.dtype.kind in "SU":  # numpy makes them 1 character: no such arrays
                raise ValueError(f"descr {d['descr']!r} is a string of no characters")
        except Exception as e:  # literal_eval and descr_to_dtype raise many kinds on garbage
            raise DataError(f"{where}: not a valid .npy member (bad header: {e})") from None
        if self.dtype.hasobject:
            raise DataError(f"{where}: .npy member holds Python objects (pickled); refusing to load it")
        # Python ints, no overflow; zero-length dimensions count as 1, as numpy's own size check does
        if math.prod(n or 1 for n in self.shape) * max(1, self.dtype.itemsize) > _NPY_MAX:
            raise DataError(f"{where}: not a valid .npy member ({self.dtype} {self.shape} is too large an array)")
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.native = self.dtype.newbyteorder("=")
        # compared with every member's header: as 8-byte words where the length allows (npy pads to 64)
        word = np.uint64 if self.data_offset % 8 == 0 else np.uint8
        self.header_words = np.frombuffer(self.header, dtype=word)

    def array(self, buf, where: Any) -> np.ndarray:
        """The member ``buf`` (header included) as a new C-ordered array in native byte order."""
        if len(buf) != self.data_offset + self.nbytes:
            raise DataError(
                f"{where}: not a valid .npy member: {len(buf)} bytes, header says "
                f"{self.data_offset + self.nbytes} for {self.dtype} {self.shape}"
            )
        if self.dtype.itemsize == 0:  # e.g. a structured dtype of no fields: nothing to read
            return np.zeros(self.shape, dtype=self.native)
        arr = np.frombuffer(buf, dtype=self.dtype, count=self.nbytes // self.dtype.itemsize, offset=self.data_offset)
        arr = arr.reshape(self.shape, order="F" if self.fortran else "C")
        return np.array(arr, dtype=self.native, order="C")  # always a copy: buf is the shard's bytes


def decode_int(data: bytes, where: Any) -> int:
    """An integer member (``.cls``): decimal text whose value fits int64, as batches hold it."""
    try:
        value = int(data)
    except ValueError:
        value = None
    if value is None or not _INT64_MIN <= value <= _INT64_MAX:
        raise DataError(f"{where}: expected an integer that fits int64, got {bytes(data[:40])!r}")
    return value


def decode(ext: str, data: bytes, where: Any, *, allow_pickle: bool = False, image: str | None = None) -> Any:
    """Decode one member by its extension, as webdataset's default decoders do.

    ``where`` names the member in error messages. A ``.gz`` member is decompressed, then
    decoded by the extension before it (once, as webdataset's ``gzfilter``: ``txt.gz`` is
    text). Then by the last extension: ``.npy`` (native byte order, C order), integers
    (``.cls``, must fit int64), text, ``.json``/``.jsn``, ``.npz`` (a dict of arrays),
    msgpack (``.mp``/``.msg``/``.msgpack``), ``.cbor`` (with the cbor2 package), tenbin
    (``.ten``/``.tb``/``.tenbin``: a list of arrays), ``.pth`` (:func:`torch.load` with
    ``weights_only=True`` where torch is installed: tensors and containers of them, never
    arbitrary objects), images (see :data:`IMAGE_SPECS` for ``image``). Pickles
    (``.pyd``/``.pickle``/``.pkl``, and ``.pth`` without torch or beyond what
    ``weights_only`` loads) need ``allow_pickle=True``. Other extensions stay bytes.
    """
    if ext == "gz" or ext.endswith(".gz"):
        data, ext = gunzip(data, where), ext[:-3]
    last = ext.rsplit(".", 1)[-1]
    if last == "npy":
        return NpyLayout(data, where).array(data, where)
    if last in INT_EXTS:
        return decode_int(data, where)
    if last in TEXT_EXTS:
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 text ({e})") from None
    if last in IMAGE_EXTS:
        return decode_image(data, where, image)
    fn = _DECODERS.get(last)
    if fn is not None:
        return fn(data, where, allow_pickle)
    return bytes(data)


MEMBER_LIMIT = 1 << 31  # bytes a .gz or .npz member may expand to: a decompression bomb is an error, not an OOM


def gunzip(data: bytes, where: Any, limit: int | None = None) -> bytes:
    """A ``.gz`` member's decompressed bytes (at most ``limit``, default :data:`MEMBER_LIMIT`)."""
    limit = MEMBER_LIMIT if limit is None else limit
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{where}: not valid gzip data ({e})") from None
    if len(out) > limit:
        raise DataError(f"{where}: decompresses to more than {limit} bytes; refusing it "
                        "(read such members with decode=False)")
    return out


def _json(data: bytes, where: Any, allow_pickle: bool) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep
        raise DataError(f"{where}: not valid JSON ({e})") from None


def _npz(data: bytes, where: Any, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A ``.npz`` member as ``{name: array}``; object arrays only with ``allow_pickle``."""
    if bytes(data[:4]) not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would try anything else as a pickle
        raise DataError(f"{where}: not a readable .npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=allow_pickle) as z:
            expands = sum(info.file_size for info in z.zip.infolist())
            if expands > MEMBER_LIMIT:
                raise DataError(f"{where}: a .npz whose arrays take {expands} bytes, more than {MEMBER_LIMIT}; refusing it "
                                "(read such members with decode=False)")
            return {name: z[name] for name in z.files}
    except DataError:
        raise
    except Exception as e:  # zipfile, zlib and numpy's format reader raise many kinds
        raise DataError(f"{where}: not a readable .npz ({e})") from None


def _optional(module: str, exts: str, where: Any) -> Any:
    """``module`` imported, or a DataError saying that decoding ``exts`` members needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{where}: decoding {exts} needs the {module} package (pip install {module}); or read the bytes "
            "with decode=False, or pass decoders={extension: fn}"
        ) from None


def _msgpack(data: bytes, where: Any, allow_pickle: bool) -> Any:
    msgpack = _optional("msgpack", ".mp/.msg/.msgpack", where)
    try:
        return msgpack.unpackb(bytes(data))
    except Exception as e:  # ExtraData, FormatError, StackError, ValueError ...
        raise DataError(f"{where}: not valid msgpack ({e})") from None


def _cbor(data: bytes, where: Any, allow_pickle: bool) -> Any:
    cbor2 = _optional("cbor2", ".cbor", where)
    try:
        return cbor2.loads(bytes(data))
    except Exception as e:  # CBORDecodeError and what its tag decoders raise
        raise DataError(f"{where}: not valid CBOR ({e})") from None


_TEN_MAGIC = b"~TenBin~"
_TEN_DTYPES = {code: np.dtype(code) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")}


def decode_tenbin(data: bytes, where: Any, allow_pickle: bool = False) -> list[np.ndarray]:
    """A tenbin member (webdataset's ``.ten``) as a list of arrays, read by hand (never a pickle).

    The format: chunks of ``~TenBin~``, a native int64 length and that many bytes padded to
    64; an array is a header chunk (int64 words: dtype code, info, ndim, dims) followed by
    its data chunk. Every length, code and shape is checked against the member.
    """
    buf = memoryview(bytes(data))
    total, pos, chunks = len(buf), 0, []

    def bad(why: str) -> DataError:
        return DataError(f"{where}: not valid tenbin data ({why})")

    while pos < total:
        if buf[pos : pos + 8] != _TEN_MAGIC:
            raise bad(f"no ~TenBin~ magic at byte {pos}")
        if pos + 16 > total:
            raise bad(f"chunk at byte {pos} is cut short")
        n = int.from_bytes(buf[pos + 8 : pos + 16], sys.byteorder, signed=True)
        if not 0 <= n <= total - pos - 16:
            raise bad(f"chunk at byte {pos} claims {n} bytes, {total - pos - 16} follow")
        chunks.append(buf[pos + 16 : pos + 16 + n])
        pos += 16 + -(-n // 64) * 64
    if len(chunks) % 2:
        raise bad("a header chunk without its data chunk")
    arrays = []
    for header, body in zip(chunks[::2], chunks[1::2], strict=True):
        if len(header) < 24 or len(header) % 8:
            raise bad(f"an array header of {len(header)} bytes")
        words = np.frombuffer(header, dtype=np.int64)
        code = words[0].tobytes().rstrip(b"\0").decode("ascii", "replace")
        dtype, ndim = _TEN_DTYPES.get(code), int(words[2])
        if dtype is None:
            raise bad(f"dtype code {code!r}, expected one of {sorted(_TEN_DTYPES)}")
        if not 0 <= ndim <= min(32, len(words) - 3):
            raise bad(f"{ndim} dimensions in a header of {len(words)} words")
        shape = tuple(int(d) for d in words[3 : 3 + ndim])
        count = math.prod(shape)
        if min(shape, default=0) < 0 or count * dtype.itemsize > len(body):
            raise bad(f"a {dtype} array of shape {shape} in a data chunk of {len(body)} bytes")
        arrays.append(np.frombuffer(body, dtype=dtype, count=count).reshape(shape).copy())
    return arrays


def _pth(data: bytes, where: Any, allow_pickle: bool) -> Any:
    """``torch.load``: ``weights_only=True`` (tensors and plain containers) unless ``allow_pickle``."""
    try:
        import torch
    except ImportError:
        if allow_pickle:
            raise DataError(f"{where}: decoding .pth needs torch, which is not installed") from None
        return _pickle(data, where, allow_pickle)
    try:
        return torch.load(io.BytesIO(data), weights_only=not allow_pickle, map_location="cpu")
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise DataError(f"{where}: not a readable .pth ({e})") from None
        why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), str(e)[:200])
        raise DataError(
            f"{where}: torch.load(weights_only=True) refused it ({why}); pass allow_pickle=True only for data you trust"
        ) from None
    except Exception as e:  # a torn zip, a wrong magic number ...
        raise DataError(f"{where}: not a readable .pth ({e})") from None


def _pickle(data: bytes, where: Any, allow_pickle: bool) -> Any:
    if not allow_pickle:
        raise DataError(
            f"{where}: is a pickle; refusing to unpickle shard contents "
            "(pass allow_pickle=True only for data you trust)"
        )
    return pickle.loads(data)


_DECODERS = {
    "json": _json, "jsn": _json,
    "npz": _npz,
    "mp": _msgpack, "msg": _msgpack, "msgpack": _msgpack,
    "cbor": _cbor,
    "ten": decode_tenbin, "tb": decode_tenbin, "tenbin": decode_tenbin,
    "pth": _pth,
    **{ext: _pickle for ext in PICKLE_EXTS if ext != "pth"},
}

# webdataset's image specs that give numpy arrays or PIL images: spec -> (element type, PIL mode)
IMAGE_SPECS = {
    "l8": ("uint8", "L"), "rgb8": ("uint8", "RGB"), "rgba8": ("uint8", "RGBA"),
    "l": ("float", "L"), "rgb": ("float", "RGB"), "rgba": ("float", "RGBA"),
    "pill": ("pil", "L"), "pil": ("pil", "RGB"), "pilrgb": ("pil", "RGB"), "pilrgba": ("pil", "RGBA"),
}


def check_image_spec(image: str | None) -> str | None:
    """``image`` if it is None or one of :data:`IMAGE_SPECS`, else a ValueError listing them."""
    if image is None or image in IMAGE_SPECS:
        return image
    if isinstance(image, str) and image.lower().startswith("torch"):
        raise ValueError(
            f"image={image!r}: torch specs are not read here (loaders give numpy); use "
            f"image={image[5:].lower() or 'rgb'!r} and the torch adapter (tensors, channels last)"
        )
    raise ValueError(f"image={image!r}: not an image spec; one of {list(IMAGE_SPECS)} or None (as stored)")


def decode_image(data: bytes, where: Any, image: str | None = None) -> Any:
    """An image member, decoded by PIL.

    ``image=None``: as stored (``L`` gives ``[H, W]``, ``RGB`` ``[H, W, 3]``, ``RGBA``
    ``[H, W, 4]``, 16-bit grayscale uint16 ...), except that palette images are expanded to
    RGB (RGBA where they have transparency): palette indices mean nothing without the palette.
    Otherwise one of webdataset's specs (:data:`IMAGE_SPECS`), converted as webdataset's
    ``ImageHandler`` does: ``"rgb8"`` gives ``uint8 [H, W, 3]`` from any mode (palette, CMYK,
    grayscale, RGBA), ``"l8"`` ``uint8 [H, W]``, ``"rgba8"`` ``[H, W, 4]``; ``"rgb"``, ``"l"``,
    ``"rgba"`` the same as float32 in ``[0, 1]``; ``"pil"``/``"pilrgb"``/``"pilrgba"``/``"pill"``
    PIL images. Without Pillow the bytes are returned.
    """
    try:
        from PIL import Image
    except ImportError:
        return bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if image is None:
                if im.mode in ("P", "PA"):
                    rgba = im.mode == "PA" or "transparency" in im.info
                    return np.asarray(im.convert("RGBA" if rgba else "RGB"))
                return np.asarray(im)
            kind, mode = IMAGE_SPECS[image]
            converted = im.convert(mode)
    except Exception as e:
        raise DataError(f"{where}: not a readable image ({e})") from None
    if kind == "pil":
        return converted
    arr = np.asarray(converted)
    return arr.astype(np.float32) / 255.0 if kind == "float" else arr
