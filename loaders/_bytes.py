"""Byte windows over a memory map: ``windows.get(w)[o]`` is bytes ``o .. o + w`` as one row.

Fancy-indexing such a window with many offsets copies many byte ranges in one numpy
call: how the HDF5 direct path and the tar gathers read a whole batch at once.
"""

from __future__ import annotations

import numpy as np


class ByteWindows:
    """Read-only ``[n, width]`` windows over a ``uint8`` buffer, built once per width."""

    __slots__ = ("u8", "_windows")

    def __init__(self, buffer) -> None:
        self.u8 = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        self._windows: dict[int, np.ndarray] = {}

    def get(self, width: int) -> np.ndarray:
        win = self._windows.get(width)
        if win is None:
            rows = max(0, len(self.u8) - width + 1)
            win = np.lib.stride_tricks.as_strided(self.u8, shape=(rows, width), strides=(1, 1))
            win.flags.writeable = False
            self._windows[width] = win
        return win
