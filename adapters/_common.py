"""What both adapters share: the missing-framework error and the step cursor."""

from __future__ import annotations

import importlib
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


class StepCursor:
    """The consumer's position over a :class:`Loader`: steps taken, never steps prefetched."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.step = 0
        self.generation = 0  # bumped by every restore, so a running iterator can start over

    def end(self, per_epoch: bool = False) -> int | None:
        """Where an iteration stops: the sampler's end, or with ``per_epoch`` this epoch's end."""
        sampler = self.loader.sampler
        total = sampler.total_steps
        if not per_epoch:
            return total
        epoch_end = (self.step // sampler.steps_per_epoch + 1) * sampler.steps_per_epoch
        return epoch_end if total is None else min(epoch_end, total)

    def state(self) -> dict[str, Any]:
        return LoaderState.create(self.step, self.loader.source, self.loader.sampler).to_dict()

    def restore(self, state: dict[str, Any]) -> None:
        self.step = LoaderState.from_dict(state).check(self.loader.source, self.loader.sampler)
        self.generation += 1


class CountingAdapter:
    """What both adapters share: the loader, the cursor, and counting what the consumer takes."""

    loader: Loader
    cursor: StepCursor

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def step(self) -> int:
        """The next global step handed to the consumer."""
        return self.cursor.step

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    def _counted(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield ``batches``, advancing the cursor per batch taken; stop if a state is restored meanwhile."""
        generation = self.cursor.generation
        for batch in batches:
            if self.cursor.generation != generation:
                return  # restored mid-iteration: a new iter() starts at the restored step
            self.cursor.step += 1
            yield batch
