"""Loaders vs their anchors, on the same files in one run: ``python -m benchmarks.loaders``.

- TarSource, shuffled, vs ``webdataset.WebDataset(...).decode()`` in file order
  (100k samples of a 3x32x32 uint8 ``.npy`` + ``.cls``).
- H5Source, full permutation, batch 256, vs per-item ``f["x"][i]`` (1M x 128 float32,
  1024-row chunks).
- H5Source, block shuffle, vs a sequential h5py read of the same file.
- H5CachedSource vs numpy fancy indexing of the same in-memory array.
- TarSource over HTTP (``python -m http.server`` on 127.0.0.1, its own process; 20 shards
  of the same kind of samples): with a warm shard cache vs the same files read locally
  (goal >= 0.9x) and vs ``webdataset.WebDataset(urls).decode()`` streaming the same URLs in
  order (goal >= 10x); with a cold shard cache (index kept, ``cache_limit`` half the data,
  block shuffle over windows of 4 shards, the next steps fetched ahead): time to the first
  batch, the sustained rate from there and downloads per shard, beside webdataset over the
  same URLs. Also printed: opening the URLs with nothing cached (every shard downloaded
  once to be indexed).

Data is generated once into ``.cache/bench`` (or ``$TANDEM_BENCH_DIR``). ``--quick``
uses a tenth of the sizes. Rates are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings

import numpy as np

from loaders import H5CachedSource, H5Source, Loader, Sampler, TarSource

from ._common import Table, cache_dir, rate

BATCH = 256


def make_tar(folder: str, n: int, per_shard: int = 10_000) -> list[str]:
    import webdataset as wds

    pattern = os.path.join(folder, "bench-%06d.tar")
    done = os.path.join(folder, f"done-{n}-{per_shard}")
    if not os.path.exists(done):
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        rng = np.random.default_rng(0)
        print(f"writing {n} samples with webdataset.ShardWriter ...", flush=True)
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as sink:
            for i in range(n):
                sink.write({"__key__": f"s{i:07d}", "npy": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
                            "cls": int(i % 10)})
        open(done, "w").close()
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))


def make_h5(folder: str, n: int) -> str:
    import h5py

    path = os.path.join(folder, f"bench-{n}.h5")
    if not os.path.exists(path):
        print(f"writing {n} x 128 float32 with h5py ...", flush=True)
        rng = np.random.default_rng(0)
        with h5py.File(path + ".tmp", "w") as f:
            ds = f.create_dataset("x", shape=(n, 128), dtype=np.float32, chunks=(1024, 128))
            for a in range(0, n, 65536):
                ds[a : a + 65536] = rng.normal(size=(min(65536, n - a), 128)).astype(np.float32)
        os.replace(path + ".tmp", path)
    return path


def loader_rate(loader: Loader, samples: int) -> int:
    it = iter(loader)
    n = 0
    while n < samples:
        n += len(next(iter(next(it).values())))
    return n


def wds_in_order(shards: list[str], n: int) -> int:
    """The anchor: webdataset reading ``shards`` (paths or URLs) in order, decoded, for up to
    20,000 samples; returns how many it read."""
    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        count = 0
        for _ in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode():
            count += 1
            if count >= min(n, 20_000):
                break
        gc.collect()
    return count


def bench_tar(table: Table, n: int, repeats: int) -> None:
    shards = make_tar(cache_dir("tar"), n)
    with tempfile.TemporaryDirectory() as index_dir:
        src = TarSource(shards, index_dir=index_dir)
        assert len(src) == n
        loader_samples = n

        def ours():
            return loader_rate(Loader(src, Sampler(n, BATCH, seed=0, shuffle="full")), loader_samples - BATCH)

        def anchor():
            return wds_in_order(shards, n)

        ours()  # warm the page cache
        table.add("TarSource, full shuffle, batch 256", rate(ours, repeats),
                  "webdataset.WebDataset.decode(), in order", rate(anchor, repeats), 10)


def bench_h5(table: Table, n: int, repeats: int) -> None:
    import h5py

    path = make_h5(cache_dir("h5"), n)
    with open(path, "rb") as f:  # warm the page cache for every contender alike
        while f.read(1 << 24):
            pass
    src = H5Source(path, keys=["x"])
    rng = np.random.default_rng(1)

    def per_item():
        count = min(n, 20_000)
        with h5py.File(path, "r") as f:
            ds = f["x"]
            for i in rng.integers(0, n, count):
                ds[i]
        return count

    def full():
        return loader_rate(Loader(src, Sampler(n, BATCH, seed=0, shuffle="full")), min(n, 500_000))

    table.add("H5Source, full permutation, batch 256", rate(full, repeats),
              'per-item f["x"][i] (torch __getitem__)', rate(per_item, repeats), 10)

    def block():
        sampler = Sampler(n, BATCH, seed=0, shuffle="block", blocks=src.block_starts)
        return loader_rate(Loader(src, sampler), n - BATCH)

    def sequential():
        with h5py.File(path, "r") as f:
            ds = f["x"]
            for a in range(0, n, 65536):
                ds[a : a + 65536]
        return n

    table.add("H5Source, block shuffle, batch 256", rate(block, repeats),
              "sequential h5py read (64k-row slabs)", rate(sequential, repeats), 0.5)

    cached = H5CachedSource(path, keys=["x"])
    arr = cached.read_batch(np.arange(n))["x"].copy()

    def cached_rate():
        return loader_rate(Loader(cached, Sampler(n, BATCH, seed=0, shuffle="full")), n - BATCH)

    def numpy_rate():
        order = np.random.default_rng(0).permutation(n)
        for a in range(0, n - BATCH + 1, BATCH):
            arr[order[a : a + BATCH]]
        return n // BATCH * BATCH

    table.add("H5CachedSource, full shuffle, batch 256", rate(cached_rate, repeats),
              "numpy fancy indexing, same array", rate(numpy_rate, repeats), 0.5)
    cached.close()


class _HTTPServer:
    """``python -m http.server`` serving ``folder`` on 127.0.0.1, in a process of its own (its
    request log in ``log``: :meth:`gets` counts the shard downloads)."""

    def __init__(self, folder: str, log: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                          "--directory", folder], stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("python -m http.server did not start") from None
                time.sleep(0.05)

    def gets(self) -> int:
        """Shard downloads so far (GET requests of a ``.tar``)."""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return sum('"GET /' in line and '.tar HTTP' in line for line in f)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bench_remote(table: Table, n: int, repeats: int) -> None:
    shards = make_tar(cache_dir("tar-remote"), n, per_shard=n // 20)
    work = tempfile.mkdtemp(prefix="tandem-bench-remote-")
    server = _HTTPServer(os.path.dirname(shards[0]), os.path.join(work, "server.log"))
    urls = [f"{server.url}/{os.path.basename(p)}" for p in shards]
    total = sum(os.path.getsize(p) for p in shards)
    try:
        index_dir, cache = os.path.join(work, "index"), os.path.join(work, "shards")
        t = time.perf_counter()
        remote = TarSource(urls, index_dir=index_dir, cache_dir=cache)
        opened = time.perf_counter() - t
        print(f"  opening {len(urls)} URLs ({total / 2**20:.0f} MiB) with nothing cached (each shard downloaded "
              f"once, indexed): {opened:.2f} s", flush=True)
        local = TarSource(shards, index_dir=index_dir)

        def full(src):
            return lambda: loader_rate(Loader(src, Sampler(n, BATCH, seed=0, shuffle="full")), n - BATCH)

        full(remote)()
        full(local)()  # warm the page cache for both
        table.add_compared("TarSource over HTTP, warm shard cache, full shuffle", full(remote),
                           "TarSource, the same shards as local files", full(local), 0.9, repeats)

        def streaming():
            return wds_in_order(urls, n)

        anchor = rate(streaming, repeats)
        table.add("TarSource over HTTP, warm shard cache, full shuffle", rate(full(remote), repeats),
                  "webdataset.WebDataset(urls).decode(), in order", anchor, 10)

        firsts: list[float] = []
        limit = total // 2

        def cold():
            shutil.rmtree(cache, ignore_errors=True)  # the index stays: a node that has read this data before
            t0 = time.perf_counter()
            src = TarSource(urls, index_dir=index_dir, cache_dir=cache, cache_limit=limit)
            sampler = Sampler(n, BATCH, seed=0, shuffle="block", blocks=src.block_starts, window=4, num_epochs=1)
            it = iter(Loader(src, sampler))
            next(it)
            t1 = time.perf_counter()
            firsts.append(t1 - t0)
            count = sum(len(batch["cls"]) for batch in it)  # the rest of the epoch
            src.shard_cache.close()
            return count, time.perf_counter() - t1

        before = server.gets()
        ours = rate(cold, repeats)
        fetched = (server.gets() - before) / repeats / len(urls)
        table.add(f"TarSource over HTTP, cold shard cache (first batch {statistics.median(firsts):.2f} s), block "
                  f"shuffle (window 4 shards), cache_limit half the data, sustained ({fetched:.2f} downloads a shard "
                  "an epoch)", ours,
                  "webdataset.WebDataset(urls).decode(), in order", anchor, 1)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the data (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    table = Table(f"Loaders (python -m benchmarks.loaders{' --quick' if args.quick else ''})")
    bench_tar(table, 100_000 // scale, args.repeats)
    bench_h5(table, 1_000_000 // scale, args.repeats)
    bench_remote(table, 100_000 // scale, args.repeats)
    table.save(args.json)


if __name__ == "__main__":
    main()
