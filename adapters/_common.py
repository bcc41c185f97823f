"""What both adapters share: the missing-framework error, the start-step check, and the consumer's step."""

from __future__ import annotations

import importlib
import operator
from collections.abc import Iterable, Iterator
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
    """What both adapters share: the loader, and the step the consumer of ``iter(adapter)`` has reached.

    Subclasses provide ``iter_from(step)``; ``__iter__`` counts the batches taken from
    it, and the state is :class:`loaders.LoaderState` at that count.
    """

    loader: Loader
    _step: int = 0
    _restores: int = 0  # bumped by every restore, so a running ``iter()`` stops and a new one starts there

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def step(self) -> int:
        """The next global step handed to the consumer of ``iter(adapter)``."""
        return self._step

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The shared resume state (:class:`loaders.LoaderState`, JSON-serializable) at :attr:`step`."""
        return LoaderState.create(self._step, self.loader.source, self.loader.sampler).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state saved by any Tandem adapter over the same data and order.

        A running ``iter(adapter)`` stops; the next one starts at the saved step.
        """
        self._step = LoaderState.from_dict(state).check(self.loader.source, self.loader.sampler)
        self._restores += 1

    def _counted(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield ``batches``, counting each one taken; stop if a state is restored after this call."""
        return self._count(batches, self._restores)

    def _count(self, batches: Iterable[dict[str, Any]], restores: int) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if self._restores != restores:
                return  # restored mid-iteration: a new iter() starts at the restored step
            self._step += 1
            yield batch
