"""ATEK's data store downloader: ``python -m loaders.datastore``.

Reads ATEK's URL JSON (``atek_data_for_all_configs -> CONFIG -> wds_file_urls ->
SEQUENCE -> "shards-0000_tar" -> {download_url, sha1sum, file_size_bytes, ...}``),
picks sequences as ATEK's ``atek_wds_data_downloader.py`` does (sorted, shuffled by
``--random-seed``, the first ``--max-num-sequences`` kept, split by
``--train-val-split-ratio`` or by ``--train-val-split-json-path``), and writes:

- with ``--download-wds-to-local``: ``OUTPUT/SEQUENCE/shards-0000.tar`` and
  ``local_{train,validation,all}_tars.yaml`` (``{"tars": {SEQUENCE: [relative paths]}}``);
- without it: ``streamable_{train,validation,all}_tars.yaml`` with the URLs (and a
  ``checks`` mapping of their sha1 and size, which ATEK's readers ignore), which
  :class:`loaders.TarSource` reads through its shard cache.

Downloads go through a temporary ``.part`` file, are checked against the size and sha1
of the JSON, and are retried with backoff; a rerun with the same arguments skips the
files that verify and resumes partial ones. A byte progress bar runs while downloading; a
summary lists the failures, and the exit status is 1 if any shard failed.

Example::

    python -m loaders.datastore --config-name cubercnn \\
        --input-json-path AriaDigitalTwin_ATEK_download_urls.json \\
        --output-folder-path data/adt --max-num-sequences 10 --download-wds-to-local
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ._errors import DataError
from ._remote import ShardCache, _digest, is_remote

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # a name that may become one path component
SPLITS = ("train", "validation", "all")


@dataclass(frozen=True)
class Shard:
    """One shard of the URL JSON: its sequence, file name, URL and the checks given."""

    sequence: str
    name: str  # shards-0000.tar
    url: str
    sha1: str | None
    size: int | None

    @property
    def relative(self) -> str:
        """Its path under the output folder: ``SEQUENCE/shards-0000.tar``."""
        return f"{self.sequence}/{self.name}"


@dataclass
class Summary:
    """What a run did: shards downloaded, found already complete, and failed (with why)."""

    downloaded: list[Shard] = field(default_factory=list)
    verified: list[Shard] = field(default_factory=list)
    failed: list[tuple[Shard, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # the YAML lists

    @property
    def ok(self) -> bool:
        return not self.failed


def read_url_json(path: str, config_name: str) -> dict[str, list[Shard]]:
    """``{sequence: [Shard, ...]}`` of config ``config_name`` in ATEK's URL JSON ``path``.

    Sequence names and shard names become file names: anything but letters, digits and
    ``._-`` (a ``/``, a leading dot) is a :class:`DataError`, as are missing URLs and
    malformed checksums or sizes.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read the URL JSON ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    configs = doc.get("atek_data_for_all_configs") if isinstance(doc, dict) else None
    if not isinstance(configs, dict):
        raise DataError(f"{path}: expected an 'atek_data_for_all_configs' mapping (ATEK's URL JSON)")
    if config_name not in configs:
        raise DataError(f"{path}: no config {config_name!r}; the file has {sorted(configs)}")
    seqs = (configs[config_name] or {}).get("wds_file_urls")
    if not isinstance(seqs, dict):
        raise DataError(f"{path}: config {config_name!r} has no 'wds_file_urls' mapping of sequence -> shards")
    out: dict[str, list[Shard]] = {}
    for seq, shards in seqs.items():
        where = f"{path}: {config_name}/{seq}"
        if not _SAFE.match(str(seq)):
            raise DataError(f"{where}: the sequence name is not a safe folder name (letters, digits, '._-'; "
                            "not starting with a dot)")
        if not isinstance(shards, dict):
            raise DataError(f"{where}: expected a mapping of shard name -> {{download_url, sha1sum, ...}}")
        out[seq] = []
        keys: dict[str, str] = {}  # file name -> the key that names it
        for key, info in shards.items():
            name = key[: -len("_tar")] + ".tar" if key.endswith("_tar") else key  # shards-0000_tar -> shards-0000.tar
            if not _SAFE.match(name) or name in (".", ".."):
                raise DataError(f"{where}/{key}: the shard name is not a safe file name")
            if name in keys:
                raise DataError(f"{where}: {keys[name]!r} and {key!r} both name the file {name}")
            keys[name] = key
            if not isinstance(info, dict) or not isinstance(info.get("download_url"), str):
                raise DataError(f"{where}/{key}: no download_url")
            if not is_remote(info["download_url"]):  # a local path here would copy local files into the output
                raise DataError(f"{where}/{key}: download_url {info['download_url']!r} is not a URL to download "
                                "(http://, https://, s3://, ...)")
            sha1, size = info.get("sha1sum"), info.get("file_size_bytes")
            if sha1 is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", str(sha1)):
                raise DataError(f"{where}/{key}: sha1sum {sha1!r} is not 40 hex digits")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise DataError(f"{where}/{key}: file_size_bytes {size!r} is not a number of bytes")
            out[seq].append(Shard(seq, name, info["download_url"], sha1.lower() if sha1 else None, size))
    return out


