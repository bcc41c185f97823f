"""torchdata's StatefulDataLoader is the oracle for TorchLoader's iteration and resume semantics.

Both loaders run the same scripts (iterate k, save, restore into a new loader, iterate; leave
an epoch early and iterate again; finish an epoch and iterate again; two live iterators),
with 0 and 2 workers, and the positions they yield (epoch, step in epoch), grouped by
``iter()`` call, must be equal.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
stateful = pytest.importorskip("torchdata.stateful_dataloader")

from adapters.torch import TorchLoader  # noqa: E402
from loaders import ProcessPart, Sampler  # noqa: E402

N, BATCH = 20, 5  # 4 steps an epoch
PER = N // BATCH


class Ids:
    """A source whose records are their own indices."""

    def __len__(self):
        return N

    def read_batch(self, idx):
        return {"i": np.asarray(idx, dtype=np.int64)}

    def describe(self):
        return f"Ids({N})"


class TorchSide:
    """StatefulDataLoader over the records ``0..N-1``, shuffled by a seeded generator."""

    def __init__(self, workers):
        self.workers = workers

    def make(self):
        g = torch.Generator()
        g.manual_seed(0)
        return stateful.StatefulDataLoader(list(range(N)), batch_size=BATCH, shuffle=True, num_workers=self.workers,
                                           generator=g)


class TandemSide:
    """TorchLoader over the same sampler kind; positions from the sampler's own epochs."""

    def __init__(self, workers):
        self.workers = workers
        self.sampler = Sampler(N, BATCH, seed=0, num_epochs=None)
        self.where = {tuple(self.sampler.indices(t).tolist()): divmod(t, PER) for t in range(8 * PER)}

    def make(self):
        return TorchLoader(Ids(), self.sampler, num_workers=self.workers)



@pytest.fixture(scope="module", params=[0, 2], ids=["0-workers", "2-workers"])
def workers(request):
    return request.param


def run(script, side):
    """Run ``script(make, take)``; ``take(it, n)`` records the batches of one ``iter()``. Returns them per call."""
    out = []

    def take(it, n=None):
        got = []
        for i, b in enumerate(it):
            got.append(tuple((b["i"] if isinstance(b, dict) else b).tolist()))
            if n is not None and i + 1 == n:
                break
        out.append(got)

    script(side.make, take)
    return out


def torch_positions(groups, workers):
    """(epoch, step) of each torch batch, from the epochs of an uninterrupted run.

    torchdata 0.11 with 0 workers shuffles the epochs after a restore differently from an
    uninterrupted run (its generator is re-seeded); such a batch belongs to the epoch after
    the last one seen, at its place in its ``iter()`` call, and is counted in ``reshuffled``.
    """
    dl = TorchSide(workers).make()
    where = {tuple(b.tolist()): (e, s) for e in range(8) for s, b in enumerate(dl)}
    out, last, reshuffled = [], -1, 0
    for group in groups:
        got = []
        for k, b in enumerate(group):
            if b in where:
                got.append(where[b])
            else:
                got.append((last + 1, k))
                reshuffled += 1
        last = max([last] + [e for e, _ in got])
        out.append(got)
    return out, reshuffled


def script_restore_mid_epoch(make, take):
    a = make()
    take(iter(a), 2)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    take(iter(b))
    take(iter(b))


def script_break_then_iterate(make, take):
    a = make()
    take(iter(a), 2)
    take(iter(a))
    take(iter(a), 1)


def script_finish_then_iterate(make, take):
    a = make()
    take(iter(a))
    take(iter(a))


def script_restore_after_full_epoch(make, take):
    a = make()
    take(iter(a))
    b = make()
    b.load_state_dict(a.state_dict())
    take(iter(b))
    take(iter(b), 2)


def script_restore_before_any(make, take):
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    take(iter(b))


def script_restore_after_break_and_new_iterator(make, take):
    a = make()
    take(iter(a), 3)
    it = iter(a)  # a new epoch's iterator, nothing taken: the state is its start
    b = make()
    b.load_state_dict(a.state_dict())
    take(iter(b), 2)
    del it


def script_two_iterators(make, take):
    a = make()
    first = iter(a)
    take(first, 1)
    second = iter(a)
    take(second, 1)
    take(first, 1)  # each iterator keeps its own position
    take(second, 1)


SCRIPTS = [script_restore_mid_epoch, script_break_then_iterate, script_finish_then_iterate,
           script_restore_after_full_epoch, script_restore_before_any, script_restore_after_break_and_new_iterator,
           script_two_iterators]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.__name__.removeprefix("script_") for s in SCRIPTS])
def test_positions_match_stateful_dataloader(script, workers):
    expected, _ = torch_positions(run(script, TorchSide(workers)), workers)
    ours = TandemSide(workers)
    got = [[ours.where[b] for b in group] for group in run(script, ours)]
    assert got == expected


