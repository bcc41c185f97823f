"""Decoding of one tar member by its extension, as webdataset's default decoders do."""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import numpy as np

from ._errors import DataError

PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth")
IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff", "gif")
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


def decode(ext: str, data: bytes, where: Any, *, allow_pickle: bool = False) -> Any:
    """Decode one member by its last extension, as webdataset's default decoders do.

    ``where`` names the member in error messages. ``.npy`` arrays come out in native byte
    order and C order; integers must fit int64.
    """
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
    if last == "json":
        try:
            return json.loads(bytes(data))
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep
            raise DataError(f"{where}: not valid JSON ({e})") from None
    if last in PICKLE_EXTS:
        if not allow_pickle:
            raise DataError(
                f"{where}: is a pickle; refusing to unpickle shard contents "
                "(pass allow_pickle=True only for data you trust)"
            )
        if last == "pth":
            import torch

            return torch.load(io.BytesIO(data), weights_only=False)
        import pickle

        return pickle.loads(data)
    if last in IMAGE_EXTS:
        try:
            from PIL import Image
        except ImportError:
            return bytes(data)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im)
        except Exception as e:
            raise DataError(f"{where}: not a readable image ({e})") from None
    return bytes(data)
