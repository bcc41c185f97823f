"""Tandem's framework-neutral loaders: numpy, h5py and the tar format only.

Sources give random access to records (``len``, ``read_batch(indices)``); a
:class:`Sampler` maps a global step to this process's record indices; a
:class:`Loader` yields numpy batch dicts and saves a :class:`LoaderState` that any
adapter (PyTorch, Grain) can restore.
"""

from ._errors import DataError, StateMismatchError
from ._h5 import H5CachedSource, H5Source
from ._loader import Loader
from ._part import ProcessPart
from ._registry import COLLATE_FN_REGISTRY, DATASET_REGISTRY, Registry
from ._sampler import Sampler, record_rng
from ._shards import expand_shards
from ._state import LoaderState
from ._tar import TarSource
from ._tar_format import TruncatedTarWarning

__all__ = [
    "COLLATE_FN_REGISTRY",
    "DATASET_REGISTRY",
    "DataError",
    "H5CachedSource",
    "H5Source",
    "Loader",
    "LoaderState",
    "Registry",
    "ProcessPart",
    "Sampler",
    "StateMismatchError",
    "TarSource",
    "TruncatedTarWarning",
    "expand_shards",
    "record_rng",
]
