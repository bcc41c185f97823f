"""nn_handler's datasets and sampler on Tandem: its documented usage, exact orders, resume, rank parts."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest

from loaders import ProcessPart, Sampler, StateMismatchError

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from torch.utils.data import DataLoader  # noqa: E402

from adapters.nn_handler import (  # noqa: E402
    EpochShuffleSampler,
    H5LazyDataset,
    RankMemCachedH5Dataset,
    TorchSampler,
    h5_worker_init_fn,
)

N = 203  # odd: the parts of 2 ranks differ by one record, and 32 does not divide it
X = np.arange(N * 4, dtype=np.uint8).reshape(N, 4) * 3  # record i is recognizable from x too
Y = np.arange(N, dtype=np.int64) * 10 + 1


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nn_handler") / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=X, compression="gzip", chunks=(7, 4))
        f.create_dataset("labels", data=Y, compression="gzip", chunks=(7,))
    return str(path)


def order(seed, epoch, n=N, shuffle="full"):
    """Tandem's epoch order of ``range(n)`` for a seed: what EpochShuffleSampler must yield."""
    return Sampler(n, 1, seed=seed, shuffle=shuffle, drop_remainder=False).epoch_order(epoch)


def batches_of(records, batch_size=32):
    return [records[i : i + batch_size] for i in range(0, len(records), batch_size)]


def run_epochs(loader, sampler, epochs):
    """nn_handler's loop: set_epoch, then every (x, y) batch, as numpy."""
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append([(x.numpy(), y.numpy()) for x, y in loader])
    return out


def expected(records, batch_size=32):
    """Batches ``(x, y)`` of the given file records, as RankMemCachedH5Dataset gives them (x as float32)."""
    return [(X[b].astype(np.float32), Y[b]) for b in batches_of(np.asarray(records), batch_size)]


def assert_batches(got, want):
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert gx.dtype == np.float32 and gy.dtype == np.int64
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


# --------------------------------------------------------------------------- the documented usage
@pytest.mark.parametrize("workers", [0, 2])
def test_documented_usage_gives_tandem_order(h5_file, workers):
    dataset = RankMemCachedH5Dataset(path=h5_file, x_key="images", y_key="labels", mode="contiguous")
    sampler = EpochShuffleSampler(data_len=len(dataset), seed=42, shuffle=True)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers, pin_memory=False)
    assert (len(dataset), len(sampler), len(loader)) == (N, N, 7)
    got = run_epochs(loader, sampler, [0, 1])
    for epoch in (0, 1):
        assert_batches(got[epoch], expected(order(42, epoch)))
    assert [len(b[1]) for b in got[0]] == [32] * 6 + [11]
    assert not np.array_equal(order(42, 0), order(42, 1))  # another order every epoch
    assert sorted(order(42, 1).tolist()) == list(range(N))


def test_epoch_shuffle_sampler_orders():
    a, b = EpochShuffleSampler(N, seed=5), EpochShuffleSampler(N, seed=5)
    assert list(a) == list(b) == order(5, 0).tolist()  # same seed, same order
    assert list(EpochShuffleSampler(N, seed=6)) != list(a)
    a.set_epoch(3)
    assert list(a) == order(5, 3).tolist() and list(a) != list(b)
    assert list(EpochShuffleSampler(N, seed=5, shuffle=False)) == list(range(N))
    # nn_handler's seed + epoch: (1, epoch 0) and (0, epoch 1) are different orders here
    one = EpochShuffleSampler(N, seed=0)
    one.set_epoch(1)
    assert list(one) != list(EpochShuffleSampler(N, seed=1))
    # the DataLoader's batch size only cuts the order
    loaders = [DataLoader(range(N), batch_size=b, sampler=EpochShuffleSampler(N, seed=5)) for b in (1, 7, 32)]
    assert [torch.cat(list(dl)).tolist() for dl in loaders] == [order(5, 0).tolist()] * 3
    assert (a.data_len, a.base_seed, a.shuffle, a.epoch) == (N, 5, True, 3)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        EpochShuffleSampler(N, seed=-1)


