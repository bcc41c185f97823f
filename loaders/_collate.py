"""Collate functions: a list of records (dicts) into one batch dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._errors import DataError


def stack_field(values: list[Any], name: str, where: Callable[[int], str] | None = None, hint: str = "") -> Any:
    """One field of a batch: numbers and equal-shaped arrays stack into an array, strings form
    a string array, anything else stays a list. ``where(k)`` names record ``k`` in errors,
    ``hint`` (``"; ..."``) ends their advice."""
    first = values[0] if values else None
    if isinstance(first, bool | int | float | np.number):
        return np.asarray(values)
    if isinstance(first, str):
        return np.asarray(values, dtype=str)
    if isinstance(first, np.ndarray):
        for k, v in enumerate(values):
            if not isinstance(v, np.ndarray) or v.shape != first.shape or v.dtype != first.dtype:
                got = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
                raise DataError(
                    f"{where(k) if where else f'record {k} of {name!r}'}: holds {got}, but the batch's first record "
                    f"holds {first.dtype} {first.shape}; cannot stack (use read_records or a collate function{hint})"
                )
        return np.stack(values)
    return values


def stack_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate records into a batch: numbers and equal-shaped arrays stack, strings form a
    string array, anything else a list (the default collate of :class:`loaders.Loader`)."""
    if not records:
        return {}
    return {k: stack_field([r[k] for r in records], k) for k in records[0]}


def list_records(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Collate records keeping each key as a list (for ragged fields)."""
    return {k: [r[k] for r in records] for k in records[0]} if records else {}
