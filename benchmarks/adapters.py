"""Adapters vs plain PyTorch and Grain pipelines, same data, one run: ``python -m benchmarks.adapters``.

- TorchLoader vs a ``DataLoader`` with per-item ``__getitem__`` and default collation,
  on in-memory and HDF5 data, 0 and 2 workers.
- GrainLoader vs ``MapDataset.source(...).shuffle(seed).batch(256)`` (0 and 2
  workers) and vs ``grain.DataLoader`` with an ``IndexSampler`` and a ``Batch``.
- Each adapter vs the bare ``Loader`` on the same source (overhead), 0 workers.

Rates count from each contender's first batch on; worker start-up is printed apart.

200k records x 128 float32 (1024-row chunks), batch 256, full shuffle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from loaders import H5CachedSource, H5Source, Loader, Sampler

from ._common import Table, cache_dir
from .loaders import make_h5

BATCH = 256


STARTUP: dict[str, list[float]] = {}


def consume(iterable, samples: int, label: str = "") -> tuple[int, float]:
    """Samples read and seconds taken, counted from the first batch on: starting worker
    processes (2-4 s for Grain's spawned workers) is reported apart, as time to first batch."""
    t0 = time.perf_counter()
    it = iter(iterable)
    first = next(it)
    t1 = time.perf_counter()
    STARTUP.setdefault(label, []).append(t1 - t0)
    n = 0
    for batch in it:
        n += len(next(iter(batch.values())) if isinstance(batch, dict) else batch)
        if n >= samples:
            break
    del first
    return n, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per contender; medians")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import grain
    import h5py
    import torch
    from absl import flags

    from adapters.grain import GrainLoader
    from adapters.torch import TorchLoader

    flags.FLAGS.mark_as_parsed()
    torch.set_num_threads(1)
    n = 20_000 if args.quick else 200_000
    path = make_h5(cache_dir("h5"), n)
    lazy = H5Source(path, keys=["x"])
    cached = H5CachedSource(path, keys=["x"])
    array = cached.read_batch(np.arange(n))["x"].copy()

    class ArrayItems(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"x": array[i]}

    class H5Items(torch.utils.data.Dataset):  # the common lazily-opened per-item HDF5 dataset
        def __init__(self):
            self.f = None

        def __len__(self):
            return n

        def __getitem__(self, i):
            if self.f is None:
                self.f = h5py.File(path, "r")
            return {"x": self.f["x"][i]}

    def sampler():
        return Sampler(n, BATCH, seed=0, shuffle="full")

    table = Table(f"Adapters (python -m benchmarks.adapters{' --quick' if args.quick else ''})")
    per_item_samples = {0: min(n, 100_000), 2: min(n, 100_000)}
    for label, src, items in (("in-memory", cached, ArrayItems), ("HDF5", lazy, H5Items)):
        for workers in (0, 2):
            extra = {"persistent_workers": False} if workers else {}
            samples = n - BATCH if workers or label == "in-memory" else min(n, 100_000)

            def ours(src=src, workers=workers, samples=samples, extra=extra, label=label):
                loader = TorchLoader(src, sampler(), num_workers=workers, per_epoch=False, **extra)
                return consume(loader, samples, f"TorchLoader, {label}, {workers} workers")

            budget = per_item_samples[workers] if label == "in-memory" else 10_000

            def plain(items=items, workers=workers, budget=budget, label=label):
                dl = torch.utils.data.DataLoader(items(), batch_size=BATCH, shuffle=True, num_workers=workers,
                                                 generator=torch.Generator().manual_seed(0))
                return consume(dl, budget, f"DataLoader per-item, {label}, {workers} workers")

            table.add_compared(f"TorchLoader, {label}, {workers} workers", ours,
                               f"DataLoader per-item __getitem__, {workers} workers", plain, 5, args.repeats)

    for workers in (0, 2):
        def grain_ours(workers=workers):
            return consume(GrainLoader(cached, sampler(), worker_count=workers), n - BATCH,
                           f"GrainLoader, in-memory, {workers} workers")

        def grain_plain(workers=workers):
            ds = grain.MapDataset.source(array).shuffle(seed=0).batch(BATCH)
            it = ds.to_iter_dataset()
            if workers:
                it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
            return consume(it, n - BATCH, f"Grain MapDataset pipeline, {workers} workers")

        table.add_compared(f"GrainLoader, in-memory, {workers} workers", grain_ours,
                           f"MapDataset.source().shuffle().batch(256), {workers} workers", grain_plain, 5, args.repeats)

    def grain_dataloader():
        dl = grain.DataLoader(
            data_source=array,
            sampler=grain.samplers.IndexSampler(n, shard_options=grain.sharding.NoSharding(), shuffle=True,
                                                num_epochs=1, seed=0),
            operations=[grain.transforms.Batch(BATCH)],
            worker_count=0,
        )
        return consume(dl, min(n, 10_000))

    table.add_compared("GrainLoader, in-memory, 0 workers", lambda: consume(GrainLoader(cached, sampler()), n - BATCH),
                       "grain.DataLoader + IndexSampler + Batch (default options)", grain_dataloader, 5, args.repeats)

    # Overhead rows read 5 epochs a run (~0.2 s): one epoch takes ~40 ms, short enough for
    # a scheduler hiccup on this shared machine to move a ratio by 10%.
    overhead_samples = 5 * n
    for label, src in (("in-memory", cached), ("HDF5", lazy)):
        def bare(src=src):
            return consume(Loader(src, sampler()), overhead_samples)

        table.add_compared(f"TorchLoader, {label}, 0 workers",
                           lambda src=src: consume(TorchLoader(src, sampler(), per_epoch=False), overhead_samples),
                           "bare Loader (overhead)", bare, 0.9, args.repeats)
        table.add_compared(f"GrainLoader, {label}, 0 workers",
                           lambda src=src: consume(GrainLoader(src, sampler()), overhead_samples),
                           "bare Loader (overhead)", bare, 0.9, args.repeats)
    cached.close()
    table.save(args.json)
    print("\nTime to the first batch (worker start-up), median seconds:")
    for label, secs in STARTUP.items():
        if "2 workers" in label:
            print(f"  {label}: {statistics.median(secs):.2f} s")
    os._exit(0)  # skip interpreter teardown of Grain's worker buffers


if __name__ == "__main__":
    main()
