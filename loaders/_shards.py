"""Turning a shard list (list, glob, brace pattern, ATEK YAML list) into file paths."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

from ._errors import DataError

_BRACE = re.compile(r"\{([^{}]*)\}")


def braceexpand(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` alternatives."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [x for item in items for x in braceexpand(head + item + tail)]


def _from_yaml(path: str) -> list[str]:
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    tars = doc.get("tars") if isinstance(doc, dict) else doc
    if isinstance(tars, dict):  # ATEK: {"tars": {sequence: [paths]}}
        entries = [p for seq in tars.values() for p in (seq or [])]
    elif isinstance(tars, list):
        entries = tars
    else:
        raise DataError(f"{path}: expected a 'tars' mapping of sequence -> [tar paths] (ATEK) or a list of paths")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for p in entries:
        p = os.path.expanduser(str(p))
        if not os.path.isabs(p):
            beside = os.path.join(base, p)
            p = beside if os.path.exists(beside) or not os.path.exists(p) else p
        out.append(p)
    return out


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Every tar path named by ``shards``, in order; missing files are an error.

    Accepts a path, a list of paths, a glob (``data/*.tar``, sorted), a brace pattern
    (``train-{000000..000009}.tar``), or a YAML shard list (``local_train_tars.yaml``
    as ATEK's downloader writes it: ``{"tars": {sequence: [paths]}}``; relative paths
    are taken from the YAML file's folder).
    """
    specs = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    out: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.endswith((".yaml", ".yml")):
            if not os.path.exists(spec):
                raise DataError(f"{spec}: no such shard list")
            paths = _from_yaml(spec)
            origin = spec
        else:
            paths, origin = [], None
            for p in braceexpand(spec):
                matched = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
                if not matched:
                    raise DataError(f"{p}: the pattern matches no file")
                paths.extend(matched)
        for p in paths:
            if not os.path.isfile(p):
                where = f" (listed in {origin})" if origin else ""
                raise DataError(f"{p}: shard not found{where}")
        out.extend(paths)
    if not out:
        raise DataError(f"no shards in {shards!r}")
    return out
