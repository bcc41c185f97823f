"""nn_handler's HDF5 datasets and epoch sampler, on Tandem's sources and Sampler.

nn_handler's users write::

    dataset = RankMemCachedH5Dataset(path, x_key="images", y_key="labels", mode="contiguous")
    sampler = EpochShuffleSampler(data_len=len(dataset), seed=42, shuffle=True)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=4)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            ...

and that runs unchanged here. The dataset holds this rank's part of the file through
:class:`loaders.H5CachedSource` (one shared-memory copy for the rank and its workers), and
the sampler is a :class:`TorchSampler`: a ``torch.utils.data.Sampler[int]`` view of a
:class:`loaders.Sampler`, so its order is Tandem's (a pure function of seed, epoch and
position) and its ``state_dict()`` resumes a ``torchdata`` ``StatefulDataLoader`` mid-epoch.
"""

from __future__ import annotations

import hashlib
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from loaders import H5CachedSource, H5Source, ProcessPart, Sampler, StateMismatchError

from ._common import require

torch = require("torch", "nn_handler")

_STATE_KEYS = ("epoch", "yielded", "fingerprint", "sampler")


def _fingerprint(sampler: Sampler) -> str:
    """SHA-256 (16 hex digits) of what decides the order: ``sampler.describe()``, as in a LoaderState."""
    return hashlib.sha256(sampler.describe().encode()).hexdigest()[:16]


