"""Batch gathers: a field of a whole batch of tar members copied out of memory-mapped shards
with one fancy-indexing call (per byte buffer), never a Python loop over records.

Each gather returns its array and a mask of the rows it could not read (outside the indexed
part of their shard, or bytes that are not what the fast path expects); the caller decodes
those rows one by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._bytes import ByteWindows
from ._decode import NpyLayout

ONE_GATHER = 4096  # .npy members up to this size are read header and data in one gather
_INT_DIGITS = 18  # every decimal of up to 18 digits fits int64


class BatchRows:
    """One batch's rows grouped by byte buffer (``(byte windows, rows)`` each: one group when all
    shards share one mapping), and per row where its shard starts and where its indexed part
    ends in that buffer (arrays, or one number for all)."""

    __slots__ = ("groups", "base", "limits")

    def __init__(self, groups: list[tuple[ByteWindows, Any]], base: np.ndarray | int, limits: np.ndarray | int) -> None:
        self.groups, self.base, self.limits = groups, base, limits


def take(windows: ByteWindows, width: int, offsets: np.ndarray) -> np.ndarray:
    """Rows of ``width`` bytes at ``offsets``; zeros where the buffer is shorter than a row."""
    if len(windows.u8) < width:
        return np.zeros((len(offsets), width), dtype=np.uint8)
    return windows.get(width)[offsets]


def gather_bytes(rows: BatchRows, offsets: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``width`` bytes at each offset (in its row's buffer), as a ``[n, width]`` array, and
    which rows lay inside the indexed part of their shard (the others are zeros)."""
    ok = (offsets >= rows.base) & (offsets + width <= rows.limits)
    good = bool(ok.all())
    if not good:
        offsets = np.where(ok, offsets, 0)
    if len(rows.groups) == 1:
        out = take(rows.groups[0][0], width, offsets)
    else:
        out = np.empty((len(offsets), width), dtype=np.uint8)
        for windows, which in rows.groups:
            out[which] = take(windows, width, offsets[which])
    if not good:
        out[~ok] = 0
    return out, ok


def gather_ints(rows: BatchRows, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Short decimal members (``.cls``) of a batch as int64, and the rows to decode one by one:
    members holding anything but 1 to 18 digits (a sign, whitespace, a longer number)."""
    width = int(min(_INT_DIGITS, max(1, sizes.max())))
    chars, ok = gather_bytes(rows, offsets, width)
    digits = chars - np.uint8(48)  # anything but '0'..'9' wraps past 9
    if (sizes == width).all():  # the usual case: every member has as many digits
        slow = ~ok | (digits > 9).any(axis=1)
        out = digits @ (10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
    else:
        cols = np.arange(width)
        inside = cols < sizes[:, None]
        slow = ~ok | (sizes < 1) | (sizes > _INT_DIGITS) | (inside & (digits > 9)).any(axis=1)
        place = np.where(inside, 10 ** np.clip(sizes[:, None] - 1 - cols, 0, _INT_DIGITS - 1), 0)
        out = (digits * place).sum(axis=1)
    return out, slow


def gather_npy(rows: BatchRows, offsets: np.ndarray, sizes: np.ndarray, lay: NpyLayout) -> tuple[np.ndarray, np.ndarray]:
    """The data of ``.npy`` members laid out as ``lay`` says, as ``[n, *lay.shape]`` in native byte
    order, and which rows hold it: every member's header is compared with ``lay``'s, byte for
    byte; the other rows (another shape, dtype or order) are left for the caller to decode.

    Where ``lay`` spans more than one gather and no row holds it (a layout kept from another
    batch, or a header claiming more than its member holds), nothing is gathered: the array
    has no rows, and never n rows of what the header claims.
    """
    whole = lay.data_offset + lay.nbytes
    if whole <= ONE_GATHER:  # small members: header and data in one gather
        both, ok = gather_bytes(rows, offsets, whole)
        heads, out = both[:, : lay.data_offset], np.ascontiguousarray(both[:, lay.data_offset :])
    else:
        heads, ok = gather_bytes(rows, offsets, lay.data_offset)
    same = ok & (sizes == whole) & (heads.view(lay.header_words.dtype) == lay.header_words).all(axis=1)
    if not lay.dtype.itemsize:  # no bytes to copy (a structured dtype of no fields)
        return np.zeros((len(offsets), *lay.shape), dtype=lay.native), same
    if whole > ONE_GATHER:
        if not same.any():
            return np.empty((0, *lay.shape), dtype=lay.native), same
        out, inside = gather_bytes(rows, np.where(same, offsets + lay.data_offset, -1), lay.nbytes)
        same &= inside
    result = out.view(lay.dtype).reshape((len(offsets), *lay.shape))
    return (result if lay.dtype.isnative else result.astype(lay.native)), same
