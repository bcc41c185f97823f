"""One state across frameworks: torch and Grain adapters, 0 and 2 workers, every source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from loaders import H5CachedSource, H5Source, Loader, ProcessPart, Sampler, StateMismatchError, TarSource

torch = pytest.importorskip("torch")
pytest.importorskip("grain")

from adapters.grain import GrainLoader  # noqa: E402
from adapters.jax import split_for_devices  # noqa: E402
from adapters.torch import TorchLoader, create_dataloader, create_native_atek_dataloader  # noqa: E402

BATCH = 64  # 300 records: 4 steps an epoch, so 7 steps cross an epoch boundary
STEPS = 7
ADAPTERS = [("torch", 0), ("torch", 2), ("grain", 0), ("grain", 2)]


def source(kind, request):
    if kind == "tar":
        return TarSource(request.getfixturevalue("wds_shards"))
    path = request.getfixturevalue("h5_path")
    return H5Source(path, keys=["x", "y"]) if kind == "h5" else H5CachedSource(path, keys=["x", "y"])


def adapter(framework, workers, src, seed=11):
    sampler = Sampler(len(src), BATCH, seed=seed, shuffle="full")
    if framework == "torch":
        return TorchLoader(src, sampler, num_workers=workers, per_epoch=False)
    return GrainLoader(src, sampler, worker_count=workers)


def numpy_batches(batches):
    return [{k: np.array(v) for k, v in b.items()} for b in batches]


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return numpy_batches(out)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def reference_cache():
    return {}


def reference(kind, request, cache):
    if kind not in cache:
        src = source(kind, request)
        loader = Loader(src, Sampler(len(src), BATCH, seed=11, shuffle="full"))
        cache[kind] = take(loader, STEPS)
    return cache[kind]


@pytest.mark.parametrize("framework,workers", ADAPTERS)
@pytest.mark.parametrize("kind", ["tar", "h5", "h5_cached"])
def test_adapters_yield_identical_batches(kind, framework, workers, request, reference_cache):
    loader = adapter(framework, workers, source(kind, request))
    got = take(loader, STEPS)
    assert loader.step == STEPS
    assert_same(got, reference(kind, request, reference_cache))


CROSS = [
    (("torch", 2), ("grain", 0)),
    (("grain", 2), ("torch", 0)),
    (("torch", 2), ("torch", 0)),
    (("grain", 0), ("grain", 2)),
]


@pytest.mark.parametrize("saver,restorer", CROSS)
@pytest.mark.parametrize("kind", ["tar", "h5_cached"])
def test_state_moves_between_frameworks_and_worker_counts(kind, saver, restorer, request, reference_cache):
    k = 3
    first = adapter(*saver, source(kind, request))
    head = take(first, k)
    state = first.state_dict()
    assert state["step"] == k  # what the consumer took, whatever the workers prefetched
    second = adapter(*restorer, source(kind, request))
    second.load_state_dict(state)
    assert_same(head + take(second, STEPS - k), reference(kind, request, reference_cache))


def test_torch_loader_iterates_one_epoch_per_for_loop(request, reference_cache):
    src = source("h5", request)
    loader = TorchLoader(src, Sampler(len(src), BATCH, seed=11), num_workers=2, persistent_workers=True)
    epochs = [numpy_batches(list(loader)) for _ in range(2)]
    assert [len(e) for e in epochs] == [4, 4] and loader.step == 8
    assert_same(epochs[0] + epochs[1][:3], reference("h5", request, reference_cache))


@pytest.mark.parametrize("group", [1, 3, None])
def test_torch_workers_read_groups_of_batches(group, request, reference_cache):
    """Grouped DataLoader items (batches_per_item) change the hand-off, never the batches."""
    src = source("h5", request)
    sampler = Sampler(len(src), BATCH, seed=11, num_epochs=2)
    loader = TorchLoader(src, sampler, num_workers=2, batches_per_item=group)
    epochs = [numpy_batches(list(loader)) for _ in range(2)]
    assert [len(e) for e in epochs] == [4, 4] and loader.step == 8  # groups end at the epoch's end
    assert_same(epochs[0] + epochs[1][:3], reference("h5", request, reference_cache))
    if group is None:  # the first batch (64 x 200 bytes) decided: as many as fit in 1 MiB, at most 8
        assert loader.dataloader.sampler.group == 8
    resumed = TorchLoader(src, sampler, num_workers=2, batches_per_item=group)
    resumed.load_state_dict({**loader.state_dict(), "step": 5})  # not a multiple of the group
    assert_same(numpy_batches(list(resumed)), epochs[1][1:])
    with pytest.raises(ValueError, match="batches_per_item must be at least 1, got 0"):
        TorchLoader(src, sampler, num_workers=2, batches_per_item=0)


def bare_batches(src, sampler, steps):
    """What the bare Loader gives for ``steps`` (a pure function of the step)."""
    loader = Loader(src, sampler)
    return numpy_batches([loader.get_batch(s) for s in steps])


def first(iterator, n):
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) == n:
            break
    return numpy_batches(out)


@pytest.mark.parametrize("framework,workers", ADAPTERS)
def test_iter_from_streams_from_any_step_and_leaves_the_state_alone(framework, workers, request):
    src = source("h5", request)
    loader = adapter(framework, workers, src)
    take(loader, 2)
    assert_same(first(loader.iter_from(3), 5), bare_batches(src, loader.sampler, range(3, 8)))  # crosses an epoch
    assert loader.state_dict()["step"] == 2 and loader.step == 2


@pytest.mark.parametrize("framework", ["torch", "grain"])
def test_iter_from_runs_to_the_sampler_end_and_refuses_steps_outside_it(framework, request):
    src = source("h5", request)
    sampler = Sampler(len(src), BATCH, seed=11, num_epochs=2)  # 8 steps
    loader = TorchLoader(src, sampler) if framework == "torch" else GrainLoader(src, sampler)
    # per_epoch (torch's default) does not cut iter_from at an epoch's end
    assert_same(numpy_batches(list(loader.iter_from(2))), bare_batches(src, sampler, range(2, 8)))
    assert list(loader.iter_from(8)) == []  # the end: nothing left, as after a state saved there
    past = r"cannot start at step {}: the sampler has steps 0 to 7 \(2 epoch\(s\) of 4\); 8, its end, gives no batches$"
    for step in (-1, 9):
        with pytest.raises(IndexError, match=past.format(step)):
            loader.iter_from(step)
    with pytest.raises(StateMismatchError, match=r"loader state is at step 9, past the end of this sampler "
                                                 r"\(8 steps: 2 epoch\(s\) of 4\)"):
        loader.load_state_dict({**loader.state_dict(), "step": 9})
    assert loader.step == 0
    endless = TorchLoader(src, Sampler(len(src), BATCH)) if framework == "torch" else GrainLoader(src, Sampler(len(src), BATCH))
    with pytest.raises(IndexError, match=r"^cannot start at step -1: steps start at 0$"):
        endless.iter_from(-1)
    assert len(first(endless.iter_from(10**6), 2)) == 2


@pytest.mark.parametrize("framework", ["torch", "grain"])
def test_without_ordered_memory_workers_use_the_framework_hand_off(framework, request, reference_cache, monkeypatch):
    """Off x86-64 the slots' overwrite check does not hold: the default falls back, True is refused."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    src = source("h5", request)
    sampler = Sampler(len(src), BATCH, seed=11, shuffle="full")
    if framework == "torch":
        loader = TorchLoader(src, sampler, num_workers=2, per_epoch=False)
        assert loader.dataloader.dataset.slots == 0
    else:
        loader = GrainLoader(src, sampler, worker_count=2)
        assert loader.shared_slots is False
    assert_same(take(loader, 3), reference("h5", request, reference_cache)[:3])
    with pytest.raises(ValueError, match=r"^shared_slots=True needs an x86-64 machine, and this one is 'aarch64'"):
        if framework == "torch":
            TorchLoader(src, sampler, num_workers=2, shared_slots=True)
        else:
            GrainLoader(src, sampler, worker_count=2, shared_slots=True)


