"""Turning a shard list (list, glob, brace pattern, URLs, ATEK YAML list) into file paths and URLs,
and the checksums known for them (YAML lists, manifests)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import Any

from ._errors import DataError
from ._remote import _local, is_remote

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


def _from_yaml(path: str) -> tuple[list[str], dict[str, dict]]:
    """The shards an ATEK YAML list names, and the checks it carries (a ``checks`` mapping of
    ``{url: {"sha1"/"sha256"/"size": ...}}``, as ``python -m loaders.datastore`` writes)."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not a valid YAML shard list ({e})") from None
    tars = doc.get("tars") if isinstance(doc, dict) else doc
    if isinstance(tars, dict):  # ATEK: {"tars": {sequence: [paths]}}
        entries = [p for seq in tars.values() for p in (seq or [])]
    elif isinstance(tars, list):
        entries = tars
    else:
        raise DataError(f"{path}: expected a 'tars' mapping of sequence -> [tar paths] (ATEK) or a list of paths")
    checks = doc.get("checks") if isinstance(doc, dict) else None
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for p in entries:
        p = str(p)
        if not is_remote(p):
            p = os.path.expanduser(_local(p))
            if not os.path.isabs(p):  # beside the list, as ATEK reads it; never the working directory's
                p = os.path.join(base, p)
        out.append(p)
    return out, _clean_checks(checks or {}, path)


def _clean_checks(checks: Any, origin: str) -> dict[str, dict]:
    """``{name: {"size": int, "sha1": hex, "sha256": hex}}``, checked for shape."""
    if not isinstance(checks, dict):
        raise DataError(f"{origin}: 'checks' must map shard names to {{sha1/sha256/size: ...}}")
    out = {}
    for name, c in checks.items():
        if not isinstance(c, dict):
            raise DataError(f"{origin}: the checks of {name} must be a mapping of sha1/sha256/size, got {c!r}")
        entry = {}
        for algo, length in (("sha1", 40), ("sha256", 64)):
            v = c.get(algo)
            if v is not None:
                if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", str(v)):
                    raise DataError(f"{origin}: {algo} of {name} is {v!r}, expected {length} hex digits")
                entry[algo] = str(v).lower()
        size = c.get("size", c.get("file_size_bytes"))
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise DataError(f"{origin}: size of {name} is {size!r}, expected a number of bytes >= 0")
            entry["size"] = size
        out[str(name)] = entry
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """Checksums of shards from a manifest file: ``sha256sum`` output (``<hex>  <name>`` lines,
    sha1 or sha256 told apart by length), or JSON / YAML ``{name: {"sha256": ..., "size": ...}}``.

    A name is a shard's URL or path as given, or its end (``seq1/shards-0000.tar``
    matches ``https://host/data/seq1/shards-0000.tar``).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror})") from None
    if text.lstrip().startswith("{") or path.endswith((".json", ".yaml", ".yml")):
        import yaml

        try:
            doc = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not a valid JSON/YAML manifest ({e})") from None
        return _clean_checks(doc.get("checks", doc) if isinstance(doc, dict) else doc, path)
    out: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"\s*([0-9a-fA-F]{40}|[0-9a-fA-F]{64})\s+\*?(.+?)\s*", line)
        if m is None:
            raise DataError(f"{path}: line {n} is not '<sha256 or sha1 hex>  <shard name>': {line[:80]!r}")
        algo = "sha1" if len(m.group(1)) == 40 else "sha256"
        out.setdefault(m.group(2), {})[algo] = m.group(1).lower()
    return out


def match_checks(paths: Sequence[str], checks: dict[str, dict], origin: str = "manifest") -> dict[str, dict]:
    """``checks`` keyed by the shard each entry names: the same string, or its end at a ``/``
    (a URL's query, such as a signed URL's token, left out)."""
    out: dict[str, dict] = {}
    exact = set(paths)
    bare = {p: p.split("?", 1)[0] if is_remote(p) else p for p in paths}
    for name, c in checks.items():
        if name in exact:
            hits = [name]
        else:
            tail = "/" + name.lstrip("/")
            hits = [p for p in paths if bare[p].endswith(tail) or bare[p] == name]
        if len(hits) > 1:
            raise DataError(f"{origin}: entry {name!r} matches {len(hits)} shards ({hits[0]}, {hits[1]}, ...); "
                            "write a longer part of their paths")
        for p in hits:
            out.setdefault(p, {}).update(c)
    return out


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Every tar path or URL named by ``shards``, in order; missing local files are an error.

    Accepts a path, a list of paths, a glob (``data/*.tar``, sorted), a brace pattern
    (``train-{000000..000009}.tar``), URLs (``https://``, ``s3://``, ...: braces are
    expanded, nothing else), ``.tar.gz`` / ``.tgz`` files, or a YAML shard list
    (``local_train_tars.yaml`` / ``streamable_train_tars.yaml`` as ATEK's downloader
    writes it: ``{"tars": {sequence: [paths or URLs]}}``; relative paths are taken from
    the YAML file's folder).
    """
    return resolve_shards(shards)[0]


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike],
                   manifest: str | os.PathLike | dict | None = None) -> tuple[list[str], dict[str, dict]]:
    """:func:`expand_shards`, and the checks known for each shard (from YAML lists that carry
    them and from ``manifest``: a file for :func:`read_manifest`, or such a mapping)."""
    specs = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    out: list[str] = []
    checks: dict[str, dict] = {}
    for spec in specs:
        spec = os.fspath(spec)
        if is_remote(spec):
            out.extend(braceexpand(spec))
            continue
        spec = _local(spec)
        if spec.endswith((".yaml", ".yml")):
            if not os.path.exists(spec):
                raise DataError(f"{spec}: no such shard list")
            paths, found = _from_yaml(spec)
            checks.update(match_checks(paths, found, spec))
            origin = spec
        else:
            paths, origin = [], None
            for p in braceexpand(spec):
                matched = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
                if not matched:
                    raise DataError(f"{p}: the pattern matches no file")
                paths.extend(matched)
        for p in paths:
            if not is_remote(p) and not os.path.isfile(p):
                where = f" (listed in {origin})" if origin else ""
                raise DataError(f"{p}: shard not found{where}")
        out.extend(paths)
    if not out:
        raise DataError(f"no shards in {shards!r}")
    if manifest is not None:
        given = manifest if isinstance(manifest, dict) else read_manifest(manifest)
        origin = "manifest" if isinstance(manifest, dict) else os.fspath(manifest)
        for p, c in match_checks(out, _clean_checks(given, origin), origin).items():
            checks.setdefault(p, {}).update(c)
    return out, checks
