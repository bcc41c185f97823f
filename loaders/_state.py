"""LoaderState: the one resume state that every adapter saves and restores."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ._errors import StateMismatchError, StepOutOfRangeError

VERSION = 1


def describe_source(source: Any) -> str:
    """The source's own description (its ``describe()`` if it has one, else ``repr``)."""
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else repr(source)


def fingerprint(source: Any, sampler: Any) -> str:
    """SHA-256 (first 16 hex digits) of what decides the batches: data and order."""
    text = describe_source(source) + "\n" + sampler.describe()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Where a loader stands: the next global step to hand out, and what it reads.

    ``to_dict()`` gives a small JSON-serializable dict (the form every adapter saves);
    ``from_dict()`` reads one back. ``step`` counts batches the *consumer* has taken,
    never what background workers prefetched.
    """

    step: int
    seed: int
    fingerprint: str
    source: str
    sampler: str
    version: int = VERSION

    def __post_init__(self) -> None:
        """Refuse fields of the wrong type (``"5"``, ``5.0`` or ``True`` for a step): never coerced."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), (int if f.name in ("step", "seed", "version") else str)
            if type(value) is not kind:
                expected = "an int" if kind is int else "a str"
                got = f"{value!r} ({type(value).__name__})"
                raise StateMismatchError(f"loader state field {f.name!r} must be {expected}, got {got}")
        if self.step < 0:
            raise StepOutOfRangeError(f"loader state field 'step' must be at least 0, got {self.step}")

    @classmethod
    def create(cls, step: int, source: Any, sampler: Any) -> LoaderState:
        """The state of a loader over ``source`` and ``sampler`` at ``step``."""
        return cls(
            step=int(step),
            seed=int(sampler.seed),
            fingerprint=fingerprint(source, sampler),
            source=describe_source(source),
            sampler=sampler.describe(),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain, versioned, JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any] | LoaderState) -> LoaderState:
        """Parse a dict made by :meth:`to_dict` (a ``LoaderState`` passes through)."""
        if isinstance(state, LoaderState):
            return state
        if isinstance(state, str | bytes):
            try:
                state = json.loads(state)
            except ValueError as e:
                raise StateMismatchError(f"a loader state string must be JSON: {e}") from None
        if not isinstance(state, dict):
            raise StateMismatchError(f"a loader state must be a dict, got {type(state).__name__}")
        version = state.get("version")
        if type(version) is not int or version != VERSION:
            raise StateMismatchError(f"loader state version {version!r} is not supported (this Tandem reads {VERSION})")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in fields if k not in state]
        if missing:
            raise StateMismatchError(f"loader state is missing {', '.join(missing)}: {state!r}")
        extra = sorted(map(str, set(state) - set(fields)))
        if extra:
            raise StateMismatchError(f"loader state has unknown field(s) {', '.join(extra)} (expected: {', '.join(fields)})")
        return cls(**{k: state[k] for k in fields})

    def check(self, source: Any, sampler: Any) -> int:
        """Return ``step`` if this state belongs to ``source`` and ``sampler``, else raise.

        The error shows both fingerprints and what each was made from.
        """
        mine = fingerprint(source, sampler)
        if mine != self.fingerprint:
            now_source, now_sampler = describe_source(source), sampler.describe()
            raise StateMismatchError(
                f"this loader state was saved for {_difference(self.source, self.sampler, now_source, now_sampler)}; "
                "refusing to resume.\n"
                f"  saved:   {self.fingerprint}\n    source:  {self.source}\n    sampler: {self.sampler}\n"
                f"  current: {mine}\n    source:  {now_source}\n    sampler: {now_sampler}"
            )
        total = getattr(sampler, "total_steps", None)
        if total is not None and self.step > total:
            raise StepOutOfRangeError(
                f"loader state is at step {self.step}, past the end of this sampler ({total} steps: "
                f"{sampler.num_epochs} epoch(s) of {sampler.steps_per_epoch})"
            )
        return self.step


def _difference(saved_source: str, saved_sampler: str, source: str, sampler: str) -> str:
    """What differs between a saved state's descriptions and the current ones, in words."""
    parts = []
    if saved_source != source:
        old = " (it was saved by an older Tandem, whose fingerprints did not cover the data's content)"
        parts.append("other data" + (old if "content=" in source and "content=" not in saved_source else ""))
    if saved_sampler != sampler:
        old = " (it was saved by an older Tandem, whose shuffle order was different)"
        parts.append("another order" + (old if "order=" in sampler and "order=" not in saved_sampler else ""))
    return " and ".join(parts) or "other data or another order"