def test_worker_slots_carry_several_batches():
    from adapters._slots import SlotReader, SlotWriter

    writer, reader = SlotWriter(slots=2, token="t1"), SlotReader("t1")
    batches = [{"x": np.full((i + 1, 3), i, np.int16), "tag": f"b{i}"} for i in range(3)]
    got = reader.take(writer.put_many(batches))
    assert [b["tag"] for b in got] == ["b0", "b1", "b2"]
    for b, g in zip(batches, got, strict=True):
        assert g["x"].dtype == np.int16
        np.testing.assert_array_equal(g["x"], b["x"])
    reader.close()


def test_torch_batches_are_tensors(request):
    loader = adapter("torch", 0, source("h5", request))
    batch = next(iter(loader))
    assert batch["x"].dtype == torch.uint8 and tuple(batch["x"].shape) == (BATCH, 3, 8, 8)
    assert batch["y"].dtype == torch.int64


def test_torch_worker_random_streams_differ_per_rank(h5_path):
    """Workers seed numpy.random / random from the DataLoader's generator: ranks must not share it."""
    src = H5Source(h5_path)
    seeds = {TorchLoader(src, Sampler(len(src), 8, seed=3, part=ProcessPart(r, 2))).dataloader.generator.initial_seed()
             for r in (0, 1)}
    assert len(seeds) == 2


