"""Sampler properties: coverage, disjoint ranks, equal steps, process-count independence, the
bijection behind the order (exhaustive on many sizes), its statistical quality, the order's
version in the resume fingerprint, and batches that cost the same at any number of records."""

from __future__ import annotations

import hashlib
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loaders._sampler as sampler_module
from loaders import Loader, LoaderState, ProcessPart, Sampler, StateMismatchError
from loaders._sampler import _keys, _ListedBlocks, _permute, _rounds, _split, _split_array, _UniformBlocks

SETTINGS = settings(max_examples=60, deadline=None)


def epoch_records(sampler: Sampler, epoch: int):
    steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
    out, masks = [], []
    for s in steps:
        idx, mask = sampler.indices_and_mask(s)
        out.append(idx)
        masks.append(np.ones(len(idx), bool) if mask is None else mask)
    return np.concatenate(out), np.concatenate(masks)


@SETTINGS
@given(
    n=st.integers(1, 400),
    b=st.integers(1, 64),
    seed=st.integers(0, 2**31),
    shuffle=st.sampled_from(["none", "full", "block"]),
    drop=st.booleans(),
)
def test_one_process_epoch_visits_each_record_once(n, b, seed, shuffle, drop):
    if drop and b > n:
        with pytest.raises(ValueError, match="no full batch"):
            Sampler(n, b, seed=seed, shuffle=shuffle, drop_remainder=drop, blocks=7)
        return
    s = Sampler(n, b, seed=seed, shuffle=shuffle, drop_remainder=drop, blocks=7, window=2)
    for epoch in (0, 3):
        idx, mask = epoch_records(s, epoch)
        real = idx[mask]
        assert len(np.unique(real)) == len(real)  # never twice
        if drop:
            assert len(real) == (n // b) * b and mask.all()
        else:
            assert sorted(real) == list(range(n))  # every record exactly once
            assert len(idx) == -(-n // b) * b  # padded to whole batches


@SETTINGS
@given(
    n=st.integers(8, 300),
    per_rank=st.integers(1, 16),
    count=st.sampled_from([1, 2, 3, 4]),
    mode=st.sampled_from(["global", "contiguous", "interleave"]),
    shuffle=st.sampled_from(["none", "full", "block"]),
    drop=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_ranks_are_disjoint_cover_the_data_and_take_equal_steps(n, per_rank, count, mode, shuffle, drop, seed):
    b = per_rank * count
    try:
        samplers = [
            Sampler(n, b, seed=seed, shuffle=shuffle, drop_remainder=drop, part=ProcessPart(r, count, mode), blocks=5)
            for r in range(count)
        ]
    except ValueError as e:
        assert "no full batch" in str(e)
        return
    steps = {s.steps_per_epoch for s in samplers}
    assert len(steps) == 1  # every rank gets the same number of steps
    seen = [epoch_records(s, 1) for s in samplers]
    real = np.concatenate([idx[mask] for idx, mask in seen])
    assert len(np.unique(real)) == len(real)  # ranks are disjoint, nothing twice
    if not drop:
        assert sorted(real) == list(range(n))  # together they cover the data
    for idx, _ in seen:
        assert len(idx) == samplers[0].steps_per_epoch * per_rank


@SETTINGS
@given(
    n=st.integers(64, 500),
    seed=st.integers(0, 10**6),
    shuffle=st.sampled_from(["none", "full", "block"]),
    drop=st.booleans(),
)
def test_global_mode_batches_do_not_depend_on_process_count(n, seed, shuffle, drop):
    b = 16
    reference = Sampler(n, b, seed=seed, shuffle=shuffle, blocks=10, drop_remainder=drop)
    last = reference.steps_per_epoch - 1  # with drop=False: the padded batch
    for count in (2, 4):
        parts = [
            Sampler(n, b, seed=seed, shuffle=shuffle, blocks=10, drop_remainder=drop, part=ProcessPart(r, count))
            for r in range(count)
        ]
        for step in (0, 1, last, reference.steps_per_epoch, 2 * reference.steps_per_epoch + 1, 3 * last + 2):
            joined = [p.indices_and_mask(step) for p in parts]
            idx, mask = reference.indices_and_mask(step)
            np.testing.assert_array_equal(np.concatenate([i for i, _ in joined]), idx)
            masks = [np.ones(len(i), bool) if m is None else m for i, m in joined]
            np.testing.assert_array_equal(np.concatenate(masks), np.ones(b, bool) if mask is None else mask)


def test_block_shuffle_stays_within_windows_and_reshuffles_each_epoch():
    s = Sampler(1000, 50, seed=3, shuffle="block", blocks=100, window=2)
    order0, order1 = s.epoch_order(0), s.epoch_order(1)
    assert sorted(order0) == list(range(1000))
    assert not np.array_equal(order0, order1)
    # each window of 200 positions draws from exactly two blocks of 100
    for w in range(5):
        blocks = np.unique(order0[w * 200 : (w + 1) * 200] // 100)
        assert len(blocks) == 2


def test_block_shuffle_takes_uneven_block_starts():
    starts = [0, 10, 55, 56, 90]
    s = Sampler(100, 10, seed=0, shuffle="block", blocks=starts, window=1)
    order = s.epoch_order(0)
    assert sorted(order) == list(range(100))
    edges = np.append(starts, 100)
    pos = 0
    while pos < 100:  # with window=1 every block is a contiguous run of positions
        block = np.searchsorted(edges, order[pos], side="right") - 1
        size = edges[block + 1] - edges[block]
        assert set(order[pos : pos + size]) == set(range(edges[block], edges[block + 1]))
        pos += size


def test_indices_are_a_pure_function_of_position():
    a = Sampler(97, 8, seed=5)
    b = Sampler(97, 8, seed=5)
    for step in [40, 3, 0, 11, 300, 3]:  # any order, no replay
        np.testing.assert_array_equal(a.indices(step), b.indices(step))
    assert not np.array_equal(Sampler(97, 8, seed=6).indices(0), a.indices(0))


def test_num_epochs_ends_the_stream():
    s = Sampler(10, 5, num_epochs=2, shuffle=False)
    assert s.total_steps == 4
    np.testing.assert_array_equal(s.indices(3), [5, 6, 7, 8, 9])
    with pytest.raises(IndexError, match=r"step 4 is outside \[0, 4\)"):
        s.indices(4)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="global batch_size 10 does not divide among 4 processes"):
        Sampler(100, 10, part=ProcessPart(0, 4))
    with pytest.raises(ValueError, match="shuffle must be one of"):
        Sampler(100, 10, shuffle="random")
    with pytest.raises(ValueError, match='shuffle="block" needs blocks='):
        Sampler(100, 10, shuffle="block")
    with pytest.raises(ValueError, match="ProcessPart.index must be in"):
        ProcessPart(2, 2)
    with pytest.raises(ValueError, match="ProcessPart.mode must be one of"):
        ProcessPart(0, 2, "strided")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        Sampler(100, 10, seed=-1)
    with pytest.raises(ValueError, match="process 3 of 4 owns no records"):
        Sampler(3, 4, part=ProcessPart(3, 4, "interleave"), drop_remainder=False)


def test_describe_leaves_out_what_may_change_on_resume():
    one = Sampler(100, 8, seed=1)
    two = Sampler(100, 8, seed=1, part=ProcessPart(1, 2))
    assert one.describe() == two.describe()  # global mode: process count may change
    c2 = Sampler(100, 8, seed=1, part=ProcessPart(0, 2, "contiguous"))
    c4 = Sampler(100, 8, seed=1, part=ProcessPart(0, 4, "contiguous"))
    assert c2.describe() != c4.describe()  # a rank-owned split may not


# --------------------------------------------------------------------------- the bijection
SPECIAL_SIZES = [1, 2, 3, 4, 5, 7, 31, 127, 255, 256, 257, 4095, 4096, 4097, 8191, 65535, 65536, 65537, 99991, 100_000]


def bijection(n: int, *words: int, inverse: bool = False) -> np.ndarray:
    a, b = _split(n)
    keys = _keys(*words, count=_rounds(a * b))
    return _permute(np.arange(n, dtype=np.uint64), np.uint64(n), np.uint64(a), np.uint64(b), keys, inverse)


@pytest.mark.parametrize("n", SPECIAL_SIZES)
def test_the_order_is_a_bijection_exhaustively(n):
    """1, primes, powers of two and their neighbours: every position maps into [0, n), onto all of it,
    and the inverse takes each value back."""
    for seed in (0, 1, 12345):
        x = bijection(n, seed, 0, 3, 0)
        np.testing.assert_array_equal(np.sort(x), np.arange(n))
        a, b = _split(n)
        keys = _keys(seed, 0, 3, 0, count=_rounds(a * b))
        back = _permute(x.copy(), np.uint64(n), np.uint64(a), np.uint64(b), keys, inverse=True)
        np.testing.assert_array_equal(back, np.arange(n))


@settings(max_examples=40, deadline=None)
@given(
    n=st.one_of(st.sampled_from(SPECIAL_SIZES), st.integers(1, 100_000)),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 10**6),
    mode=st.sampled_from(["global", "contiguous", "interleave"]),
)
def test_every_epoch_order_is_a_permutation_of_the_part(n, seed, epoch, mode):
    count = 3 if n >= 3 else 1
    for rank in range(count):
        part = ProcessPart(rank, count, mode)
        s = Sampler(n, count, seed=seed, part=part, drop_remainder=False)
        np.testing.assert_array_equal(np.sort(s.epoch_order(epoch)), part.records(n))


def test_split_sizes_agree_and_leave_little_to_walk():
    sizes = [1, 2, 3, 10, 99, 100, 101, 8192, 2**31 - 1, 2**32 + 1, 10**12 + 39, 2**40, 2**62 - 1, 2**62]
    a, b = _split_array(np.array(sizes, dtype=np.uint64))
    for n, x, y in zip(sizes, a.tolist(), b.tolist(), strict=True):
        assert (x, y) == _split(n)
        assert x * y >= n and x * y - n < x and x <= 2**32 and y <= 2**32


def test_walking_with_python_ints_is_the_same_as_with_numpy(monkeypatch):
    for n in (5, 17, 1000, 4097, 70_001):
        fast = bijection(n, 9, 0, 1, 0)
        monkeypatch.setattr(sampler_module, "_FEW", 0)  # walk everything with numpy
        np.testing.assert_array_equal(bijection(n, 9, 0, 1, 0), fast)
        monkeypatch.setattr(sampler_module, "_FEW", 10**9)  # everything in Python ints
        np.testing.assert_array_equal(bijection(n, 9, 0, 1, 0), fast)
        monkeypatch.undo()


# --------------------------------------------------------------------------- same order, any path
CONFIGS = [
    dict(n=1000, b=32),
    dict(n=1001, b=30, drop_remainder=False),
    dict(n=997, b=12, part=ProcessPart(2, 3, "contiguous"), drop_remainder=False),
    dict(n=997, b=12, part=ProcessPart(1, 3, "interleave")),
    dict(n=997, b=12, part=ProcessPart(1, 3, "global"), drop_remainder=False),
    dict(n=2000, b=16, shuffle="block", blocks=64, window=3, drop_remainder=False),
    dict(n=2000, b=16, shuffle="block", blocks=7, window=2),
    dict(n=2003, b=16, shuffle="block", blocks=[0, 5, 300, 301, 900, 1800], window=2, drop_remainder=False),
    dict(n=2003, b=16, shuffle="block", blocks=100, window=4, part=ProcessPart(1, 2, "contiguous")),
    dict(n=2003, b=16, shuffle="block", blocks=100, window=4, part=ProcessPart(1, 2, "interleave")),
    dict(n=2003, b=15, shuffle="block", blocks=100, window=4, part=ProcessPart(2, 3, "interleave"), drop_remainder=False),
    dict(n=50, b=4, shuffle="block", blocks=100, window=4),
]


def build(config: dict, **over) -> Sampler:
    c = {**config, **over}
    n, b = c.pop("n"), c.pop("b")
    return Sampler(n, b, seed=c.pop("seed", 21), **c)


def steps_of_epoch(s: Sampler, epoch: int) -> np.ndarray:
    per = s.steps_per_epoch
    return np.concatenate([s.indices(epoch * per + i) for i in range(per)])


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_the_order_is_the_same_whichever_way_it_is_computed(config, monkeypatch):
    """indices() in cached chunks, one step at a time, in small bulk pieces, window by window or
    all windows at once, epoch_order() whole: one order."""
    epochs = (0, 7)
    reference = {e: steps_of_epoch(build(config), e) for e in epochs}
    s = build(config)
    part, b, lb = s.part, s.batch_size, s.local_batch_size
    for e in epochs:  # the steps read epoch_order() at their positions, wrapping around for padding
        order = build(config).epoch_order(e)
        within = np.arange(s.steps_per_epoch)[:, None]
        pos = within * b + part.index * lb if part.mode == "global" else within * lb
        np.testing.assert_array_equal(reference[e], order[(pos + np.arange(lb)).ravel() % len(order)])
    for name, value in (("_CHUNK", 1), ("_CHUNK", 100), ("_BULK", 7), ("_RUNS", 0), ("_FEW", 0)):
        monkeypatch.setattr(sampler_module, name, value)
        for e in epochs:
            np.testing.assert_array_equal(steps_of_epoch(build(config), e), reference[e], err_msg=f"{name}={value}")
        monkeypatch.undo()
    s = build(config)  # any order of steps, from one sampler
    per = s.steps_per_epoch
    for step in (7 * per + per - 1, 3, 7 * per, 0, per - 1):
        e, i = divmod(step, per)
        np.testing.assert_array_equal(s.indices(step), reference[e].reshape(per, -1)[i])


@SETTINGS
@given(
    n=st.integers(1, 3000),
    size=st.integers(1, 300),
    window=st.integers(1, 6),
    count=st.integers(1, 4),
    data=st.data(),
    mode=st.sampled_from(["global", "contiguous", "interleave"]),
    seed=st.integers(0, 2**32),
)
def test_blocks_are_the_sources_blocks_cut_to_the_part_and_closed_form_matches_listed(n, size, window, count, data, mode, seed):
    """A process's blocks are the source's blocks restricted to its records; with a fixed block size
    they are found by arithmetic (the windows' sizes in closed form), and give the same order as the
    same blocks listed (a per-epoch table)."""
    part = ProcessPart(data.draw(st.integers(0, count - 1)), count, mode)
    if part.size(n) == 0:
        return
    s = Sampler(n, count, seed=seed, shuffle="block", blocks=size, window=window, part=part, drop_remainder=False)
    blocks = s._blocks
    ids = part.records(n) // size  # the source block of each record this process owns
    expected = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1])
    np.testing.assert_array_equal(blocks.starts(np.arange(blocks.count)), expected)
    if isinstance(blocks, _UniformBlocks):
        listed = Sampler(n, count, seed=seed, shuffle="block", blocks=size, window=window, part=part, drop_remainder=False)
        listed._blocks = _ListedBlocks(expected, s._size)
        for epoch in (0, 9):
            np.testing.assert_array_equal(s.epoch_order(epoch), listed.epoch_order(epoch))


