"""H5CachedSource's shared memory: one copy for all workers, removed however the owner ends."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from loaders import H5CachedSource, ProcessPart

ROWS, COLS = 16384, 512  # 32 MiB of float32


@pytest.fixture(scope="module")
def big_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("shm") / "big.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS), chunks=(512, COLS))
    return str(path)


def _private_kib(pid: int) -> int:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Private_Clean"] + fields["Private_Dirty"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def _worker(src, queue):
    before = _private_kib(os.getpid())
    total = 0.0
    for a in range(0, ROWS, 1024):  # read every record through the source
        total += float(src.read_batch(np.arange(a, a + 1024))["x"][:, 0].sum())
    queue.put((total, _private_kib(os.getpid()) - before, _rss_kib(os.getpid())))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_workers_share_one_copy(big_h5, method, capsys):
    src = H5CachedSource(big_h5)
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(src, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    expected = float(np.arange(ROWS, dtype=np.float64).sum() * COLS)
    data_kib = src.nbytes // 1024
    with capsys.disabled():
        print(f"\n[{method}] cached part {data_kib} KiB; owner RSS {_rss_kib(os.getpid())} KiB; "
              + "; ".join(f"worker {i}: RSS {r} KiB, private growth {g} KiB" for i, (_, g, r) in enumerate(results)))
    for total, growth, rss in results:
        assert total == expected
        assert rss > data_kib // 2  # the worker really touched the data...
        assert growth < data_kib // 8  # ...through pages it does not own: no copy per worker
    src.close()


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from loaders import H5CachedSource
    src = H5CachedSource(sys.argv[1])
    print(src.shm_name, flush=True)
    mode = sys.argv[2]
    if mode == "raise":
        raise RuntimeError("boom")
    if mode == "wait":
        time.sleep(60)
    """
)


def _gone(name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/dev/shm/{name}"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_segment_removed_after_exit_or_exception(big_h5, mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, big_h5, mode], capture_output=True, text=True, timeout=120)
    name = out.stdout.split()[0]
    assert (out.returncode == 0) == (mode == "exit"), out.stderr
    assert not os.path.exists(f"/dev/shm/{name}")


def test_segment_removed_after_sigkill(big_h5):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, big_h5, "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    name = proc.stdout.readline().split()[0]
    assert os.path.exists(f"/dev/shm/{name}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert _gone(name), f"/dev/shm/{name} survived its owner's SIGKILL"


def test_contiguous_part_loads_only_its_rows(big_h5):
    with H5CachedSource(big_h5, part=ProcessPart(1, 4, "contiguous")) as part:
        assert part.nbytes == ROWS // 4 * COLS * 4
        np.testing.assert_array_equal(part.read_batch([ROWS // 4])["x"][0, :3], [ROWS // 4 * COLS + k for k in range(3)])