def test_torchdata_reshuffles_the_epochs_after_a_zero_worker_restore():
    """A difference kept: after a restore with 0 workers, torchdata 0.11's next epochs are not
    those of an uninterrupted run; Tandem's always are (they are a function of the step)."""
    _, reshuffled = torch_positions(run(script_restore_mid_epoch, TorchSide(0)), 0)
    assert reshuffled == PER
    _, reshuffled = torch_positions(run(script_restore_mid_epoch, TorchSide(2)), 2)
    assert reshuffled == 0
    ours = TandemSide(0)
    batches = run(script_restore_mid_epoch, ours)
    assert [list(g) for g in batches] == [[tuple(ours.sampler.indices(t).tolist()) for t in r]
                                          for r in ([0, 1], [2, 3], [4, 5, 6, 7])]


def test_positions_spelled_out():
    """The oracle's answers, written down: what a reader of the README can check."""
    ours = TandemSide(0)

    def positions(script):
        return [[ours.where[b] for b in group] for group in run(script, ours)]

    assert positions(script_restore_mid_epoch) == [
        [(0, 0), (0, 1)], [(0, 2), (0, 3)], [(1, 0), (1, 1), (1, 2), (1, 3)]]
    assert positions(script_break_then_iterate) == [
        [(0, 0), (0, 1)], [(1, 0), (1, 1), (1, 2), (1, 3)], [(2, 0)]]
    assert positions(script_restore_after_full_epoch) == [
        [(0, 0), (0, 1), (0, 2), (0, 3)], [(1, 0), (1, 1), (1, 2), (1, 3)], [(2, 0), (2, 1)]]
    assert positions(script_two_iterators) == [[(0, 0)], [(1, 0)], [(0, 1)], [(1, 1)]]


def test_a_state_saved_with_two_workers_restores_with_none_and_into_grain(tmp_path):
    """Where torchdata keeps per-worker state (a 2-worker state does not load into 0 workers),
    Tandem's state is one step: it restores into any worker count and into the Grain adapter."""
    sampler = Sampler(N, BATCH, seed=0, num_epochs=3)
    two = TorchLoader(Ids(), sampler, num_workers=2)
    it = iter(two)
    next(it)
    next(it)
    state = two.state_dict()
    assert state["step"] == 2
    zero = TorchLoader(Ids(), sampler)
    zero.load_state_dict(state)
    assert [b["i"].tolist() for b in zero] == [sampler.indices(t).tolist() for t in (2, 3)]
    pytest.importorskip("grain")
    from adapters.grain import GrainLoader

    g = iter(GrainLoader(Ids(), sampler))
    g.set_state(state)
    assert [b["i"].tolist() for b in g] == [sampler.indices(t).tolist() for t in range(2, 12)]


def test_torchdata_refuses_a_two_worker_state_in_zero_workers():
    """The difference the README states, pinned: torchdata's own state is per worker."""
    def make(workers):
        g = torch.Generator()
        g.manual_seed(0)
        return stateful.StatefulDataLoader(list(range(N)), batch_size=BATCH, shuffle=True, num_workers=workers, generator=g)

    two = make(2)
    it = iter(two)
    next(it)
    state = two.state_dict()
    zero = make(0)
    with pytest.raises(Exception):  # noqa: B017 - torchdata's own assertion; any refusal will do
        zero.load_state_dict(state)
        next(iter(zero))


def test_short_last_batch_and_the_padded_form():
    sampler = Sampler(N + 3, BATCH, seed=0, drop_remainder=False, num_epochs=1)

    class Ids23(Ids):
        def __len__(self):
            return N + 3

        def describe(self):
            return "Ids(23)"

    short = [b["i"].tolist() for b in TorchLoader(Ids23(), sampler)]
    assert [len(b) for b in short] == [5, 5, 5, 5, 3]
    assert sorted(sum(short, [])) == list(range(23))
    padded = list(TorchLoader(Ids23(), sampler, pad_last=True))
    assert [len(b["i"]) for b in padded] == [5] * 5 and padded[-1]["_valid"].tolist() == [True] * 3 + [False] * 2
    two = list(TorchLoader(Ids23(), sampler, num_workers=2))
    assert [b["i"].tolist() for b in two] == short and set(two[-1]) == {"i"}


def test_a_process_whose_slice_is_all_padding_gets_an_empty_batch():
    # 21 records, global batch 8 over 4 processes: the last step has 5 records, process 3's slice of 2 is padding
    sizes = []
    for rank in range(4):
        sampler = Sampler(21, 8, seed=0, drop_remainder=False, num_epochs=1, part=ProcessPart(rank, 4))

        class Ids21(Ids):
            def __len__(self):
                return 21

            def describe(self):
                return "Ids(21)"

        sizes.append([len(b["i"]) for b in TorchLoader(Ids21(), sampler)])
    assert sizes == [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 0]]
