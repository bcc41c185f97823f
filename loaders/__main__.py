"""``python -m loaders inspect PATH...`` and ``python -m loaders index SHARDS...``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ._errors import DataError
from ._progress import progress
from ._shards import expand_shards
from ._tar import TarSource
from ._tar_format import default_index_dir, load_index, scan_tar

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head == _HDF5_MAGIC or path.endswith((".h5", ".hdf5", ".he5"))


def _describe_value(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype} {list(v.shape)}"
    return type(v).__name__


def inspect_hdf5(path: str) -> None:
    import h5py

    from ._h5 import _open

    with _open(path) as f:
        print(f"{path}: hdf5")
        rows = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                comp = obj.compression or "none"
                shape = None if obj.shape is None else list(obj.shape)  # None: NULL dataspace (h5py.Empty)
                rows.append((name, str(obj.dtype), shape, obj.chunks, comp))

        f.visititems(visit)
        for name, dtype, shape, chunks, comp in rows:
            records = shape[0] if shape else "-"
            print(f"  {name:<24} {dtype:<10} shape={shape} records={records} chunks={chunks} compression={comp}")


def inspect_tar(spec: str, index_dir: str | None, allow_pickle: bool) -> None:
    src = TarSource(spec, index_dir=index_dir, progress=True, allow_pickle=allow_pickle)
    print(f"{spec}: webdataset tar, {len(src.shards)} shard(s), {len(src)} records")
    first = src[0]
    for field in src.fields:
        print(f"  {field:<24} {_describe_value(first[field])} (first record {src.sample_key(0)!r})")


def cmd_inspect(args: argparse.Namespace) -> int:
    status = 0
    for path in args.paths:
        try:
            if _is_hdf5(path):
                inspect_hdf5(path)
            else:
                inspect_tar(path, args.index_dir, args.allow_pickle)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


def cmd_index(args: argparse.Namespace) -> int:
    try:
        shards = expand_shards(args.shards)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = {"cached": 0, "built": 0, "rebuilt": 0}
    records, bad = 0, 0
    bar = progress(len(shards), "indexing", True, unit="shard")
    for path in shards:
        try:
            index, how = load_index(path, args.index_dir, rebuild=args.rebuild)
            if args.verify and how == "cached":
                fresh = scan_tar(path)
                same = fresh["keys"] == index["keys"] and np.array_equal(fresh["offsets"], index["offsets"])
                if not same:
                    index, how = load_index(path, args.index_dir, rebuild=True)
                    how = "rebuilt"
                    print(f"{path}: cached index did not match the shard; rebuilt", file=sys.stderr)
        except DataError as e:
            bar.update(1)
            print(f"error: {e}", file=sys.stderr)
            bad += 1
            continue
        counts[how] += 1
        records += len(index["keys"])
        bar.update(1)
        if args.verbose:
            print(f"{path}: {len(index['keys'])} samples, fields {index['fields']} ({how})")
    bar.close()
    print(
        f"{len(shards)} shard(s), {records} samples: {counts['cached']} index(es) cached and valid, "
        f"{counts['built']} built, {counts['rebuilt']} rebuilt (stale or forced), {bad} with errors; "
        f"indexes in {args.index_dir or default_index_dir()}"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loaders", description="Inspect and index Tandem data files.")
    parser.add_argument("--index-dir", default=None, help="where tar indexes are cached")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="kind, keys, dtypes, shapes and record count of tar shards or HDF5 files")
    p.add_argument("paths", nargs="+", help="HDF5 files, tar shards, globs, brace patterns or YAML shard lists")
    p.add_argument("--allow-pickle", action="store_true", help="decode pickle members (trusted data only)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("index", help="build or verify the member indexes of tar shards")
    p.add_argument("shards", nargs="+", help="tar shards, globs, brace patterns or YAML shard lists")
    p.add_argument("--rebuild", action="store_true", help="rebuild every index")
    p.add_argument("--verify", action="store_true", help="re-walk each shard and compare with its cached index")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per shard")
    p.set_defaults(func=cmd_index)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