@pytest.mark.parametrize(
    ("kwargs", "lengths"),
    [
        ({"batch_size": 4, "drop_remainder": False}, [6, 4]),  # global: the last batch is 8, 9 | padding
        ({"batch_size": 4, "drop_remainder": True}, [4, 4]),
        ({"batch_size": 4, "drop_remainder": False, "mode": "contiguous"}, [5, 5]),
        ({"batch_size": 6, "drop_remainder": False, "mode": "interleave"}, [5, 5]),
        ({"batch_size": 6, "drop_remainder": True, "mode": "interleave"}, [3, 3]),
    ],
)
def test_torch_sampler_yields_tandem_indices_without_padding(kwargs, lengths):
    kwargs = dict(kwargs)  # the parameter is shared between runs
    mode = kwargs.pop("mode", "global")
    views = [TorchSampler(Sampler(10, seed=2, part=ProcessPart(i, 2, mode), **kwargs), epoch=1) for i in range(2)]
    assert [len(v) for v in views] == lengths
    for v in views:
        s = v.sampler
        want = []
        for step in range(s.steps_per_epoch, 2 * s.steps_per_epoch):
            idx, mask = s.indices_and_mask(step)
            want += (idx if mask is None else idx[mask]).tolist()
        assert list(v) == want and len(want) == len(v)
    if not kwargs["drop_remainder"]:  # the two processes read every record once
        assert sorted(list(views[0]) + list(views[1])) == list(range(10))


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch_exactly(h5_file, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        dataset = RankMemCachedH5Dataset(h5_file, "images", "labels")
        sampler = EpochShuffleSampler(len(dataset), seed=7)
        return sampler, StatefulDataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers)

    sampler, loader = make()
    sampler.set_epoch(0)
    it = iter(loader)
    taken = [next(it) for _ in range(3)]
    state = copy.deepcopy(loader.state_dict())
    assert_batches([(x.numpy(), y.numpy()) for x, y in taken], expected(order(7, 0))[:3])
    del it

    sampler2, loader2 = make()
    loader2.load_state_dict(state)
    got = run_epochs(loader2, sampler2, [0, 1])  # the resume loop calls set_epoch(0) first: kept
    assert_batches(got[0], expected(order(7, 0))[3:])
    assert_batches(got[1], expected(order(7, 1)))
    assert sampler2.state_dict()["yielded"] == N and sampler2.epoch == 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["at_last_batch", "after_epoch"])