def _count(value: Any, name: str) -> int:
    """``value`` as an int >= 0 (a bool or a float is refused, never coerced)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def records_per_epoch(sampler: Sampler) -> int:
    """Records this process reads in one epoch of ``sampler``, the padding of a short last batch left out."""
    lb = sampler.local_batch_size
    if sampler.drop_remainder:
        return sampler.steps_per_epoch * lb
    part = sampler.part
    if part.mode != "global" and part.count > 1:
        return part.size(sampler.num_records)  # its steps cover its part once, then pad
    last = sampler.steps_per_epoch - 1  # only the last global batch can be short
    start = last * sampler.batch_size + part.index * lb
    return last * lb + min(max(sampler.num_records - start, 0), lb)


class TorchSampler(torch.utils.data.Sampler[int]):
    """A ``torch.utils.data.Sampler[int]`` view of a :class:`loaders.Sampler`.

    ``iter(view)`` yields this process's record indices for epoch :attr:`epoch` in
    Tandem's order: ``sampler.indices(step)`` over the epoch's steps, flattened, with the
    padding of a short last batch (``drop_remainder=False``) left out. So
    ``DataLoader(source, sampler=view, batch_size=b)`` reads Tandem's order cut into
    batches of ``b``, whatever ``b`` is. ``len(view)`` is the records yielded per epoch.

    ``set_epoch(e)`` chooses the epoch (as ``DistributedSampler``); the next ``iter``
    starts it from its first record.

    ``state_dict()`` is ``{"epoch", "yielded", "fingerprint", "sampler"}`` (plain JSON):
    the epoch, the indices this view has handed out of it, and what the order is made
    from (``sampler.describe()`` and its hash). ``load_state_dict(state)`` refuses a state
    of another order (other records, seed, batch size or shuffle) with
    :class:`loaders.StateMismatchError`, showing both; else the next ``iter`` continues
    that epoch after its ``yielded`` indices. This follows torchdata's ``Stateful``
    convention, and ``StatefulDataLoader(dataset, sampler=view, batch_size=b)`` saves and
    restores it by itself: it counts indices when they are sent to workers, and keeps the
    state of the batch it last handed over, so a restored loader gives the next batch
    exactly, with any number of workers.

    With a plain ``DataLoader`` (which has no state of its own), save ``view.state_dict()``
    after a whole batch; to resume, ``view.load_state_dict(state)`` and iterate the loader:
    the rest of that epoch comes, then ``set_epoch(state["epoch"] + 1)`` as usual. Only the
    indices of consumed batches must have been taken: with workers a ``DataLoader`` takes
    indices ahead of what it has handed over, so use ``StatefulDataLoader`` there.

    A loaded state is continued by the next ``iter`` only (StatefulDataLoader's restore
    makes that one). ``set_epoch`` to the epoch of a loaded state keeps it (the usual
    resume loop calls ``set_epoch`` first); to another epoch, drops it. A state taken when
    its epoch had been read to the end decides nothing about the next epoch: that is the
    one ``set_epoch`` chose, as in an uninterrupted run.
    """

    def __init__(self, sampler: Sampler, *, epoch: int = 0) -> None:
        super().__init__()
        self.sampler = sampler
        self._len = records_per_epoch(sampler)
        self.epoch = self._check_epoch(epoch)  # what the next iter runs, unless it resumes a loaded state
        self._at = (self.epoch, 0)  # what state_dict reports: (epoch, indices of it handed out)
        self._pending: tuple[int, int] | None = None  # a loaded state, for the next iter to continue

    def _check_epoch(self, epoch: Any) -> int:
        epoch = _count(epoch, "epoch")
        total = self.sampler.num_epochs
        if total is not None and epoch >= total:
            raise ValueError(f"epoch {epoch} is past the sampler's {total} epoch(s)")
        return epoch

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` next (its order is keyed by ``(seed, epoch)``)."""
        self.epoch = epoch = self._check_epoch(epoch)
        if self._pending is not None and self._pending[0] != epoch:
            self._pending = None
        if self._at[0] != epoch:
            self._at = (epoch, 0)

    def __iter__(self) -> Iterator[int]:
        # The first iter after load_state_dict continues the loaded state, and only that one:
        # StatefulDataLoader makes it while restoring, and when the state was taken after its
        # epoch had ended, drops it for a fresh iterator, which must run the epoch set since.
        pending, self._pending = self._pending, None
        return self._indices(pending)

    def _indices(self, pending: tuple[int, int] | None) -> Iterator[int]:
        # A generator: nothing happens until the first index is asked for.
        epoch, start = pending or (self.epoch, 0)
        if start < self._len:
            self.epoch = epoch
        s = self.sampler
        self._at = (epoch, start)
        first = epoch * s.steps_per_epoch
        step, skip = divmod(start, s.local_batch_size)  # every batch but the last is whole
        for st in range(first + step, first + s.steps_per_epoch):
            idx, mask = s.indices_and_mask(st)
            if mask is not None:
                idx = idx[mask]
            for i in idx[skip:].tolist():
                start += 1
                self._at = (epoch, start)  # before the yield: a state taken now counts this index as taken
                yield i
            skip = 0

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "yielded", "fingerprint", "sampler"}``: where this view stands (JSON-serializable)."""
        return {
            "epoch": self._at[0],
            "yielded": self._at[1],
            "fingerprint": _fingerprint(self.sampler),
            "sampler": self.sampler.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`) at the next ``iter``; refuse another order's state."""
        if not isinstance(state, dict):
            raise StateMismatchError(f"a sampler state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise StateMismatchError(
                f"sampler state is missing {', '.join(missing)} (expected: {', '.join(_STATE_KEYS)}): {state!r}"
            )
        mine = _fingerprint(self.sampler)
        if state["fingerprint"] != mine:
            raise StateMismatchError(
                "this sampler state was saved for another order; refusing to resume.\n"
                f"  saved:   {state['fingerprint']}\n    sampler: {state['sampler']}\n"
                f"  current: {mine}\n    sampler: {self.sampler.describe()}"
            )
        try:
            epoch = self._check_epoch(state["epoch"])
            yielded = _count(state["yielded"], "yielded")
        except (TypeError, ValueError) as e:
            raise StateMismatchError(f"sampler state: {e}") from None
        if yielded > self._len:
            raise StateMismatchError(f"sampler state has yielded {yielded} indices, past this epoch's {self._len}")
        self._at = self._pending = (epoch, yielded)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sampler!r}, epoch={self.epoch}, at={self._at})"