def test_restore_mid_iteration_starts_over_at_the_state(request, reference_cache):
    loader = adapter("torch", 0, source("h5", request))
    it = iter(loader)
    next(it)
    saved = loader.state_dict()
    next(it)
    loader.load_state_dict(saved)
    assert_same(take(loader, 2), reference("h5", request, reference_cache)[1:3])


def test_state_from_other_data_is_refused(request):
    tar = adapter("grain", 0, source("tar", request))
    take(tar, 1)
    h5 = adapter("torch", 0, source("h5", request))
    with pytest.raises(StateMismatchError, match=r"(?s)saved:.*TarSource.*current:.*H5Source"):
        h5.load_state_dict(tar.get_state())
    other_seed = adapter("grain", 0, source("tar", request), seed=12)
    with pytest.raises(StateMismatchError, match="seed=11.*\n.*\n.*\n.*seed=12"):
        other_seed.set_state(tar.get_state())


def test_batch_that_does_not_split_over_devices():
    with pytest.raises(ValueError, match=r"batch key 'x' has 30 records, which do not split over 4 devices"):
        split_for_devices({"x": np.zeros((30, 2))}, 4)
    out = split_for_devices({"x": np.arange(8).reshape(8, 1)}, 4)
    assert out["x"].shape == (4, 2, 1) and out["x"][3, 1, 0] == 7


@pytest.mark.parametrize("module,install", [("torch", "pip install torch==2.13.0"), ("grain", "pip install -e '.[jax]'")])
def test_missing_framework_names_the_install_command(module, install):
    code = f"import sys; sys.modules[{module!r}] = None; import adapters.{module}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"ImportError: the {'PyTorch' if module == 'torch' else 'Grain'} adapter needs {module}" in out.stderr
    assert install in out.stderr


