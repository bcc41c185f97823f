"""Faults from outside: files changed under a run, whole process groups killed, long soaks,
HDF5 links to nothing, other data under the same names. Each test reproduces a failure
seen before the fix (a "Bus error" with no file named, leaked or pinned shared memory,
fill values read silently, another dataset resumed silently)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from loaders import DataError, H5CachedSource, H5Source, Loader, Sampler, StateMismatchError, TarSource

from .conftest import write_wds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


# --------------------------------------------------------------------------- SIGBUS
TRUNCATE = """
    import os, sys
    import numpy as np
    from loaders import H5Source, TarSource, _tar
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "tar-per-shard":
        _tar.map_span = lambda paths: None  # as on a platform without one address range
    src = TarSource(path) if kind.startswith("tar") else H5Source(path)
    src.read_batch(np.arange(len(src)))
    os.truncate(path, 0)  # another program rewrites the file while it is mapped
    src.read_batch(np.arange(len(src))[::-1])
    print("read past the end without a fault", flush=True)
"""


@pytest.mark.parametrize("kind", ["tar-span", "tar-per-shard", "h5-direct"])
def test_file_truncated_while_mapped_names_the_file(tmp_path, records, kind):
    x, y = records
    if kind.startswith("tar"):
        path = write_wds(tmp_path / "wds", x, y, maxcount=1000)[0]
    else:
        path = str(tmp_path / "d.h5")
        with h5py.File(path, "w") as f:
            f["x"] = np.repeat(x.reshape(len(x), -1), 64, axis=1)  # 12 KiB a record: many pages
    size = os.path.getsize(path)
    out = _run(TRUNCATE, kind, path)
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stdout, out.stderr)
    assert "tandem: bus error (SIGBUS)" in out.stderr and "a memory-mapped file changed size" in out.stderr
    assert f"  {path}: {size} bytes when mapped, now 0 bytes" in out.stderr, out.stderr
    assert "Stack (most recent call first)" in out.stderr  # where it was read


def test_file_changed_before_a_worker_opens_it_is_a_data_error(tmp_path, records):
    x, y = records
    path = write_wds(tmp_path / "wds", x, y, maxcount=1000)[0]
    src = TarSource(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=r"the shard shrank since it was indexed"):
        src.read_batch([0])


# --------------------------------------------------------------------------- shared memory
LOOP = """
    import sys
    from loaders import H5CachedSource, Sampler
    def main():
        framework, path = sys.argv[1], sys.argv[2]
        src = H5CachedSource(path)
        sampler = Sampler(len(src), 16, seed=0, num_epochs=None)
        if framework == "torch":
            from adapters.torch import TorchLoader
            loader = TorchLoader(src, sampler, num_workers=2)
        else:
            from adapters.grain import GrainLoader
            loader = GrainLoader(src, sampler, worker_count=2)
        n = 0
        while True:
            for _ in loader:
                n += 1
                if n == 20:
                    print("running", flush=True)
    if __name__ == "__main__":
        main()
"""


def _shm_h5(tmp_path, rows=2048, cols=1024):
    path = str(tmp_path / "cached.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    return path


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


@pytest.mark.parametrize("framework", ["torch", "grain"])
def test_group_kill_leaves_no_shared_memory_once_the_next_run_starts(tmp_path, framework):
    path = _shm_h5(tmp_path)
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(LOOP))
    before, shmem = set(os.listdir("/dev/shm")), _shmem_kib()
    proc = subprocess.Popen([sys.executable, str(script), framework, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        assert proc.stdout.readline() == "running\n", proc.stderr.read()
        ours = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("tandem_")}
        assert ours, "the workers hand batches over through named slots"
        slots_kib = sum(os.stat(f"/dev/shm/{n}").st_size for n in ours if os.path.exists(f"/dev/shm/{n}")) // 1024
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as timeout -s KILL, Slurm or an OOM kill of the cgroup do
        proc.communicate(timeout=60)
    # The cache (a memfd) needed no cleanup at all: its memory is already free.
    assert _shmem_kib() < shmem + 8 * 1024 // 2 + 2 * slots_kib
    # The slots' names outlive the group until the next loader starts and sweeps them.
    from adapters._slots import SlotReader, new_token

    SlotReader(new_token()).close()
    left = set(os.listdir("/dev/shm")) - before
    assert {n for n in left if n.startswith(("tandem_", "psm_"))} == set(), left


SOAK = """
    import gc, json, os, sys
    from loaders import H5CachedSource, Sampler
    def usage():
        with open("/proc/meminfo") as f:
            shmem = next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))
        with open(f"/proc/{os.getpid()}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"shmem": shmem, "fds": len(os.listdir(f"/proc/{os.getpid()}/fd")), "rss": rss}
    def main():
        framework, path, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
        src = H5CachedSource(path)
        sampler = Sampler(len(src), 64, seed=0, num_epochs=None)  # 8 MiB batches
        if framework == "torch":
            from adapters.torch import TorchLoader
            loader = TorchLoader(src, sampler, num_workers=2)
        else:
            from adapters.grain import GrainLoader
            loader = GrainLoader(src, sampler, worker_count=2)
        seen = []
        for epoch in range(epochs):
            for i, batch in enumerate(loader):
                if i == sampler.steps_per_epoch - 1:
                    break
            gc.collect()
            seen.append(usage())
        print(json.dumps(seen), flush=True)
    if __name__ == "__main__":
        main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "grain"])