class EpochShuffleSampler(TorchSampler):
    """nn_handler's sampler: a fresh order of ``range(data_len)`` every epoch, keyed by ``(seed, epoch)``.

    A :class:`TorchSampler` over ``Sampler(data_len, batch_size=1, seed=seed,
    shuffle="full" (or "none"), drop_remainder=False)``: every epoch is a permutation of
    ``range(data_len)``, and since Tandem's order depends on the position in the epoch
    only, not on the batch size, it is the same whatever ``DataLoader(batch_size=...)``
    cuts it into (it equals ``sampler.sampler.epoch_order(epoch)``).

    As in nn_handler it indexes a dataset that is already this rank's part (such as
    :class:`RankMemCachedH5Dataset`): pass ``data_len=len(dataset)``. Every rank shuffles
    its own part with the same ``(seed, epoch)`` key. Differences from nn_handler: the
    order is another one (not numpy's ``default_rng(seed + epoch)``), ``seed=1, epoch=0``
    and ``seed=0, epoch=1`` give different orders, ``seed`` must be >= 0, and it has
    ``state_dict``/``load_state_dict`` (see :class:`TorchSampler`).
    """

    def __init__(self, data_len: int, seed: int = 0, shuffle: bool = True) -> None:
        self.data_len = operator.index(data_len)
        self.base_seed = operator.index(seed)
        super().__init__(
            Sampler(self.data_len, 1, seed=self.base_seed, shuffle="full" if shuffle else "none", drop_remainder=False)
        )
        self.shuffle = bool(shuffle)


# --------------------------------------------------------------------------- datasets
def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else torch.distributed's when it is initialized, else ``(0, 1)``."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass rank= and world_size= together, or neither (then torch.distributed's are used)")
    if rank is not None:
        return operator.index(rank), operator.index(world_size)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _torch_dtype(dtype: Any) -> Any:
    """The torch dtype of numpy ``dtype`` (None stays None)."""
    return None if dtype is None else torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def _pair(x: Any, y: Any, transform: Callable | None, target_transform: Callable | None) -> Any:
    """nn_handler's item: ``x``, or ``(x, y)``, each through its transform."""
    if transform is not None:
        x = transform(x)
    if y is None:
        return x
    if target_transform is not None:
        y = target_transform(y)
    return x, y


def _part_arrays(source: H5CachedSource) -> dict[str, np.ndarray]:
    """The source's cached part of each key (row ``p``: the ``p``-th record of the part), read-only, no copy."""
    return source.arrays


