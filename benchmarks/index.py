"""The tar index every process on a node shares: ``python -m benchmarks.index``.

10^6 records (1000 shards of 1000 records, each a small ``.npy`` and a ``.cls``) opened as one
``TarSource``, by each contender in its own process:

- cold open: no index cached yet (every shard scanned);
- warm open: the index cached (median of 3 opens);
- pickled size of the source (what every worker receives);
- private memory each worker adds for the index: two worker processes unpickle the source and read
  batches covering every record (so every index entry is touched), then, while both are alive,
  read ``Private_Clean + Private_Dirty`` from ``/proc/self/smaps_rollup``; minus the same of a
  worker that imported the same modules and loaded no source.

Contenders: Tandem (the combined index, memory-mapped from the cache), the same with the index
kept in memory (what happens where the cache cannot be written), and with ``--old PATH`` the code
of another checkout (e.g. ``git worktree add /tmp/base <commit>``), read the same way.
Goals: warm open <= 0.2 s, pickle <= 64 KiB, <= 1 MB private memory per worker.
``--quick`` uses 10^5 records. Data goes to ``.cache/bench/index`` (or ``$TANDEM_BENCH_DIR``).
Linux only (``smaps_rollup``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from ._common import cache_dir

PER_SHARD = 1000
BATCH = 256
GOAL_OPEN_S = 0.2
GOAL_PICKLE = 64 << 10
GOAL_PRIVATE_MB = 1.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _header(name: str, size: int) -> bytes:
    """A ustar header written by hand (tarfile's costs ~60 us a member: minutes for 10^6 records)."""
    h = bytearray(512)
    h[: len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148] = b"%011o\0" % size, b"00000000000\0"
    h[156:157], h[257:265] = b"0", b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def make_shards(folder: str, shards: int) -> list[str]:
    """``shards`` tar files of PER_SHARD records: ``r<i>.npy`` (uint8 (8,)) and ``r<i>.cls``; made once."""
    paths = [os.path.join(folder, f"idx-{s:06d}.tar") for s in range(shards)]
    done = os.path.join(folder, f"done-{shards}")
    if os.path.exists(done):
        return paths
    print(f"writing {shards} shards of {PER_SHARD} records ...", flush=True)
    buf = io.BytesIO()
    np.save(buf, np.zeros(8, dtype=np.uint8))
    npy_head = buf.getvalue()[:-8]
    for s, path in enumerate(paths):
        out = bytearray()
        for r in range(PER_SHARD):
            i = s * PER_SHARD + r
            for name, data in ((f"r{i:07d}.npy", npy_head + bytes([i % 256] * 8)), (f"r{i:07d}.cls", b"%d" % (i % 10))):
                out += _header(name, len(data)) + data + bytes(-len(data) % 512)
        with open(path, "wb") as f:
            f.write(out + bytes(1024))
    open(done, "w").close()
    return paths


# What each contender runs, in its own interpreter (so that --old can put another checkout first on
# the path): prints one JSON line.
CONTENDER = r"""
import json, os, pickle, statistics, subprocess, sys, time, warnings
import numpy as np
mode, shard_list, index_dir, worker_code = sys.argv[1:5]
if mode == "memory":  # the combined index cannot be written: kept in memory (and pickled whole)
    import loaders._index as ix
    def refuse(*args):
        raise OSError(30, "Read-only file system")
    ix._write_set = refuse
    warnings.simplefilter("ignore", RuntimeWarning)
import loaders
from loaders import TarSource
shards = json.load(open(shard_list))
t = time.perf_counter()
src = TarSource(shards, index_dir=index_dir)
cold = time.perf_counter() - t
warm = []
for _ in range(3):
    t = time.perf_counter()
    src = TarSource(shards, index_dir=index_dir)
    warm.append(time.perf_counter() - t)
blob = pickle.dumps(src)
path = os.path.join(index_dir, "source.pickle")
with open(path, "wb") as f:
    f.write(blob)
env = dict(os.environ)
workers = [subprocess.Popen([sys.executable, "-c", worker_code, path if k else ""], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env) for k in range(3)]
for w in workers:
    assert w.stdout.readline().strip() == "ready"
for w in workers:  # every worker has read everything: measure while all are alive
    w.stdin.write("measure\n"); w.stdin.flush()
private = [json.loads(w.stdout.readline()) for w in workers]
for w in workers:
    w.stdin.close(); w.wait()
base = private[0]
print(json.dumps({"code": os.path.dirname(os.path.dirname(loaders.__file__)), "records": len(src), "cold_s": cold,
                  "warm_s": statistics.median(warm), "pickle": len(blob),
                  "private_mb": [(p - base) / 2**20 for p in private[1:]]}))
"""

WORKER = r"""
import pickle, sys
import numpy as np
import loaders
def private():
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) * 1024
if sys.argv[1]:
    with open(sys.argv[1], "rb") as f:
        src = pickle.load(f)
    n = len(src)
    stride = -(-n // 256)
    for b in range(stride):  # every record once, each batch across the whole data set
        idx = b + np.arange(256, dtype=np.int64) * stride
        batch = src.read_batch(idx[idx < n])
        assert int(batch["cls"][0]) == b % 10
print("ready", flush=True)
sys.stdin.readline()
print(private(), flush=True)
sys.stdin.read()
"""


def run_contender(mode: str, shards: list[str], pythonpath: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        shard_list = os.path.join(tmp, "shards.json")
        with open(shard_list, "w") as f:
            json.dump(shards, f)
        index_dir = os.path.join(tmp, "index")
        os.makedirs(index_dir)
        env = {**os.environ, "PYTHONPATH": pythonpath, "TANDEM_CACHE_DIR": os.path.join(tmp, "cache")}
        # Run from the temporary folder: ``python -c`` puts the working directory first on the path.
        out = subprocess.run([sys.executable, "-c", CONTENDER, mode, shard_list, index_dir, WORKER], env=env,
                             capture_output=True, text=True, check=False, cwd=tmp)
    if out.returncode:
        raise RuntimeError(f"{mode} ({pythonpath}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^5 records (a smoke run)")
    parser.add_argument("--old", default=None, help="a checkout of other code to compare with (its root folder)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/smaps_rollup"):
        sys.exit("benchmarks.index needs Linux (/proc/self/smaps_rollup)")
    shards = make_shards(cache_dir("index"), 100 if args.quick else 1000)
    contenders = [("Tandem: shared index (memory-mapped cache)", "shared", ROOT),
                  ("Tandem: index in memory (cache not writable)", "memory", ROOT)]
    if args.old:
        contenders.append((f"old code ({args.old})", "shared", os.path.abspath(args.old)))
    rows = []
    for name, mode, path in contenders:
        print(f"  {name} ...", flush=True)
        r = run_contender(mode, shards, path)
        r["case"] = name
        rows.append(r)
        print(f"    {json.dumps(r)}", flush=True)
    n = rows[0]["records"]
    print(f"\n### Tar index shared by workers ({n:,} records, {len(shards)} shards; python -m benchmarks.index"
          f"{' --quick' if args.quick else ''})\n")
    print("| case | cold open (scan) s | warm open s | pickled source bytes | private memory per worker MB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        mb = ", ".join(f"{x:.2f}" for x in r["private_mb"])
        print(f"| {r['case']} | {r['cold_s']:.2f} | {r['warm_s']:.3f} | {r['pickle']:,} | {mb} |")
    print(f"| goal | | <= {GOAL_OPEN_S} | <= {GOAL_PICKLE:,} | <= {GOAL_PRIVATE_MB} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
