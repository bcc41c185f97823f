"""The Grain adapter behaves as Grain does: ``iter()`` gives a ``grain.DatasetIterator`` with its own
position, Grain's own test helper and checkpoint handlers accept it, and its state is still the one
Tandem state that the PyTorch adapter and other worker counts restore."""

import numpy as np
import pytest

pytest.importorskip("grain")
import grain  # noqa: E402
import grain.experimental  # noqa: E402

from adapters.grain import GrainLoader, LoaderIterator  # noqa: E402
from loaders import H5Source, Loader, Sampler, StateMismatchError, TarSource  # noqa: E402

BATCH = 50  # 300 records: 6 steps an epoch


def h5(request):
    return H5Source(request.getfixturevalue("h5_path"), keys=["x", "y"])


def sampler(src, epochs=2, seed=3):
    return Sampler(len(src), BATCH, seed=seed, num_epochs=epochs)


def reference(src, epochs=2, seed=3):
    """Every batch of the sampler, read by the framework-free Loader."""
    return [{k: np.asarray(v) for k, v in b.items()} for b in Loader(src, sampler(src, epochs, seed))]


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def same_list(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        same(a, b)


def test_iter_gives_a_grain_iterator_with_a_state(request):
    src = h5(request)
    loader = GrainLoader(src, sampler(src))
    it = iter(loader)
    assert isinstance(it, grain.DatasetIterator) and isinstance(it, LoaderIterator)
    assert it.get_state()["step"] == 0
    next(it)
    next(it)
    state = it.get_state()
    assert state["step"] == 2 and state == loader.get_state()
    same(next(it), reference(src)[2])


def test_grain_equal_output_after_checkpoint_helper_passes(request):
    src = h5(request)
    grain.experimental.assert_equal_output_after_checkpoint(GrainLoader(src, sampler(src)))


@pytest.mark.slow
def test_grain_checkpoint_helper_passes_with_workers(request):
    src = h5(request)
    small = Sampler(len(src), 100, seed=3, num_epochs=1)  # 3 steps: one worker pipeline per checkpoint
    grain.experimental.assert_equal_output_after_checkpoint(GrainLoader(src, small, worker_count=2))


def test_each_iterator_has_its_own_position(request):
    src = h5(request)
    ref = reference(src)
    loader = GrainLoader(src, sampler(src))
    a, b = iter(loader), iter(loader)
    got = [next(a), next(b), next(a), next(b)]  # Grain: 0, 0, 1, 1 (one shared cursor gave 0, 1, 2, 3)
    same_list(got, [ref[0], ref[0], ref[1], ref[1]])
    assert a.get_state()["step"] == b.get_state()["step"] == 2


def test_len_is_what_one_iterator_yields_and_a_new_iterator_starts_over(request):
    src = h5(request)
    ref = reference(src)
    loader = GrainLoader(src, sampler(src))
    assert len(loader) == len(loader.dataset) == 12 == len(ref)
    first = list(loader)
    again = list(loader)  # after an exhausted iterator: the whole stream again, as Grain does
    same_list(first, ref)
    same_list(again, ref)
    with pytest.raises(TypeError, match=r"an endless GrainLoader \(num_epochs=None\) has no length; steps_per_epoch is 6"):
        len(GrainLoader(src, Sampler(len(src), BATCH, num_epochs=None)))


def test_set_state_on_a_running_iterator_continues_from_the_restored_step(request):
    src = h5(request)
    ref = reference(src)
    it = iter(GrainLoader(src, sampler(src)))
    for _ in range(3):
        next(it)
    back = {**it.get_state(), "step": 1}
    it.set_state(back)
    assert it.get_state() == back
    same_list([next(it) for _ in range(4)], ref[1:5])
    it.set_state({**back, "step": 10})  # forward, across the epoch boundary
    same_list(list(it), ref[10:])
    it.set_state({**back, "step": 12})  # the end: nothing left
    assert list(it) == []


def test_out_of_range_states_raise_index_error(request):
    src = h5(request)
    it = iter(GrainLoader(src, sampler(src)))
    state = it.get_state()
    with pytest.raises(IndexError, match=r"^loader state is at step 10000, past the end of this sampler "
                                         r"\(12 steps: 2 epoch\(s\) of 6\)$"):
        it.set_state({**state, "step": 10000})
    with pytest.raises(IndexError, match=r"^loader state field 'step' must be at least 0, got -1$"):
        it.set_state({**state, "step": -1})
    with pytest.raises(StateMismatchError):  # the same error is a StateMismatchError for Tandem's callers
        GrainLoader(src, sampler(src)).set_state({**state, "step": 13})
    assert it.get_state() == state  # a refused state changes nothing
    other = iter(GrainLoader(src, sampler(src, seed=4)))
    with pytest.raises(StateMismatchError, match="this loader state was saved for another order"):
        other.set_state(state)


def test_grain_checkpoint_handler_round_trip(request, tmp_path):
    import grain.checkpoint

    src = h5(request)
    ref = reference(src)
    it = iter(GrainLoader(src, sampler(src)))
    for _ in range(4):
        next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, it)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["process_0-of-1.json"]
    fresh = iter(GrainLoader(src, sampler(src)))
    assert handler.restore(tmp_path, fresh) is fresh
    same_list(list(fresh), ref[4:])


