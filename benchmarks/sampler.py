"""The sampler's cost per batch at any size: ``python -m benchmarks.sampler``.

``Sampler.indices(step)`` for a batch of 256 at n = 10^6, 10^8, 10^10 and 2^40 records,
epoch 0 and epoch 7, against two anchors measured in the same run:

- the order Tandem used before (order version 1): a numpy ``PCG64`` ``permutation`` of every
  record per epoch, sliced per batch; measured only where it fits in memory;
- Grain's ``index_shuffle``, called once per index (as Grain's ``ShuffleMapDataset`` does).

Columns: the first batch of an epoch (a fresh sampler: keys and the first chunk of steps),
the steady cost per batch over consecutive steps, and one batch computed with no cache at
all (any step, e.g. a worker's first); the peak RSS each contender adds to the interpreter
(every measurement runs in its own process, so no peak hides another). Goals: at most 1 ms
for any batch at every n, flat RSS (< 50 MB above the interpreter), per-index throughput at
least Grain's. A second table gives ``shuffle="block"`` (1024-record blocks, window 8).

``--quick`` skips the old permutation at 10^8 (tens of seconds, ~1.6 GB) and repeats less.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH = 256
SIZES = [("10^6", 10**6), ("10^8", 10**8), ("10^10", 10**10), ("2^40", 2**40)]
EPOCHS = (0, 7)
SEED = 1
GOAL_US = 1000.0
GOAL_RSS_MB = 50.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


# --------------------------------------------------------------------------- contenders (each in its own process)
def run_ours(n: int, epoch: int, repeats: int, shuffle: str) -> dict:
    from loaders import Sampler

    def fresh():
        return Sampler(n, BATCH, seed=SEED, shuffle=shuffle, blocks=1024, window=8)

    base = peak_rss_mb()
    s = fresh()
    within = (s.steps_per_epoch // 2) // s._steps_per_chunk * s._steps_per_chunk  # a chunk's first step, mid-epoch
    step0 = epoch * s.steps_per_epoch + within
    s.indices(step0)  # warm numpy's code paths once
    samplers = [fresh() for _ in range(repeats)]
    first = statistics.median(_timed(lambda s=x: s.indices(step0)) for x in samplers)  # keys + first chunk

    steps = 4 * s._steps_per_chunk  # consecutive steps over four chunks (each chunk's first included)

    def run():
        for i in range(1, steps + 1):
            s.indices(step0 + i)

    steady = median_us(run, max(3, repeats // 4)) / steps
    pos = np.arange(BATCH, dtype=np.int64) + within * BATCH
    s._records(epoch, pos)
    uncached = median_us(lambda: s._records(epoch, pos), 10 * repeats)  # one batch, no chunk
    # the same order whichever way: the uncached batch is what indices() gives
    assert np.array_equal(s._records(epoch, pos), s.indices(step0)), "cached and uncached orders differ"
    return {"first": first, "steady": steady, "uncached": uncached, "rss": peak_rss_mb() - base}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def run_old(n: int, epoch: int, repeats: int) -> dict:
    """Order version 1: a permutation of every record per epoch, then slices of it."""
    base = peak_rss_mb()
    seq = np.random.SeedSequence([SEED, 0, epoch, 0])  # the old stream words: seed, order, epoch, rank
    holder = {}

    def first():
        holder["order"] = np.random.Generator(np.random.PCG64(seq)).permutation(n)
        return holder["order"][:BATCH]

    first_us = median_us(first, 1 if n > 10**7 else max(3, repeats // 4))
    order = holder["order"]

    def steady():
        for k in range(1000):
            order[k * BATCH : (k + 1) * BATCH]

    steady_us = median_us(steady, 5) / 1000
    return {"first": first_us, "steady": steady_us, "uncached": first_us, "rss": peak_rss_mb() - base}


def run_grain(n: int, epoch: int, repeats: int) -> dict:
    from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

    shuffle = index_shuffle_module.index_shuffle
    base = peak_rss_mb()
    seed = (SEED + epoch) % 2**32  # as grain's ShuffleMapDataset derives an epoch's seed
    start = (n // BATCH // 2) * BATCH  # mid-epoch, as ours

    def batch():
        return [shuffle(i, n - 1, seed, 4) for i in range(start, start + BATCH)]

    batch()
    us = median_us(batch, repeats)
    return {"first": us, "steady": us, "uncached": us, "rss": peak_rss_mb() - base}


def child(args: argparse.Namespace) -> None:
    if args.child == "ours":
        out = run_ours(args.n, args.epoch, args.repeats, args.shuffle)
    elif args.child == "old":
        out = run_old(args.n, args.epoch, args.repeats)
    else:
        out = run_grain(args.n, args.epoch, args.repeats)
    print(json.dumps(out))


def measure(kind: str, n: int, epoch: int, repeats: int, shuffle: str = "full") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.sampler", "--child", kind, "--n", str(n), "--epoch", str(epoch),
           "--repeats", str(repeats), "--shuffle", shuffle]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the table
def available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fmt(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us / 1e6:,.1f} s" if us >= 1e6 else f"{us:,.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the old order at 10^8, repeat less")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", choices=["ours", "old", "grain"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epoch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shuffle", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (8 if args.quick else 20)
    if args.child:
        args.repeats = repeats
        child(args)
        return

    old_limit = 10**7 if args.quick else 10**8
    has_grain = importlib.util.find_spec("grain") is not None  # the jax extra
    rows, block_rows = [], []
    print(f"Sampler.indices(step), batch {BATCH}, seed {SEED} (python -m benchmarks.sampler{' --quick' if args.quick else ''})",
          flush=True)
    for name, n in SIZES:
        for epoch in EPOCHS:
            ours = measure("ours", n, epoch, repeats)
            need = 16 * n  # the permutation and numpy's temporaries: ~16 bytes a record (1.6 GB at 10^8)
            old, why = None, ""
            if n > 10**8 or need >= available_bytes() // 2:
                why = f"would need ~{need / 2**30:,.0f} GiB"
            elif n > old_limit:
                why = f"skipped by --quick: ~{need / 2**30:.1f} GiB"
            else:
                old = measure("old", n, epoch, repeats)
            grain = measure("grain", n, epoch, repeats) if has_grain else None
            row = {"n": name, "epoch": epoch, "ours": ours, "old": old, "old_note": why, "grain": grain}
            rows.append(row)
            print(f"  n={name} epoch={epoch}: ours first {fmt(ours['first'])} us, steady {fmt(ours['steady'])} us, "
                  f"uncached {fmt(ours['uncached'])} us, +{ours['rss']:.1f} MB | old first "
                  f"{fmt(old['first']) if old else why} | grain {fmt(grain['uncached']) if grain else 'n/a'} us", flush=True)
            block = measure("ours", n, epoch, repeats, shuffle="block")
            block_rows.append({"n": name, "epoch": epoch, "ours": block})

    print()
    print("### Full shuffle: microseconds per batch of 256 (medians)")
    print()
    print("| n | epoch | ours: first batch | ours: steady | ours: uncached | ours: +RSS MB | old numpy: first batch "
          "| old: steady | old: +RSS MB | Grain index_shuffle | old first / ours first | Grain / ours uncached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    met = True
    for r in rows:
        o, old, g = r["ours"], r["old"], r["grain"]
        worst = max(o["first"], o["steady"], o["uncached"])
        met &= worst <= GOAL_US and o["rss"] < GOAL_RSS_MB and (g is None or o["uncached"] <= g["uncached"])
        old_cols = (f"{fmt(old['first'])} | {fmt(old['steady'])} | {old['rss']:,.0f}" if old
                    else f"n/a ({r['old_note']}) | n/a | n/a")
        ratio_old = f"{old['first'] / o['first']:,.0f}x" if old else "n/a"
        ratio_grain = f"{g['uncached'] / o['uncached']:.1f}x" if g else "n/a"
        print(f"| {r['n']} | {r['epoch']} | {fmt(o['first'])} | {fmt(o['steady'])} | {fmt(o['uncached'])} | "
              f"{o['rss']:.1f} | {old_cols} | {fmt(g['uncached']) if g else 'n/a (no grain)'} | {ratio_old} | "
              f"{ratio_grain} |")
    print()
    print("### Block shuffle (1024-record blocks, window 8): microseconds per batch of 256")
    print()
    print("| n | epoch | first batch | steady | uncached | +RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in block_rows:
        o = r["ours"]
        met &= max(o["first"], o["steady"], o["uncached"]) <= GOAL_US and o["rss"] < GOAL_RSS_MB
        print(f"| {r['n']} | {r['epoch']} | {fmt(o['first'])} | {fmt(o['steady'])} | {fmt(o['uncached'])} | {o['rss']:.1f} |")
    print()
    print(f"goals (every batch <= {GOAL_US:.0f} us, +RSS < {GOAL_RSS_MB:.0f} MB, uncached per index at least "
          f"Grain's): {'met' if met else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"full": rows, "block": block_rows}, f, indent=1)


if __name__ == "__main__":
    main()