def test_atek_style_factory(request, records):
    shards = request.getfixturevalue("wds_shards")
    loader = create_native_atek_dataloader(
        shards, dict_key_mapping={"npy": "image", "cls": "label"}, batch_size=10, shuffle_flag=True, num_workers=0
    )
    batches = list(loader)
    assert len(batches) == 30 and set(batches[0]) - {"__key__", "__url__"} == {"image", "label"}  # ATEK keeps both
    labels = sorted(int(v) for b in batches for v in b["label"])
    assert labels == sorted(records[1].tolist())
    # drop_last=False with a remainder: a short last batch, as webdataset's .batched(partial=True) gives
    sevens = list(create_native_atek_dataloader(shards, dict_key_mapping={"cls": "label"}, batch_size=7))
    assert [len(b["label"]) for b in sevens] == [7] * 42 + [6] and set(sevens[-1]) - {"__key__", "__url__"} == {"label"}
    assert sorted(int(v) for b in sevens for v in b["label"]) == sorted(records[1].tolist())
    repeated = create_native_atek_dataloader(shards, dict_key_mapping={"cls": "label"}, batch_size=100, repeat_flag=True,
                                             shuffle_flag=True)
    seen = []
    for batch in repeated:  # ATEK's repeat_flag: one loop runs on past the epoch
        seen.append(sorted(batch["label"].tolist()))
        if len(seen) == 7:
            break
    assert len(seen) == 7 and sorted(sum(seen[:3], [])) == sorted(records[1].tolist())
    single = create_native_atek_dataloader(shards, data_transform_fn=lambda s: {"cls": s["cls"] + 100})
    first = next(iter(single))
    assert first == {"cls": int(records[1][0]) + 100}


def test_helios_style_factory(request):
    src = source("h5", request)
    loader, sampler = create_dataloader(src, random_seed=5, batch_size=32, shuffle=True, drop_last=True)
    assert isinstance(sampler, Sampler) and sampler.batch_size == 32 and len(loader) == 9
    batches = list(loader)
    assert len(batches) == 9
    resumed, _ = create_dataloader(src, random_seed=5, batch_size=32, shuffle=True, drop_last=True)
    resumed.load_state_dict({**loader.state_dict(), "step": 4})
    assert_same(numpy_batches(list(resumed)), numpy_batches(batches[4:]))
    with pytest.raises(TypeError, match="sampler must be a loaders.Sampler"):
        create_dataloader(src, sampler=object())


def test_device_batches_on_four_cpu_devices(tmp_path):
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from adapters.jax import device_batches, process_part
        batches = [{"x": np.full((8, 3), i, np.float32)} for i in range(5)]
        out = list(device_batches(iter(batches), copy=True))
        assert len(out) == 5 and out[4]["x"].shape == (4, 2, 3)
        host = list(device_batches(iter(batches)))  # CPU devices: no copy ahead, pmap takes numpy
        assert isinstance(host[4]["x"], np.ndarray) and host[4]["x"].shape == (4, 2, 3)
        for thread in (False, True):
            for size in (1, 2, 9):
                got = list(device_batches(iter(batches), size=size, thread=thread))
                assert [float(b["x"][0, 0, 0]) for b in got] == [0, 1, 2, 3, 4], (thread, size)

            def failing():
                yield batches[0]
                raise OSError("disk gone")
            it = device_batches(failing(), thread=thread)
            assert float(next(it)["x"][0, 0, 0]) == 0
            try:
                next(it)
                raise AssertionError("no error")
            except OSError as e:
                assert str(e) == "disk gone"
        assert [s.device for s in out[0]["x"].addressable_shards] == jax.local_devices()
        f = jax.pmap(lambda a: jax.lax.psum(a.sum(), "d"), axis_name="d")
        assert float(f(host[2]["x"])[0]) == float(f(out[2]["x"])[0])
        print(float(f(out[2]["x"])[0]), process_part())
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "48.0 ProcessPart(index=0, count=1, mode='global')"


def test_cached_source_in_process_shard(request):
    path = request.getfixturevalue("h5_path")
    part = ProcessPart(1, 2, "interleave")
    src = H5CachedSource(path, keys=["y"], part=part)
    loader = TorchLoader(src, Sampler(len(src), 16, seed=0, part=part), num_workers=2)
    ys = take(loader, 3)
    assert all(b["y"].shape == (8,) for b in ys)
    src.close()


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_torch_workers_under_spawn_and_forkserver(context, request, reference_cache):
    """Sources pickle into spawned workers without an init hook; batches are unchanged."""
    src = source("h5", request)
    loader = TorchLoader(src, Sampler(len(src), BATCH, seed=11, shuffle="full"), num_workers=2,
                         multiprocessing_context=context, per_epoch=False, prefetch_factor=2)
    assert_same(take(loader, STEPS), reference("h5", request, reference_cache))