def test_a_block_size_and_its_evenly_spaced_starts_are_one_order():
    by_size = Sampler(1000, 10, shuffle="block", blocks=64)
    by_starts = Sampler(1000, 10, shuffle="block", blocks=np.arange(0, 1000, 64))
    assert by_size.describe() == by_starts.describe()
    np.testing.assert_array_equal(by_size.epoch_order(2), by_starts.epoch_order(2))
    assert Sampler(1000, 10, shuffle="block", blocks=[0, 64, 130]).describe() != by_size.describe()


@SETTINGS
@given(
    n=st.integers(20, 400),
    cuts=st.lists(st.integers(1, 399), min_size=0, max_size=30),
    window=st.integers(1, 5),
    count=st.sampled_from([1, 2, 3]),
    mode=st.sampled_from(["global", "contiguous", "interleave"]),
    drop=st.booleans(),
)
def test_irregular_blocks_cover_every_part(n, cuts, window, count, mode, drop):
    starts = sorted({0, *(c for c in cuts if c < n)})
    try:
        samplers = [
            Sampler(n, 3 * count, shuffle="block", blocks=starts, window=window, part=ProcessPart(r, count, mode),
                    drop_remainder=drop)
            for r in range(count)
        ]
    except ValueError as e:
        assert "no full batch" in str(e)
        return
    real = np.concatenate([idx[mask] for idx, mask in (epoch_records(s, 2) for s in samplers)])
    assert len(np.unique(real)) == len(real)
    if not drop:
        assert sorted(real) == list(range(n))
    for s in samplers:  # each epoch's whole order: a permutation of the part
        order = s.epoch_order(1)
        assert sorted(order) == sorted(s.part.records(n))


