"""Sampler properties: coverage, disjoint ranks, equal steps, process-count independence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaders import ProcessPart, Sampler

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
    shuffle=st.sampled_from(["full", "block"]),
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
@given(n=st.integers(64, 500), seed=st.integers(0, 10**6), shuffle=st.sampled_from(["none", "full", "block"]))
def test_global_mode_batches_do_not_depend_on_process_count(n, seed, shuffle):
    b = 16
    reference = Sampler(n, b, seed=seed, shuffle=shuffle, blocks=10)
    for count in (2, 4):
        parts = [Sampler(n, b, seed=seed, shuffle=shuffle, blocks=10, part=ProcessPart(r, count)) for r in range(count)]
        for step in (0, 1, reference.steps_per_epoch, 2 * reference.steps_per_epoch + 1):
            joined = np.concatenate([p.indices(step) for p in parts])
            np.testing.assert_array_equal(joined, reference.indices(step))


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


def test_describe_leaves_out_what_may_change_on_resume():
    one = Sampler(100, 8, seed=1)
    two = Sampler(100, 8, seed=1, part=ProcessPart(1, 2))
    assert one.describe() == two.describe()  # global mode: process count may change
    c2 = Sampler(100, 8, seed=1, part=ProcessPart(0, 2, "contiguous"))
    c4 = Sampler(100, 8, seed=1, part=ProcessPart(0, 4, "contiguous"))
    assert c2.describe() != c4.describe()  # a rank-owned split may not