ORPHAN = textwrap.dedent(
    """
    import sys, time
    from absl import flags
    from loaders import H5Source, Sampler
    from adapters.grain import GrainLoader
    if __name__ == "__main__":
        flags.FLAGS.mark_as_parsed()
        src = H5Source(sys.argv[1])
        it = iter(GrainLoader(src, Sampler(len(src), 30, seed=0), worker_count=2))
        next(it)
        print("ready", flush=True)
        time.sleep(120)
    """
)


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_grain_workers_exit_when_their_parent_is_killed(tmp_path, request):
    """SIGKILL of the training process alone must not leave its Grain workers behind."""
    import signal
    import time

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen([sys.executable, str(script), request.getfixturevalue("h5_path")],
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "ready"
    workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    def alive():
        running = []
        for p in workers:
            try:
                with open(f"/proc/{p}/status") as f:
                    if "State:\tZ" not in f.read():
                        running.append(p)
            except FileNotFoundError:
                pass
        return running

    deadline = time.monotonic() + 15
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"Grain workers {alive()} outlived their killed parent"


def test_worker_slots_round_trip_and_refuse_an_overwritten_slot():
    from adapters._slots import SlotReader, SlotWriter

    writer, reader = SlotWriter(slots=1, token="t0"), SlotReader("t0")
    first = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "name": ["a", "b", "c"], "y": np.array([1, 2, 3])}
    ref0 = writer.put(first)
    got = reader.take(ref0)
    assert list(got) == ["x", "name", "y"] and got["name"] == ["a", "b", "c"]
    np.testing.assert_array_equal(got["x"], first["x"])
    writer.put({"x": np.zeros((3, 4), np.float32), "name": [], "y": np.zeros(3, np.int64)})  # reuses the one slot
    with pytest.raises(RuntimeError, match=r"slot tandem_slot_t0_\d+_\w+ was overwritten before reading batch #0 \(holds #1\)"):
        reader.take(ref0)
    big = writer.put({"x": np.ones((1000, 4), np.float32)})  # does not fit: the slot grows
    assert reader.take(big)["x"].shape == (1000, 4)
    reader.close()
    for entry in writer.segments:
        assert not os.path.exists(f"/dev/shm/{entry[0]}")


@pytest.mark.parametrize("framework", ["torch", "grain"])
def test_workers_leave_no_slots_behind(framework, request):
    import gc

    before = {f for f in os.listdir("/dev/shm") if f.startswith("tandem_slot_")}
    loader = adapter(framework, 2, source("h5", request))
    assert len(take(loader, 6)) == 6  # stops with batches still in flight
    del loader
    gc.collect()
    after = {f for f in os.listdir("/dev/shm") if f.startswith("tandem_slot_")}
    assert after <= before


MULTI = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    from loaders import H5Source, Loader, Sampler
    from adapters.grain import GrainLoader
    from adapters.jax import process_part
    spec = process_part()
    src = H5Source(sys.argv[3], keys=["y"])
    loader = GrainLoader(src, Sampler(len(src), 64, seed=5, part=spec))
    ys = [b["y"].tolist() for _, b in zip(range(3), loader)]
    print(json.dumps({"index": spec.index, "count": spec.count, "ys": ys}), flush=True)
    jax.distributed.shutdown()
    """
)


def test_two_jax_processes_take_their_slices_of_the_global_batch(tmp_path, request):
    import socket

    path = request.getfixturevalue("h5_path")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    reports = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["index"])
    assert [(r["index"], r["count"]) for r in reports] == [(0, 2), (1, 2)]
    src = H5Source(path, keys=["y"])
    whole = [b["y"].tolist() for _, b in zip(range(3), Loader(src, Sampler(len(src), 64, seed=5)), strict=False)]
    assert [a + b for a, b in zip(reports[0]["ys"], reports[1]["ys"], strict=True)] == whole