class RankMemCachedH5Dataset(torch.utils.data.Dataset):
    """nn_handler's rank-cached HDF5 dataset: this rank's part of ``x_key`` (and ``y_key``), in memory.

    Item ``i`` is the ``i``-th record of this rank's part: ``x``, or ``(x, y)`` when
    ``y_key`` is given (input-target pairs), as torch tensors; ``len(dataset)`` is the
    part's size. The parts are nn_handler's: ``mode="contiguous"`` gives rank ``r`` the
    ``r``-th balanced slice (the first ``N % world_size`` ranks one record more),
    ``"interleave"`` records ``r, r + world_size, ...``. :attr:`records` lists the part's
    record numbers in the file.

    The part is read once by :class:`loaders.H5CachedSource` into one shared-memory
    segment that worker processes map without a copy (forked or spawned); the tensors are
    ``torch.from_numpy`` views of it, made once per process. They are read-only memory:
    a ``transform`` must return new tensors, not modify its input in place.

    Args:
      path, x_key, y_key: the file and its input (and target) datasets.
      mode: ``"contiguous"`` or ``"interleave"``.
      x_dtype, y_dtype: the items' dtypes (nn_handler's default: float32 inputs). The
        cache keeps the file's dtype and each item is cast as it is read, so uint8 images
        take a quarter of the memory that a float32 cache would.
      transform, target_transform: applied to each item's ``x`` and ``y``.
      pin_host_memory: copy the part once into page-locked memory of this process (what
        nn_handler did, by default), when CUDA is available; without CUDA, a
        ``RuntimeWarning`` says so and the part stays unpinned. Worker processes read the
        shared segment, never the pinned copy, and a ``DataLoader``'s collated batches are
        new tensors anyway: ``DataLoader(pin_memory=True)`` is what pins the batches that
        go to the GPU.
      share_memory: ``True`` (the default here): the part lives in one shared segment for
        the rank and all its workers (nn_handler's ``share_memory=True``, at no cost).
        ``False``: private memory (a spawned worker then receives its own copy).
      rdcc_nbytes, rdcc_nslots, rdcc_w0: accepted for nn_handler's signature; the part is
        loaded in large batches that read each touched chunk run once, so HDF5's chunk
        cache plays no part (they matter for :class:`H5LazyDataset`).
      rank, world_size: this process's part; by default torch.distributed's rank and world
        size when it is initialized, else one process (nn_handler required it).
      progress: show a progress bar while the part loads.

    :attr:`source` and :attr:`part` are the Tandem objects underneath: a
    :class:`loaders.Sampler` built with ``part=dataset.part`` drives ``dataset.source``
    (global record numbers) through ``adapters.torch`` or ``adapters.grain``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        x_key: str,
        y_key: str | None = None,
        *,
        mode: str = "contiguous",
        x_dtype: Any = np.float32,
        y_dtype: Any = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        pin_host_memory: bool = False,
        share_memory: bool = True,
        rdcc_nbytes: int | None = None,
        rdcc_nslots: int | None = None,
        rdcc_w0: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = False,
    ) -> None:
        if mode not in ("contiguous", "interleave"):
            raise ValueError(f"mode must be 'contiguous' or 'interleave', got {mode!r}")
        self.path = os.fspath(path)
        self.x_key, self.y_key, self.mode = x_key, y_key, mode
        self.transform, self.target_transform = transform, target_transform
        self.pin_host_memory, self.share_memory = bool(pin_host_memory), bool(share_memory)
        self.rdcc = {"rdcc_nbytes": rdcc_nbytes, "rdcc_nslots": rdcc_nslots, "rdcc_w0": rdcc_w0}
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.part = ProcessPart(self.rank, self.world_size, mode)
        keys = [x_key] if y_key is None else [x_key, y_key]
        self.source = H5CachedSource(self.path, keys, part=self.part, share=self.share_memory, progress=progress)
        self._cast = (_torch_dtype(x_dtype), _torch_dtype(y_dtype))
        self._len = self.part.size(len(self.source))
        self._tensors: tuple[Any, Any] | None = None
        self.pinned = False
        self._tensors = self._views(pin=self.pin_host_memory)

    def _views(self, pin: bool = False) -> tuple[Any, Any]:
        """``(x, y)``: tensors over the cached part (y None without ``y_key``), pinned once if asked and possible."""
        arrays = _part_arrays(self.source)
        tensors = []
        for key in (self.x_key, self.y_key):
            if key is None:
                tensors.append(None)
                continue
            arr = arrays[key]
            try:
                with warnings.catch_warnings():  # read-only on purpose: torch warns that it cannot enforce that
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    tensors.append(torch.from_numpy(arr))
            except TypeError as e:
                raise TypeError(f"{self.path}: dataset {key!r} has dtype {arr.dtype}, which torch cannot hold: {e}") from e
        if not pin:
            return tensors[0], tensors[1]
        why = "CUDA is not available"
        if torch.cuda.is_available():
            try:
                pinned = [None if t is None else t.pin_memory() for t in tensors]
            except RuntimeError as e:  # e.g. over the locked-memory limit: nn_handler also went on unpinned
                why = f"pinning failed ({e})"
            else:
                self.pinned = True
                return pinned[0], pinned[1]
        warnings.warn(
            f"pin_host_memory=True, but {why}, so the cached part is not pinned: it stays in ordinary (shared) memory",
            RuntimeWarning,
            stacklevel=3,
        )
        return tensors[0], tensors[1]

    @property
    def records(self) -> np.ndarray:
        """The part's record numbers in the file (item ``i`` is record ``records[i]``)."""
        return self.part.records(len(self.source))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> Any:
        if self._tensors is None:  # in a spawned worker: views of the shared part, made once
            self._tensors = self._views()
        xs, ys = self._tensors
        x = xs[idx]
        if self._cast[0] is not None and x.dtype != self._cast[0]:
            x = x.to(self._cast[0])
        y = None
        if ys is not None:
            y = ys[idx]
            if self._cast[1] is not None and y.dtype != self._cast[1]:
                y = y.to(self._cast[1])
        return _pair(x, y, self.transform, self.target_transform)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_tensors=None, pinned=False)  # a worker maps the shared part, never the pinned copy
        return state

    def close(self) -> None:
        """Release the cached part now (also done when the dataset is garbage-collected or the process exits)."""
        self._tensors = None
        self.source.close()

    def __repr__(self) -> str:
        return f"RankMemCachedH5Dataset({self.source!r}, x_key={self.x_key!r}, y_key={self.y_key!r})"


