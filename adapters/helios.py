"""Helios' data module (``helios.data``), on Tandem sources and the PyTorch adapter.

Helios users keep their ``DataModule`` subclasses: ``setup()`` assigns
``self._train_dataset = self._create_dataset(source, DataLoaderParams(...))`` with a
Tandem source (``H5Source``, ``TarSource``, ...) where Helios had a torch ``Dataset``,
and ``train_dataloader()`` returns ``(loader, sampler)``: a :class:`adapters.torch.TorchLoader`
and its :class:`loaders.Sampler`. Resume with ``loader.state_dict()`` /
``loader.load_state_dict()`` (the shared state, which the Grain adapter and the JAX
trainer also read). The same module feeds the JAX trainer: ``data.module: pkg:MyDataModule``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from loaders import COLLATE_FN_REGISTRY, DATASET_REGISTRY, ProcessPart, Sampler

from ._common import require

torch = require("torch", "PyTorch")

DEFAULT_SEED = 6691  # Helios' rng.get_default_seed()


def create_dataset(type_name: str, *args: Any, **kwargs: Any) -> Any:
    """The dataset (source) registered in ``loaders.DATASET_REGISTRY`` as ``type_name``, built with the arguments."""
    return DATASET_REGISTRY.create(type_name, *args, **kwargs)


def create_collate_fn(type_name: str, *args: Any, **kwargs: Any) -> Callable:
    """The collate function registered in ``loaders.COLLATE_FN_REGISTRY`` as ``type_name``, built with the
    arguments (as in Helios, the registered object is called to make the function)."""
    return COLLATE_FN_REGISTRY.create(type_name, *args, **kwargs)


class DatasetSplit(enum.Enum):
    """The dataset splits."""

    TRAIN = 0
    VALID = 1
    TEST = 2

    @staticmethod
    def from_str(label: str) -> DatasetSplit:
        """``"train"``, ``"valid"`` or ``"test"`` as the enum value; anything else raises ``ValueError``."""
        try:
            return DatasetSplit[str(label).upper()]
        except KeyError:
            raise ValueError(f"invalid dataset split {label!r}: expected one of 'train', 'valid', 'test'") from None


def _distributed_part(is_distributed: bool) -> ProcessPart:
    if not is_distributed:
        return ProcessPart()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("is_distributed=True but torch.distributed is not initialized (call init_process_group)")
    return ProcessPart(dist.get_rank(), dist.get_world_size(), "global")


def create_dataloader(
    dataset: Any,
    random_seed: int = DEFAULT_SEED,
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = True,
    drop_last: bool = False,
    debug_mode: bool = False,
    is_distributed: bool = False,
    sampler: Sampler | None = None,
    collate_fn: Callable[[list[dict]], Any] | None = None,
) -> tuple[Any, Sampler]:
    """Helios' ``create_dataloader``: a resumable loader over ``dataset`` (a Tandem source) and its sampler.

    Defaults are Helios': seed 6691, ``pin_memory=True`` (pinning happens only when CUDA
    is available), ``drop_last=False`` (the last batch of an epoch is short, as in
    PyTorch). ``batch_size`` is per process; with ``is_distributed`` the global batch is
    ``batch_size * world_size`` and each rank reads its slice. ``sampler`` must be a
    :class:`loaders.Sampler` (else ``TypeError``). ``debug_mode`` reads in this process.
    """
    if sampler is None:
        part = _distributed_part(bool(is_distributed))
        sampler = Sampler(len(dataset), batch_size * part.count, seed=random_seed, shuffle=shuffle,
                          drop_remainder=drop_last, part=part)
    elif not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a loaders.Sampler, got {type(sampler).__name__}")
    from .torch import TorchLoader

    loader = TorchLoader(dataset, sampler, num_workers=0 if debug_mode else num_workers, pin_memory=pin_memory,
                         collate=collate_fn, pad_last=False)
    return loader, sampler


@dataclasses.dataclass
class DataLoaderParams:
    """Params used to create the dataloader object (Helios' names and defaults)."""

    random_seed: int = DEFAULT_SEED
    batch_size: int = 1
    shuffle: bool = False
    num_workers: int = 0
    pin_memory: bool = True
    drop_last: bool = False
    debug_mode: bool = False
    is_distributed: bool | None = None
    sampler: Sampler | None = None
    collate_fn: Callable | None = None

    def to_dict(self) -> dict[str, Any]:
        """The params as a dict (shallow copies)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> DataLoaderParams:
        """Params from a table (e.g. a config file's); an unknown key is an error naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise KeyError(f"unknown DataLoaderParams key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        return cls(**table)


@dataclasses.dataclass
class Dataset:
    """A dataset (a Tandem source) and its data loader params."""

    dataset: Any
    params: DataLoaderParams

    def dict(self) -> dict[str, Any]:
        """As a dict: ``{"dataset": ..., "params": {...}}``."""
        return {"dataset": self.dataset, "params": self.params.to_dict()}


class DataModule(abc.ABC):
    """Groups the creation of the training, validation and test datasets and their loaders.

    Subclasses implement :meth:`setup` (assigning ``self._train_dataset`` etc. with
    :meth:`_create_dataset`) and may override :meth:`prepare_data` (called once, on the
    primary process, before the others start: download or cache here, keep no state)
    and :meth:`teardown`.
    """

    def __init__(self) -> None:
        self._is_distributed: bool = False
        self._trainer: Any = None
        self._train_dataset: Dataset | None = None
        self._valid_dataset: Dataset | None = None
        self._test_dataset: Dataset | None = None

    @property
    def is_distributed(self) -> bool:
        """Whether distributed training is used (set by the trainer)."""
        return self._is_distributed

    @is_distributed.setter
    def is_distributed(self, value: bool) -> None:
        self._is_distributed = bool(value)

    @property
    def trainer(self) -> Any:
        """The trainer using this module (set by the trainer)."""
        return self._trainer

    @trainer.setter
    def trainer(self, value: Any) -> None:
        self._trainer = value

    @property
    def train_dataset(self) -> Dataset | None:
        return self._train_dataset

    @property
    def valid_dataset(self) -> Dataset | None:
        return self._valid_dataset

    @property
    def test_dataset(self) -> Dataset | None:
        return self._test_dataset

    def prepare_data(self) -> None:  # noqa: B027 - optional hook, as in Helios
        """Prepare data (download, cache); called on the primary process only, before setup."""

    @abc.abstractmethod
    def setup(self) -> None:
        """Construct the datasets."""

    def teardown(self) -> None:  # noqa: B027 - optional hook, as in Helios
        """Clean up after training."""

    def train_dataloader(self) -> tuple[Any, Sampler] | None:
        """The training ``(loader, sampler)``, or None without a training dataset."""
        return self._create_dataloader(self._train_dataset)

    def valid_dataloader(self) -> tuple[Any, Sampler] | None:
        """The validation ``(loader, sampler)``, or None."""
        return self._create_dataloader(self._valid_dataset)

    def test_dataloader(self) -> tuple[Any, Sampler] | None:
        """The test ``(loader, sampler)``, or None."""
        return self._create_dataloader(self._test_dataset)

    def _create_dataset(self, dataset: Any, params: DataLoaderParams | dict[str, Any]) -> Dataset:
        """Pair ``dataset`` with its params (a :class:`DataLoaderParams` or a table of them)."""
        if isinstance(params, dict):
            params = DataLoaderParams.from_dict(params)
        elif not isinstance(params, DataLoaderParams):
            raise TypeError(f"params must be DataLoaderParams or a dict, got {type(params).__name__}")
        return Dataset(dataset, params)

    def _create_dataloader(self, dataset: Dataset | None) -> tuple[Any, Sampler] | None:
        if dataset is None:
            return None
        params = dataset.params.to_dict()
        if params["is_distributed"] is None:
            params["is_distributed"] = self.is_distributed
        return create_dataloader(dataset.dataset, **params)