# --------------------------------------------------------------------------- quality
def chi2_threshold(dof: int, z: float = 4.753) -> float:
    """The chi-square quantile at the normal quantile ``z`` (Wilson-Hilferty; z = 4.753 is the
    1 - 1e-6 quantile): a truly uniform shuffle exceeds it with probability about one in a million."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("n", [10, 16, 100])
def test_each_records_position_is_uniform_across_seeds(n):
    """Seeds 0..3999 (fixed, so the test is deterministic): how often record r lands at position p
    is compared to the uniform 4000 / n by a chi-square test over the n x n table, and how far
    record 1 lands after record 0 (modulo n) to the uniform 4000 / (n - 1), each with a threshold
    that a uniform shuffle would exceed with probability 1e-6. n=10 also walks cycles (4 x 3 > 10)."""
    seeds = 4000
    counts = np.zeros((n, n), dtype=np.int64)
    gaps = np.zeros(n, dtype=np.int64)
    for seed in range(seeds):
        order = Sampler(n, 1, seed=seed).epoch_order(3)
        counts[order, np.arange(n)] += 1
        where = np.argsort(order)
        gaps[(where[1] - where[0]) % n] += 1
    expected = seeds / n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2_threshold((n - 1) ** 2), (stat, counts)
    expected = seeds / (n - 1)
    stat = float(((gaps[1:] - expected) ** 2 / expected).sum())
    assert gaps[0] == 0 and stat < chi2_threshold(n - 2), (stat, gaps)


@pytest.mark.parametrize("n", [100_003, 10**12 + 39, 2**40])
def test_consecutive_positions_are_not_correlated(n):
    """Lag-1 correlation of 50,000 consecutive outputs, and their correlation with the position,
    both within 5 standard errors (1 / sqrt(50,000)) of 0; also the order is not near the identity."""
    s = Sampler(n, 50_000, seed=5)
    x = s.indices(1).astype(np.float64)
    limit = 5 / math.sqrt(len(x))
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < limit
    assert abs(np.corrcoef(x, np.arange(len(x)))[0, 1]) < limit
    assert np.mean(x) / n == pytest.approx(0.5, abs=0.01)


def test_epochs_and_seeds_give_unrelated_orders():
    s = Sampler(100_000, 100, seed=1)
    a, b = s.epoch_order(0), s.epoch_order(1)
    c = Sampler(100_000, 100, seed=2).epoch_order(0)
    for other in (b, c):
        assert np.mean(a == other) < 0.001
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.02


# --------------------------------------------------------------------------- cost and the resume state
@pytest.mark.parametrize("n", [10**10, 2**40, 2**62])
@pytest.mark.parametrize("shuffle", ["full", "block"])
def test_huge_sources_need_no_list_of_records_and_little_memory(n, shuffle, monkeypatch):
    def refuse(self, num_records):
        raise AssertionError("the sampler listed a process's records")

    monkeypatch.setattr(ProcessPart, "records", refuse)
    tracemalloc.start()
    try:
        for part in (ProcessPart(), ProcessPart(1, 4), ProcessPart(2, 3, "contiguous"), ProcessPart(1, 4, "interleave")):
            s = Sampler(n, 256 * part.count, seed=3, shuffle=shuffle, blocks=4096, part=part)
            for step in (0, 5 * s.steps_per_epoch + 12345):
                idx = s.indices(step)
                assert len(np.unique(idx)) == len(idx) == s.local_batch_size
                first, stride = part.layout(n)
                assert np.all((idx - first) % stride == 0)
                assert np.all((idx >= first) & (idx < first + stride * part.size(n)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # numpy reports its arrays to tracemalloc: a few chunks of 4096 positions


def test_blocks_uneven_among_interleaved_processes_are_listed_only_when_few():
    s = Sampler(10**6, 30, shuffle="block", blocks=1000, part=ProcessPart(1, 3, "interleave"))
    assert isinstance(s._blocks, _ListedBlocks) and s._blocks.count == 1000
    with pytest.raises(ValueError, match="use a block size divisible by 3 .e.g. 4095., or mode='contiguous'"):
        Sampler(2**40, 30, shuffle="block", blocks=4096, part=ProcessPart(1, 3, "interleave"))


class ArraySource:
    def __init__(self, n: int) -> None:
        self.x = np.arange(n)

    def __len__(self) -> int:
        return len(self.x)

    def read_batch(self, idx):
        return {"x": self.x[idx]}

    def describe(self) -> str:
        return f"ArraySource({len(self.x)})"


def test_describe_carries_the_order_version():
    text = Sampler(100, 8, seed=1).describe()
    assert text.endswith(f", order={sampler_module.ORDER_VERSION})") and sampler_module.ORDER_VERSION == 2


def test_a_state_saved_under_the_old_order_is_refused():
    """A state from before the order changed (its sampler text had no order version) must not
    resume on the new order: the error shows both texts, so `order=2` tells why."""
    src, sampler = ArraySource(100), Sampler(100, 8, seed=1)
    old_text = "Sampler(num_records=100, batch_size=8, seed=1, shuffle='full', drop_remainder=True, mode='global')"
    old_fingerprint = hashlib.sha256((src.describe() + "\n" + old_text).encode()).hexdigest()[:16]
    old = LoaderState(step=5, seed=1, fingerprint=old_fingerprint, source=src.describe(), sampler=old_text)
    older = r"saved for another order \(it was saved by an older Tandem, whose shuffle order was different\)"
    with pytest.raises(StateMismatchError, match=older) as caught:
        old.check(src, sampler)
    assert old_text in str(caught.value) and sampler.describe() in str(caught.value)
    assert "order=2" in str(caught.value)
    with pytest.raises(StateMismatchError, match="another order"):
        Loader(src, sampler).load_state_dict(old.to_dict())
    loader = Loader(src, sampler)  # while the new order's own state resumes
    loader.load_state_dict(LoaderState.create(5, src, sampler).to_dict())
    assert loader.step == 5