class H5LazyDataset(torch.utils.data.Dataset):
    """nn_handler's lazy HDF5 dataset: item ``i`` is record ``i`` of ``x_key`` (and ``y_key``), read on demand.

    Items are ``x``, or ``(x, y)`` with ``y_key`` (input-target pairs), as torch tensors,
    cast to ``x_dtype`` / ``y_dtype`` when given, through ``transform`` /
    ``target_transform``. Reading goes through :class:`loaders.H5Source`: it opens the
    file in the process that reads (so no worker-init hook is needed, see
    :func:`h5_worker_init_fn`), reads uncompressed data straight from the file's bytes,
    and ``DataLoader`` batches come from one grouped read (``__getitems__``) instead of
    one read per record. ``rdcc_nbytes``, ``rdcc_nslots``, ``rdcc_w0`` set HDF5's chunk
    cache (h5py's defaults when None; nn_handler's default was 256 MiB).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        x_key: str,
        y_key: str | None = None,
        x_dtype: Any = None,
        y_dtype: Any = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        rdcc_nbytes: int | None = None,
        rdcc_nslots: int | None = None,
        rdcc_w0: float | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.x_key, self.y_key = x_key, y_key
        self.x_dtype = None if x_dtype is None else np.dtype(x_dtype)
        self.y_dtype = None if y_dtype is None else np.dtype(y_dtype)
        self.transform, self.target_transform = transform, target_transform
        keys = [x_key] if y_key is None else [x_key, y_key]
        self.source = H5Source(self.path, keys, rdcc_nbytes=rdcc_nbytes, rdcc_nslots=rdcc_nslots, rdcc_w0=rdcc_w0)

    def __len__(self) -> int:
        return len(self.source)

    def _items(self, indices: Sequence[int]) -> list[Any]:
        batch = self.source.read_batch(np.asarray(indices, dtype=np.int64))
        xs = _tensor(batch[self.x_key], self.x_dtype)
        ys = None if self.y_key is None else _tensor(batch[self.y_key], self.y_dtype)
        return [_pair(xs[i], None if ys is None else ys[i], self.transform, self.target_transform) for i in range(len(xs))]

    def __getitem__(self, idx: int) -> Any:
        idx = operator.index(idx)
        return self._items([idx + len(self) if idx < 0 else idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The items of a whole batch, from one grouped read (``DataLoader`` calls this when it exists)."""
        return self._items(indices)

    def close(self) -> None:
        """Kept for nn_handler's code: nothing to close (the source opens its file per process, and h5py closes it)."""

    def __repr__(self) -> str:
        return f"H5LazyDataset({self.source!r}, x_key={self.x_key!r}, y_key={self.y_key!r})"


def _tensor(arr: np.ndarray, dtype: np.dtype | None) -> Any:
    """A tensor of ``arr`` (cast to ``dtype`` when given), sharing its memory where torch can."""
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if not (arr.flags.writeable and arr.dtype.isnative):
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def h5_worker_init_fn(_worker_id: int) -> None:
    """nn_handler's ``worker_init_fn``, kept so its code runs: it does nothing here.

    nn_handler closed HDF5 handles a worker inherited. Tandem's HDF5 sources never carry
    one into a worker: pickling drops the handle, and a source opens its file again in any
    process whose pid differs from the one that opened it (a forked worker included), so
    every worker reads through its own handle without a hook.
    """
