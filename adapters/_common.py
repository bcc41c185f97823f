"""What both adapters share: the missing-framework error, the start-step check, and the consumer's step."""

from __future__ import annotations

import importlib
import operator
from typing import Any

from loaders import Loader, LoaderState, Sampler

INSTALL = {
    "torch": "pip install torch==2.13.0  (the CPU build; or: pip install -e '.[torch]')",
    "grain": "pip install -e '.[jax]'  (grain, jax, flax, optax, orbax-checkpoint)",
    "jax": "pip install -e '.[jax]'",
}


def require(module: str, adapter: str) -> Any:
    """Import ``module`` or say which install command provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"the {adapter} adapter needs {top}, which is not installed: {INSTALL.get(top, top)}") from e


def check_start(step: int, sampler: Sampler) -> int:
    """``step`` if a stream can start there: a step of ``sampler``, or its end (an empty stream)."""
    step = operator.index(step)
    total = sampler.total_steps
    if step < 0 or (total is not None and step > total):
        if total is None:
            raise IndexError(f"cannot start at step {step}: steps start at 0")
        raise IndexError(
            f"cannot start at step {step}: the sampler has steps 0 to {total - 1} "
            f"({sampler.num_epochs} epoch(s) of {sampler.steps_per_epoch}); {total}, its end, gives no batches"
        )
    return step


class StepAdapter:
    """What both adapters share: the loader, its sampler, and the state at :attr:`step`.

    Subclasses provide ``iter_from(step)``, ``step`` (the position of the consumer of
    their latest iterator) and ``load_state_dict``; the state is :class:`loaders.LoaderState`
    at ``step``.
    """

    loader: Loader
    _restores: int = 0  # bumped by every load, so running iterators stop

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def step(self) -> int:
        """The next global step handed to the consumer of the latest iterator."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The shared resume state (:class:`loaders.LoaderState`, JSON-serializable) at :attr:`step`."""
        return LoaderState.create(self.step, self.loader.source, self.loader.sampler).to_dict()
