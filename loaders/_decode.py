"""Decoding of one tar member by its extension, as webdataset's default decoders do."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from ._errors import DataError

PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth")
IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff", "gif")
INT_EXTS = ("cls", "cls2", "index", "inx", "id")
TEXT_EXTS = ("txt", "text", "transcript")
NPY_HEAD = 4096  # bytes read to parse a .npy header (numpy writes them padded to 64 bytes, rarely past 200)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class NpyLayout:
    """A parsed ``.npy`` header: where the data starts and what it holds.

    ``native`` is ``dtype`` in this machine's byte order: what every array read comes out as.
    """

    __slots__ = ("header", "header_words", "data_offset", "dtype", "native", "shape", "fortran", "nbytes")

    def __init__(self, buf: bytes | memoryview, where: Any) -> None:
        buf = bytes(buf)
        if buf[:6] != b"\x93NUMPY":
            raise DataError(f"{where}: not a valid .npy member (no NUMPY magic)")
        major = buf[6]
        if major == 1:
            hlen, start = int.from_bytes(buf[8:10], "little"), 10
        elif major in (2, 3):
            hlen, start = int.from_bytes(buf[8:12], "little"), 12
        else:
            raise DataError(f"{where}: not a valid .npy member (format version {major})")
        try:
            import ast

            from numpy.lib.format import descr_to_dtype

            d = ast.literal_eval(buf[start : start + hlen].decode("latin1"))
            self.dtype = descr_to_dtype(d["descr"])
            self.shape = tuple(d["shape"])
            self.fortran = bool(d["fortran_order"])
        except Exception as e:
            raise DataError(f"{where}: not a valid .npy member (bad header: {e})") from None
        if self.dtype.hasobject:
            raise DataError(f"{where}: .npy member holds Python objects (pickled); refusing to load it")
        self.native = self.dtype.newbyteorder("=")
        self.data_offset = start + hlen
        self.header = buf[: self.data_offset]
        # compared with every member's header: as 8-byte words where the length allows (npy pads to 64)
        word = np.uint64 if self.data_offset % 8 == 0 else np.uint8
        self.header_words = np.frombuffer(self.header, dtype=word)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def array(self, buf, where: Any) -> np.ndarray:
        """The member ``buf`` (header included) as a new C-ordered array in native byte order."""
        if len(buf) != self.data_offset + self.nbytes:
            raise DataError(
                f"{where}: not a valid .npy member: {len(buf)} bytes, header says "
                f"{self.data_offset + self.nbytes} for {self.dtype} {self.shape}"
            )
        arr = np.frombuffer(buf, dtype=self.dtype, count=self.nbytes // max(1, self.dtype.itemsize),
                            offset=self.data_offset)
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
        return NpyLayout(data[:NPY_HEAD], where).array(data, where)
    if last in INT_EXTS:
        return decode_int(data, where)
    if last in TEXT_EXTS:
        return bytes(data).decode("utf-8")
    if last == "json":
        try:
            return json.loads(bytes(data))
        except ValueError as e:
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
