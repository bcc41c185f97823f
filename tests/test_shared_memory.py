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


def _shmem_kib() -> int:
    """The machine's shared memory in use (tmpfs, memfd and SysV), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def _dev_shm() -> set[str]:
    """Named segments Tandem or Python's SharedMemory would make (other programs' are not ours)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(("tandem_", "psm_"))}


def _freed(before_kib: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _shmem_kib() < before_kib + ROWS * COLS * 4 // 1024 // 4:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["exit", "raise", "sigkill"])
def test_cache_memory_is_anonymous_and_freed_however_the_owner_ends(big_h5, mode):
    """A memfd: nothing named in /dev/shm at any time, and the memory is freed when the owner
    ends (exit, exception, SIGKILL) with no cleanup code running."""
    dev_shm, shmem = _dev_shm(), _shmem_kib()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, big_h5, "wait" if mode == "sigkill" else mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    label = proc.stdout.readline()
    assert label.startswith("memfd:tandem_cache"), label
    if mode == "sigkill":
        links = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        assert "/memfd:tandem_cache (deleted)" in links
        assert _shmem_kib() > shmem + ROWS * COLS * 4 // 1024 // 2  # the 32 MiB are there...
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode == 0) == (mode == "exit"), err
    assert _freed(shmem), f"the cache's memory outlived its owner ({mode}): Shmem {_shmem_kib()} KiB, was {shmem} KiB"
    assert _dev_shm() - dev_shm == set()


def test_contiguous_part_loads_only_its_rows(big_h5):
    with H5CachedSource(big_h5, part=ProcessPart(1, 4, "contiguous")) as part:
        assert part.nbytes == ROWS // 4 * COLS * 4
        np.testing.assert_array_equal(part.read_batch([ROWS // 4])["x"][0, :3], [ROWS // 4 * COLS + k for k in range(3)])