def pick_sequences(sequences: Sequence[str], seed: int = 42, max_num_sequences: int | None = None) -> list[str]:
    """ATEK's choice: sorted, shuffled by ``random.seed(seed)``, the first ``max_num_sequences`` kept
    (all of them when it is None or negative)."""
    order = sorted(sequences)
    random.Random(seed).shuffle(order)
    if max_num_sequences is not None and max_num_sequences > 0:
        order = order[:max_num_sequences]
    return order


def split_sequences(sequences: Sequence[str], ratio: float = 0.9,
                    split_json_path: str | None = None) -> tuple[list[str], list[str]]:
    """Train and validation sequences: the first ``int(len * ratio)`` and the rest, or as the
    split JSON says (``train_sequences`` / ``val_sequences``, kept only where picked, in its order)."""
    if split_json_path is None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"--train-val-split-ratio must be in [0, 1], got {ratio}")
        cut = int(len(sequences) * ratio)
        return list(sequences[:cut]), list(sequences[cut:])
    try:
        with open(split_json_path, encoding="utf-8") as f:
            split = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{split_json_path}: cannot read the split JSON ({e})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train_sequences",
                                                                                        "val_sequences")):
        raise DataError(f"{split_json_path}: expected lists 'train_sequences' and 'val_sequences'")
    both = [s for s in split["train_sequences"] if s in set(split["val_sequences"])]
    if both:
        raise DataError(f"{split_json_path}: {both[0]!r} is in both train_sequences and val_sequences (validation data "
                        "would be trained on)")
    picked = set(sequences)
    return ([s for s in split["train_sequences"] if s in picked], [s for s in split["val_sequences"] if s in picked])