def test_soak_keeps_shared_memory_descriptors_and_rss_flat(tmp_path, framework):
    """20 epochs, one ``for`` loop each, 2 workers, 8 MiB batches: what the main process holds
    must not grow with the epochs (it grew by the workers' slots, 64 MiB an epoch, before)."""
    import json

    path = _shm_h5(tmp_path, rows=512, cols=32768)
    script = tmp_path / "soak.py"
    script.write_text(textwrap.dedent(SOAK))
    epochs = 20
    out = subprocess.run([sys.executable, str(script), framework, path, str(epochs)], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    first, last = seen[2], seen[-1]  # after the first epochs' warm-up
    print(f"\n[{framework}] epoch 3: {first}; epoch {epochs}: {last}")
    assert last["fds"] <= first["fds"] + 2, seen
    assert last["shmem"] <= first["shmem"] + 32 * 1024, seen  # less than half an epoch's slots
    assert last["rss"] <= first["rss"] + 64 * 1024, seen


# --------------------------------------------------------------------------- HDF5 links and virtual datasets
def test_virtual_dataset_with_a_missing_source_file_is_refused(tmp_path):
    src_path, vds_path = tmp_path / "part0.h5", tmp_path / "virtual.h5"
    with h5py.File(src_path, "w") as f:
        f["x"] = np.arange(10.0)
    layout = h5py.VirtualLayout(shape=(10,), dtype="f8")
    layout[:] = h5py.VirtualSource("part0.h5", "x", shape=(10,))
    with h5py.File(vds_path, "w") as f:
        f.create_virtual_dataset("x", layout, fillvalue=-1)
    np.testing.assert_array_equal(H5Source(vds_path).read_batch([0, 9])["x"], [0.0, 9.0])  # found next to it
    os.remove(src_path)
    with h5py.File(vds_path) as f:
        assert f["x"][0] == -1  # what HDF5 returns, silently
    with pytest.raises(DataError, match=r"virtual\.h5: virtual dataset 'x' maps 'part0\.h5':'x', and that file is missing"):
        H5Source(vds_path)
    with pytest.raises(DataError, match=r"that file is missing"):
        H5CachedSource(vds_path, share=False)


def test_virtual_dataset_with_an_absolute_source_path_moved_along_is_read(tmp_path):
    """HDF5 falls back to the source's base name next to the virtual file: so must the check."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    with h5py.File(first / "part0.h5", "w") as f:
        f["x"] = np.arange(10.0)
    layout = h5py.VirtualLayout(shape=(10,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(first / "part0.h5"), "x", shape=(10,))
    with h5py.File(first / "virtual.h5", "w") as f:
        f.create_virtual_dataset("x", layout, fillvalue=-1)
    first.rename(moved)
    np.testing.assert_array_equal(H5Source(moved / "virtual.h5").read_batch([0, 9])["x"], [0.0, 9.0])


def test_links_to_nothing_are_named(tmp_path):
    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(4)
        f["gone"] = h5py.SoftLink("/missing")
        f["elsewhere"] = h5py.ExternalLink("nofile.h5", "/x")
    src = H5Source(path)  # by default they are skipped, and listed
    assert src.keys == ["x"]
    assert src.skipped == {"elsewhere": "external link to '/x' in 'nofile.h5', which cannot be opened",
                           "gone": "dangling soft link to '/missing'"}
    with pytest.raises(DataError, match=r"links\.h5: 'gone' leads to no dataset: dangling soft link to '/missing'$"):
        H5Source(path, keys=["x", "gone"])
    with pytest.raises(DataError, match=r"'elsewhere' leads to no dataset: external link to '/x' in 'nofile\.h5'"):
        H5Source(path, keys=["elsewhere"])


# --------------------------------------------------------------------------- content in the fingerprint
def test_other_data_under_the_same_names_is_refused_and_moved_data_resumes(tmp_path, records):
    x, y = records
    a = write_wds(tmp_path / "a", x, y)
    b = write_wds(tmp_path / "b", x[::-1].copy(), y[::-1].copy())  # same names, counts, dtypes, shapes
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "a", moved)
    time.sleep(0.01)
    os.utime(moved / os.path.basename(a[0]))  # a copy need not keep the mtime

    def state_of(shards):
        return Loader(TarSource(shards), Sampler(len(x), 32, seed=1)).state_dict()

    saved = state_of(a)
    loader = Loader(TarSource(sorted(str(p) for p in moved.iterdir())), Sampler(len(x), 32, seed=1))
    loader.load_state_dict(saved)  # the same bytes elsewhere: resumes
    other = Loader(TarSource(b), Sampler(len(x), 32, seed=1))
    with pytest.raises(StateMismatchError):
        other.load_state_dict(saved)

    h5a, h5b = tmp_path / "a.h5", tmp_path / "b" / "a.h5"
    for path, data in ((h5a, x), (h5b, x[::-1])):
        with h5py.File(path, "w") as f:
            f["x"] = data
    saved = Loader(H5Source(h5a), Sampler(len(x), 32, seed=1)).state_dict()
    with pytest.raises(StateMismatchError):
        Loader(H5Source(h5b), Sampler(len(x), 32, seed=1)).load_state_dict(saved)
    saved = Loader(H5CachedSource(h5a, share=False), Sampler(len(x), 32, seed=1)).state_dict()
    with pytest.raises(StateMismatchError):
        Loader(H5CachedSource(h5b, share=False), Sampler(len(x), 32, seed=1)).load_state_dict(saved)


HOLD = """
    import sys, time
    from adapters import _slots
    print(_slots._create(sys.argv[1], 4096), flush=True)
    time.sleep(60)
"""


def test_sweep_removes_only_segments_no_live_process_holds():
    """Liveness comes from the worker's lock on the file, never from a pid (pids mean nothing
    across containers sharing /dev/shm): a held segment stays whatever its name says."""
    from adapters._slots import new_token, sweep

    orphan = f"tandem_slot_{new_token()}_1_deadbeef"  # pid 1 is alive: a pid test would keep it
    with open(f"/dev/shm/{orphan}", "wb") as f:
        f.write(b"\0" * 64)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), "999999x0"], stdout=subprocess.PIPE,
                              text=True, env=ENV)  # a token naming a pid that does not exist here
    try:
        held = holder.stdout.readline().strip()
        assert held.startswith("tandem_slot_999999x0_")
        removed = sweep()
        assert orphan in removed and held not in removed
        assert os.path.exists(f"/dev/shm/{held}") and not os.path.exists(f"/dev/shm/{orphan}")
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert held in sweep()  # its holder is gone now


def test_loaders_work_without_dev_shm(monkeypatch, records, tmp_path):
    """Where /dev/shm does not exist (macOS), building and closing a loader must not touch it."""
    from adapters import _slots
    from adapters.torch import TorchLoader

    x, y = records
    src = TarSource(write_wds(tmp_path / "wds", x, y))
    isdir, listdir = os.path.isdir, os.listdir

    def no_dev_shm(p="."):
        if str(p).startswith("/dev/shm"):
            raise FileNotFoundError(p)
        return listdir(p)

    monkeypatch.setattr(os.path, "isdir", lambda p: False if str(p).startswith("/dev/shm") else isdir(p))
    monkeypatch.setattr(os, "listdir", no_dev_shm)
    loader = TorchLoader(src, Sampler(len(src), 10, seed=0), num_workers=0)
    assert len(next(iter(loader))["cls"]) == 10
    loader._reader.close()
    assert _slots.sweep() == []


def test_an_attached_cache_can_be_sent_on_and_a_closed_one_says_so():
    import copy
    import pickle

    from loaders.shm import SharedArrays

    owner = SharedArrays({"x": ((4,), np.float32)})
    owner.arrays["x"][:] = [1, 2, 3, 4]
    attached = pickle.loads(pickle.dumps(owner))
    again = copy.deepcopy(pickle.loads(pickle.dumps(attached)))  # a worker handing it to its own workers
    np.testing.assert_array_equal(again.arrays["x"], [1, 2, 3, 4])
    attached.close()  # an attached copy's close leaves the owner's memory alone
    np.testing.assert_array_equal(owner.arrays["x"], [1, 2, 3, 4])
    owner.close()
    with pytest.raises(DataError, match=r"^shared arrays memfd:tandem_cache .* were closed: they cannot be sent"):
        pickle.dumps(owner)
