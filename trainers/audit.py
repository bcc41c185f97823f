"""Resume audit: what data each step trained on, and the first step where two runs differ.

With ``train.audit: true`` every process writes ``audit/process-<i>.jsonl``: per step, two
64-bit hashes of its slice of the global batch — one of the record indices the sampler
gave it, one of the bytes the model received — each a sum over its records of a mix of
the record's position in the global batch and its index (or content). Sums add up across
processes, so the global batch's hash is the sum of the processes' hashes, whatever the
number of processes: a 2-process run and a 1-process run that read the same global
batches have equal hashes at every step.

    python -m trainers.audit RUN_A RUN_B

compares two run folders and prints the first step where they read different records or
different bytes (exit status 1), or that every step both ran matches (0).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
FOLDER = "audit"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _rows(values: np.ndarray) -> np.ndarray:
    """One uint64 per row of ``values`` (its first axis) from its bytes; equal bytes give equal hashes."""
    rows = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
    width = rows.shape[1]
    pad = -width % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((len(rows), pad), dtype=np.uint8)], axis=1)
    words = rows.view(np.uint64)
    cols = np.arange(1, words.shape[1] + 1, dtype=np.uint64) * _GOLDEN
    return _mix(_mix(words + cols).sum(axis=1, dtype=np.uint64) + np.uint64(width))


def batch_hashes(positions: np.ndarray, indices: np.ndarray, arrays: list[np.ndarray]) -> tuple[int, int]:
    """``(indices hash, data hash)`` of the records at ``positions`` of a global batch: sums (mod 2^64)
    over records, so the hashes of a batch's slices add up to the hash of the whole batch."""
    with np.errstate(over="ignore"):
        where = _mix(positions.astype(np.uint64) * _GOLDEN + np.uint64(1))
        index_hash = _mix(where ^ indices.astype(np.int64).view(np.uint64)).sum(dtype=np.uint64)
        content = np.zeros(len(positions), dtype=np.uint64)
        for k, arr in enumerate(arrays):
            content = _mix(content + _rows(arr) + np.uint64(k + 1))
        data_hash = _mix(where ^ content).sum(dtype=np.uint64)
    return int(index_hash), int(data_hash)


class AuditLog:
    """Writes this process's audit rows; ``observe`` sits in the batch stream, ``write`` runs once the
    steps are trained (the stream reads ahead: rows are only written for steps the model took).

    ``indices(step)`` gives this process's record indices and ``first`` its first position in each
    global batch; ``keys`` the batch fields the model receives, hashed in this order.
    """

    def __init__(self, workdir: str, index: int, count: int, start: int, sampler: Any, keys: list[str]) -> None:
        self.path = os.path.join(workdir, FOLDER, f"process-{index}.jsonl")
        self.count, self.step, self.sampler, self.keys = count, start, sampler, keys
        self.first = index * sampler.local_batch_size
        self._pending: dict[int, tuple[int, int]] = {}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        trim(self.path, start)
        if index == 0:  # files of processes this run does not have (a run resumed with fewer processes)
            for path in glob.glob(os.path.join(workdir, FOLDER, "process-*.jsonl")):
                if _process_of(path) >= count:
                    trim(path, start)
        self._file = open(self.path, "a")

    def observe(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Hash the next step's batch (the stream hands batches over in step order)."""
        self.step += 1
        idx, mask = self.sampler.indices_and_mask(self.step - 1)
        positions = self.first + np.arange(len(idx), dtype=np.int64)
        arrays = [np.asarray(batch[k]) for k in self.keys if k in batch]
        if mask is not None:  # a short last batch: its padding is not data
            idx, positions, arrays = idx[mask], positions[mask], [a[mask] for a in arrays]
        self._pending[self.step] = batch_hashes(positions, idx, arrays)
        return batch

    def write(self, upto: int) -> None:
        """Write the rows of the steps up to ``upto`` (trained)."""
        for step in sorted(s for s in self._pending if s <= upto):
            i, d = self._pending.pop(step)
            self._file.write(json.dumps({"step": step, "of": self.count, "indices": f"{i:016x}", "data": f"{d:016x}"}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def trim_audit(workdir: str, last_step: int) -> None:
    """Trim every process's audit file of ``workdir`` to the steps up to ``last_step``."""
    for path in glob.glob(os.path.join(workdir, FOLDER, "process-*.jsonl")):
        trim(path, last_step)


def _process_of(path: str) -> int:
    try:
        return int(os.path.basename(path)[len("process-") : -len(".jsonl")])
    except ValueError:
        return -1


def trim(path: str, last_step: int) -> None:
    """Keep the rows of steps ``<= last_step`` (later ones are trained and written again)."""
    if not os.path.exists(path):
        return
    keep = [line for line in _lines(path) if line[1]["step"] <= last_step]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(text for text, _ in keep)
    os.replace(tmp, path)


def _lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and type(row.get("step")) is int:
                yield line if line.endswith("\n") else line + "\n", row


def global_hashes(workdir: str, incomplete: list[int] | None = None) -> dict[int, tuple[str, str]]:
    """Per step, the global batch's ``(indices, data)`` hashes: the sums of every process's rows.
    Steps some process has no row for are left out (and listed in ``incomplete`` if given)."""
    files = sorted(glob.glob(os.path.join(workdir, FOLDER, "process-*.jsonl")))
    if not files:
        raise FileNotFoundError(f"{workdir}: no {FOLDER}/process-*.jsonl (was the run trained with train.audit=true?)")
    parts: dict[int, list[dict[str, Any]]] = {}
    for path in files:
        for _, row in _lines(path):
            parts.setdefault(row["step"], []).append(row)
    out = {}
    for step, rows in sorted(parts.items()):
        if len(rows) != rows[0]["of"] or any(r["of"] != rows[0]["of"] for r in rows):
            if incomplete is not None:  # a step some process did not write (a lost file?): not comparable
                incomplete.append(step)
            continue
        mask = (1 << 64) - 1
        out[step] = tuple(f"{sum(int(r[k], 16) for r in rows) & mask:016x}" for k in ("indices", "data"))
    return out


def compare(run_a: str, run_b: str) -> tuple[int | None, str]:
    """The first step where runs ``run_a`` and ``run_b`` read different data (None if none) and a report."""
    gaps: list[int] = []
    a, b = global_hashes(run_a, gaps), global_hashes(run_b, gaps)
    common = sorted(a.keys() & b.keys())
    for step in common:
        if a[step] != b[step]:
            what = "records" if a[step][0] != b[step][0] else "bytes (same record indices: the data changed)"
            return step, f"step {step}: the runs read different {what}"
    only = len(a.keys() ^ b.keys())
    extra = f"; {only} step(s) only one run has" if only else ""
    if gaps:
        extra += f"; {len(gaps)} step(s) lack some process's row, not compared (first: {min(gaps)})"
    if not common:
        return None, f"no step in common (A: {len(a)} steps, B: {len(b)}){extra}"
    return None, f"identical data at all {len(common)} common steps ({common[0]}..{common[-1]}){extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    try:
        step, report = compare(args.run_a, args.run_b)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 1 if step is not None else 0


if __name__ == "__main__":
    sys.exit(main())