def test_stateful_dataloader_resumes_at_an_epoch_end(workers, where):
    """A state taken at the last batch (inside the loop) or after the loop: the next epoch is set_epoch's."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        sampler = EpochShuffleSampler(50, seed=1)
        return sampler, StatefulDataLoader(range(50), batch_size=8, sampler=sampler, num_workers=workers)

    sampler, loader = make()
    sampler.set_epoch(0)
    for i, _ in enumerate(loader):
        if i == 6 and where == "at_last_batch":
            state = copy.deepcopy(loader.state_dict())
    if where == "after_epoch":
        state = copy.deepcopy(loader.state_dict())
    sampler2, loader2 = make()
    loader2.load_state_dict(state)
    start = 0 if where == "at_last_batch" else 1  # the epoch the user's loop resumes at
    got = []
    for epoch in range(start, 2):
        sampler2.set_epoch(epoch)
        got.append([b.tolist() for b in loader2])
    want = batches_of(order(1, 1, 50).tolist(), 8)
    assert got == ([[]] if start == 0 else []) + [want]


def test_plain_dataloader_resumes_through_the_sampler_state(h5_file):
    dataset = RankMemCachedH5Dataset(h5_file, "images", "labels")
    sampler = EpochShuffleSampler(len(dataset), seed=9)
    sampler.set_epoch(2)
    it = iter(DataLoader(dataset, batch_size=32, sampler=sampler))
    next(it), next(it)
    state = json.loads(json.dumps(sampler.state_dict()))  # plain JSON
    assert state == {
        "epoch": 2,
        "yielded": 64,
        "fingerprint": hashlib.sha256(sampler.sampler.describe().encode()).hexdigest()[:16],
        "sampler": "Sampler(num_records=203, batch_size=1, seed=9, shuffle='full', drop_remainder=False, mode='global', order=2)",
    }
    fresh = EpochShuffleSampler(len(dataset), seed=9)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # load then save, without iterating, changes nothing
    fresh.set_epoch(2)  # the same epoch keeps the position
    got = [(x.numpy(), y.numpy()) for x, y in DataLoader(dataset, batch_size=32, sampler=fresh)]
    assert_batches(got, expected(order(9, 2)[64:]))
    fresh.set_epoch(3)
    assert list(fresh) == order(9, 3).tolist()
    fresh.load_state_dict(state)
    fresh.set_epoch(4)  # another epoch starts afresh
    assert list(fresh) == order(9, 4).tolist()


def test_state_of_another_sampler_is_refused():
    state = EpochShuffleSampler(N, seed=1).state_dict()
    other = EpochShuffleSampler(N, seed=2)
    fp = {s: hashlib.sha256(EpochShuffleSampler(N, seed=s).sampler.describe().encode()).hexdigest()[:16] for s in (1, 2)}
    desc = "Sampler(num_records=203, batch_size=1, seed={}, shuffle='full', drop_remainder=False, mode='global', order=2)"
    with pytest.raises(StateMismatchError) as e:
        other.load_state_dict(state)
    assert str(e.value) == (
        "this sampler state was saved for another order; refusing to resume.\n"
        f"  saved:   {fp[1]}\n    sampler: {desc.format(1)}\n"
        f"  current: {fp[2]}\n    sampler: {desc.format(2)}"
    )
    with pytest.raises(StateMismatchError, match=r"^sampler state is missing fingerprint, sampler \(expected: epoch, "):
        other.load_state_dict({"epoch": 0, "yielded": 3})
    with pytest.raises(StateMismatchError, match=r"^sampler state has yielded 204 indices, past this epoch's 203$"):
        other.load_state_dict({**other.state_dict(), "yielded": 204})
    with pytest.raises(StateMismatchError, match=r"^sampler state: yielded must be an int, got '3' \(str\)$"):
        other.load_state_dict({**other.state_dict(), "yielded": "3"})
    assert list(other) == order(2, 0).tolist()  # a refused state changed nothing


def test_stateful_dataloader_refuses_another_samplers_state(h5_file):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = RankMemCachedH5Dataset(h5_file, "images", "labels")
    loader = StatefulDataLoader(dataset, batch_size=32, sampler=EpochShuffleSampler(N, seed=1))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = StatefulDataLoader(dataset, batch_size=32, sampler=EpochShuffleSampler(N, seed=2))
    other.load_state_dict(state)
    with pytest.raises(StateMismatchError, match=r"^this sampler state was saved for another order; refusing"):
        next(iter(other))


# --------------------------------------------------------------------------- rank parts
@pytest.mark.parametrize(
    ("mode", "parts"),
    [
        ("contiguous", [np.arange(0, 102), np.arange(102, N)]),  # nn_handler's balanced slices
        ("interleave", [np.arange(0, N, 2), np.arange(1, N, 2)]),
    ],
)
def test_two_ranks_cover_every_record_once_per_epoch(h5_file, mode, parts):
    seen = {0: [], 1: []}
    for rank in range(2):
        dataset = RankMemCachedH5Dataset(h5_file, "images", "labels", mode=mode, rank=rank, world_size=2)
        np.testing.assert_array_equal(dataset.records, parts[rank])
        sampler = EpochShuffleSampler(len(dataset), seed=3)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        got = run_epochs(loader, sampler, [0, 1])
        assert len(dataset) == len(sampler) == len(parts[rank])
        for epoch in (0, 1):
            assert_batches(got[epoch], expected(parts[rank][order(3, epoch, len(dataset))]))
            seen[epoch] += [i for _, y in got[epoch] for i in ((y - 1) // 10).tolist()]
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(N))


def test_rank_arguments_and_mode_are_checked(h5_file):
    with pytest.raises(ValueError, match=r"^pass rank= and world_size= together"):
        RankMemCachedH5Dataset(h5_file, "images", rank=1)
    with pytest.raises(ValueError, match=r"^mode must be 'contiguous' or 'interleave', got 'global'$"):
        RankMemCachedH5Dataset(h5_file, "images", mode="global")


# --------------------------------------------------------------------------- items and options
def test_items_are_views_of_the_cached_part(h5_file):
    seen = []
    dataset = RankMemCachedH5Dataset(
        h5_file, "images", x_dtype=None, rank=1, world_size=2, transform=lambda x: seen.append(x) or x * 2
    )
    x = dataset[3]  # x only: no y_key
    np.testing.assert_array_equal(x.numpy(), X[105].astype(np.int64) * 2 % 256)
    assert seen[0].dtype == torch.uint8  # no cast: a view of the shared part, no copy
    assert seen[0].untyped_storage().data_ptr() == dataset._tensors[0].untyped_storage().data_ptr()
    pair = RankMemCachedH5Dataset(h5_file, "images", "labels", y_dtype=np.float64, target_transform=lambda y: -y)
    x, y = pair[5]
    assert (x.dtype, y.dtype) == (torch.float32, torch.float64)
    np.testing.assert_array_equal(x.numpy(), X[5].astype(np.float32))
    assert y.item() == -51.0


def test_pin_host_memory(h5_file):
    if torch.cuda.is_available():
        dataset = RankMemCachedH5Dataset(h5_file, "images", "labels", pin_host_memory=True)
        assert dataset.pinned and dataset._tensors[0].is_pinned() and dataset._tensors[1].is_pinned()
    else:
        with pytest.warns(RuntimeWarning, match=r"^pin_host_memory=True, but CUDA is not available, so the cached"):
            dataset = RankMemCachedH5Dataset(h5_file, "images", "labels", pin_host_memory=True)
        assert not dataset.pinned
    x, y = dataset[7]
    np.testing.assert_array_equal(x.numpy(), X[7].astype(np.float32))
    assert y.item() == Y[7]


def test_spawned_worker_reads_the_shared_part(h5_file):
    dataset = RankMemCachedH5Dataset(h5_file, "images", "labels", mode="interleave", rank=0, world_size=2)
    sampler = EpochShuffleSampler(len(dataset), seed=4)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=1, multiprocessing_context="spawn")
    got = run_epochs(loader, sampler, [0])[0]
    assert_batches(got, expected(np.arange(0, N, 2)[order(4, 0, len(dataset))]))


@pytest.mark.parametrize("workers", [0, 2])
def test_h5_lazy_dataset(h5_file, workers):
    dataset = H5LazyDataset(h5_file, "images", "labels", x_dtype=np.float32, rdcc_nbytes=0)
    sampler = EpochShuffleSampler(len(dataset), seed=11)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers, worker_init_fn=h5_worker_init_fn)
    got = run_epochs(loader, sampler, [1])[0]
    assert_batches(got, expected(order(11, 1)))
    x, y = dataset[-1]
    np.testing.assert_array_equal(x.numpy(), X[-1].astype(np.float32))
    assert y.item() == Y[-1] and len(dataset) == N
    assert H5LazyDataset(h5_file, "images")[2].dtype == torch.uint8  # x only, the file's dtype
    assert h5_worker_init_fn(0) is None