def test_orbax_checkpoint_manager_with_grain_args(request, tmp_path):
    import grain.checkpoint
    import orbax.checkpoint as ocp

    src = h5(request)
    ref = reference(src)
    it = iter(GrainLoader(src, sampler(src)))
    for _ in range(7):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = iter(GrainLoader(src, sampler(src), worker_count=0))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.get_state()["step"] == 7
    same_list(list(fresh), ref[7:])


@pytest.mark.parametrize("restore_in", ["torch", "grain-2-workers"])
def test_iterator_state_restores_in_torch_and_other_worker_counts(restore_in, request):
    src = TarSource(request.getfixturevalue("wds_shards"))
    ref = reference(src)
    it = iter(GrainLoader(src, sampler(src)))
    for _ in range(5):
        next(it)
    state = it.get_state()
    if restore_in == "torch":
        pytest.importorskip("torch")
        from adapters.torch import TorchLoader

        other = TorchLoader(src, sampler(src), per_epoch=False)
        other.load_state_dict(state)
        got = [{k: v.numpy() for k, v in b.items()} for b in other]
    else:
        other = iter(GrainLoader(src, sampler(src), worker_count=2))
        other.set_state(state)
        got = list(other)
        other.close()
    same_list(got, ref[5:])


def test_torch_state_restores_into_a_grain_iterator(request):
    pytest.importorskip("torch")
    from adapters.torch import TorchLoader

    src = h5(request)
    ref = reference(src)
    torch_loader = TorchLoader(src, sampler(src), per_epoch=False)
    for i, _ in enumerate(torch_loader):
        if i == 2:
            break
    it = iter(GrainLoader(src, sampler(src)))
    it.set_state(torch_loader.state_dict())
    same_list(list(it), ref[3:])


def test_loader_state_follows_the_latest_iterator_and_set_state_moves_the_start(request):
    src = h5(request)
    ref = reference(src)
    loader = GrainLoader(src, sampler(src))
    for i, _ in enumerate(loader):
        if i == 3:
            break
    assert loader.step == 4 and loader.get_state()["step"] == 4
    loader.set_state({**loader.get_state(), "step": 8})
    assert loader.step == 8
    a, b = iter(loader), iter(loader)  # both start where the loader was set
    same_list([next(a), next(b)], [ref[8], ref[8]])


def test_workers_start_prefetch_close_and_restore(request):
    src = h5(request)
    ref = reference(src)
    loader = GrainLoader(src, sampler(src), worker_count=2)
    it = iter(loader)
    it.set_state({**it.get_state(), "step": 6})
    it.start_prefetch()
    same(next(it), ref[6])
    it.set_state({**it.get_state(), "step": 2})  # the workers read ahead from 7: their batches are dropped
    same_list([next(it) for _ in range(3)], ref[2:5])
    it.close()
    with pytest.raises(ValueError, match="Trying to advance a closed iterator"):
        next(it)