class _Bar:
    """A byte progress bar over every download of a run (tqdm), fed by the cache's progress calls."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="downloading", unit="B", unit_scale=True, unit_divisor=1024,
                            dynamic_ncols=True)

    def __call__(self, url: str, done: int, total: int | None) -> None:
        if self.bar is None:
            return
        with self._lock:
            self.bar.update(max(0, done - self._seen.get(url, 0)))
            self._seen[url] = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _verified(path: str, shard: Shard) -> bool:
    """Whether ``path`` is already the shard (its size and sha1, where the JSON gives them)."""
    try:
        if shard.size is not None and os.path.getsize(path) != shard.size:
            return False
        return shard.sha1 is None or _digest(path, "sha1") == shard.sha1
    except OSError:
        return False


def download(shards: Sequence[Shard], output: str, *, overwrite: bool = False, workers: int = 4,
             progress: bool = True, **fetch: Any) -> Summary:
    """Download ``shards`` to ``output/SEQUENCE/NAME`` (``workers`` at once).

    A file already there that verifies is kept (unless ``overwrite``); one that does not is
    fetched again; a ``.part`` left by a broken run is resumed (``overwrite``: started over).
    ``fetch``: :class:`loaders._remote.ShardCache` settings (``retries``, ``backoff``, ``timeout``).
    """
    summary = Summary()
    todo = []
    for shard in shards:
        dest = os.path.join(output, shard.sequence, shard.name)
        if overwrite:
            for p in (dest, dest + ".part", dest + ".part.etag"):
                if os.path.exists(p):
                    os.remove(p)
        todo.append((shard, dest))
    bar = _Bar(sum(s.size or 0 for s, _ in todo) or None, progress)
    cache = ShardCache(output, progress=bar, **fetch)  # its download(): no cache folder is used

    def one(item: tuple[Shard, str]) -> tuple[Shard, str | None, bool]:
        shard, dest = item
        if os.path.exists(dest):
            if _verified(dest, shard):
                bar(shard.url, shard.size or 0, shard.size)
                return shard, None, False
            os.remove(dest)  # damaged or another version: fetched again
        try:
            cache.download(shard.url, dest, size=shard.size, sha1=shard.sha1)  # checked before it is renamed
        except (DataError, OSError) as e:
            return shard, str(e), True
        except Exception as e:  # noqa: BLE001 -- one shard's surprise is its failure, not the run's end
            return shard, f"{shard.url}: {type(e).__name__}: {e}", True
        return shard, None, True

    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="tandem-datastore") as pool:
            results = list(pool.map(one, todo))
        for shard, error, fetched in results:
            if error is not None:
                summary.failed.append((shard, error))
            elif fetched:
                summary.downloaded.append(shard)
            else:
                summary.verified.append(shard)
    finally:
        bar.close()
        cache.close()
    return summary


def _write_yaml(path: str, doc: dict) -> None:
    import yaml

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, default_flow_style=False)  # keys sorted, as ATEK's yaml.dump writes them
    os.replace(tmp, path)


def run(config_name: str, input_json_path: str, output_folder_path: str, *, max_num_sequences: int | None = None,
        train_val_split_ratio: float = 0.9, train_val_split_json_path: str | None = None, random_seed: int = 42,
        download_wds_to_local: bool = False, overwrite: bool = False, workers: int = 4, progress: bool = True,
        **fetch: Any) -> Summary:
    """What ``python -m loaders.datastore`` does, as a function (arguments as the CLI's)."""
    table = read_url_json(input_json_path, config_name)
    if max_num_sequences is not None and max_num_sequences > len(table):
        print(f"note: --max-num-sequences {max_num_sequences}, but {input_json_path} has {len(table)} sequences of "
              f"{config_name!r}: all of them are used", file=sys.stderr)
    picked = pick_sequences(list(table), random_seed, max_num_sequences)
    train, val = split_sequences(picked, train_val_split_ratio, train_val_split_json_path)
    os.makedirs(output_folder_path, exist_ok=True)
    groups = {"train": train, "validation": val}
    summary = Summary()
    if download_wds_to_local:
        wanted = [s for seq in dict.fromkeys([*train, *val]) for s in table[seq]]
        summary = download(wanted, output_folder_path, overwrite=overwrite, workers=workers, progress=progress,
                           **fetch)
        bad = {s.url for s, _ in summary.failed}
        lists = {name: {seq: kept for seq in seqs if (kept := [s.relative for s in table[seq] if s.url not in bad])}
                 for name, seqs in groups.items()}  # a failed shard is left out (exit 1); so is a sequence left empty
        lists["all"] = {**lists["train"], **lists["validation"]}
        for name in SPLITS:
            path = os.path.join(output_folder_path, f"local_{name}_tars.yaml")
            _write_yaml(path, {"tars": lists[name]})
            summary.written.append(path)
    else:
        for name, seqs in [*groups.items(), ("all", [*train, *val])]:
            path = os.path.join(output_folder_path, f"streamable_{name}_tars.yaml")
            shards = [s for seq in seqs for s in table[seq]]
            checks = {s.url: {k: v for k, v in (("sha1", s.sha1), ("size", s.size)) if v is not None} for s in shards}
            _write_yaml(path, {"tars": {seq: [s.url for s in table[seq]] for seq in seqs}, "checks": checks})
            summary.written.append(path)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loaders.datastore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", required=True, help="the config in the URL JSON (e.g. cubercnn, efm)")
    p.add_argument("--input-json-path", required=True, help="ATEK's URL JSON")
    p.add_argument("--output-folder-path", required=True, help="where the YAML lists (and shards) go")
    p.add_argument("--max-num-sequences", type=int, default=None, help="keep the first K sequences after the shuffle")
    p.add_argument("--train-val-split-ratio", type=float, default=0.9, help="share of sequences for training")
    p.add_argument("--train-val-split-json-path", default=None,
                   help="a JSON with 'train_sequences' and 'val_sequences' (instead of the ratio)")
    p.add_argument("--random-seed", type=int, default=42, help="seeds the sequence shuffle (ATEK's default 42)")
    p.add_argument("--download-wds-to-local", action="store_true",
                   help="download the shards (else write streamable_*.yaml lists of URLs)")
    p.add_argument("--overwrite", action="store_true",
                   help="download again shards already there (default: keep those that verify, resume partial ones)")
    p.add_argument("--workers", type=int, default=4, help="downloads at once")
    p.add_argument("--retries", type=int, default=6, help="retries of a failing download (with backoff)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: returns the exit status (1 if any shard failed, 2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        summary = run(args.config_name, args.input_json_path, args.output_folder_path,
                      max_num_sequences=args.max_num_sequences, train_val_split_ratio=args.train_val_split_ratio,
                      train_val_split_json_path=args.train_val_split_json_path, random_seed=args.random_seed,
                      download_wds_to_local=args.download_wds_to_local, overwrite=args.overwrite,
                      workers=args.workers, progress=not args.no_progress, retries=args.retries)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.download_wds_to_local:
        total = len(summary.downloaded) + len(summary.verified) + len(summary.failed)
        print(f"{total} shards: {len(summary.downloaded)} downloaded, {len(summary.verified)} already complete, "
              f"{len(summary.failed)} failed")
    for path in summary.written:
        print(f"wrote {path}")
    if summary.failed:
        print(f"{len(summary.failed)} shard(s) failed (the same command again retries them, resuming partial "
              "downloads):", file=sys.stderr)
        for shard, error in summary.failed:
            print(f"  {shard.relative}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
