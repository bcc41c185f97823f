"""AXOL1TL's data preparation, as array functions: saturation, normalization, fixed-point quantization.

Each is a pure numpy function of its inputs, so a preparation is repeatable and its
constants (maxima, offsets, scales, bit widths) can be stored next to the model that
was trained on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def saturate(x: np.ndarray, maxima: np.ndarray | float, *, flag: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Clip each feature to ``[-max, max]`` (``maxima``: one per feature, or one for all).

    With ``flag``, also returns a boolean array of x's shape: True where a value was at
    or beyond its maximum (the detector saturated there).
    """
    x = np.asarray(x)
    m = np.broadcast_to(np.asarray(maxima, dtype=x.dtype if x.dtype.kind == "f" else np.float64), x.shape[-1:])
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError(f"saturation maxima must be finite and positive, got {np.asarray(maxima).tolist()}")
    out = np.clip(x, -m, m)
    return (out, np.abs(x) >= m) if flag else out


def fit_normalization(train: np.ndarray, kind: str = "standard") -> dict[str, Any]:
    """Per-feature ``offset`` and ``scale`` from the training split only.

    ``standard``: mean and standard deviation; ``robust``: median and interquartile
    range (robust to the long tails of momentum spectra). A feature that does not vary
    gets scale 1 (it normalizes to 0, not to NaN).
    """
    x = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    if len(x) == 0:
        raise ValueError("no training events to fit the normalization on")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"training data holds {int(bad.sum())} NaN or infinite value(s) (first: event {row}, feature {col})")
    if kind == "standard":
        offset, scale = x.mean(axis=0), x.std(axis=0)
    elif kind == "robust":
        q1, med, q3 = np.percentile(x, [25, 50, 75], axis=0)
        offset, scale = med, q3 - q1
    else:
        raise ValueError(f"unknown normalization {kind!r} (known: standard, robust)")
    scale = np.where(scale > 0, scale, 1.0)
    return {"kind": kind, "offset": offset, "scale": scale}


def normalize(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """``(x - offset) / scale`` with the constants of :func:`fit_normalization`, as float32."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if flat.shape[1] != len(stats["offset"]):
        raise ValueError(f"data has {flat.shape[1]} features, the normalization {len(stats['offset'])}")
    return ((flat - stats["offset"]) / stats["scale"]).astype(np.float32).reshape(np.shape(x))


def quantize(x: np.ndarray, total_bits: int, integer_bits: int, *, signed: bool = True) -> np.ndarray:
    """Round to the fixed-point grid ``<total_bits, integer_bits>`` and saturate, as firmware stores values.

    The grid step is ``2 ** -(total_bits - integer_bits)``; values round to the nearest
    step (halves to even) and clip to ``[-2 ** (integer_bits - 1), 2 ** (integer_bits - 1) - step]``
    (signed, the sign counted in ``integer_bits``) or ``[0, 2 ** integer_bits - step]``.
    In HLS terms: ``ap_fixed<total, integer, AP_RND_CONV, AP_SAT>``.
    """
    if not 0 < total_bits <= 32 or integer_bits > total_bits:
        raise ValueError(f"fixed-point <{total_bits}, {integer_bits}> needs 0 < total bits <= 32 and integer bits <= total")
    step = 2.0 ** -(total_bits - integer_bits)
    if signed:
        lo, hi = -(2.0 ** (integer_bits - 1)), 2.0 ** (integer_bits - 1) - step
    else:
        lo, hi = 0.0, 2.0 ** integer_bits - step
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.round(x / step) * step, lo, hi).astype(np.float32)
