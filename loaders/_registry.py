"""Short names for configs: ``DATASET_REGISTRY`` and ``COLLATE_FN_REGISTRY``.

The built-in entries are listed here, in one table each; nothing registers itself by
being imported. Register your own with the decorator (as in Helios)::

    @DATASET_REGISTRY.register
    class MySource: ...

    @COLLATE_FN_REGISTRY.register("pad_ragged")
    def pad(records): ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class Registry:
    """A name -> object table with a ``register`` decorator."""

    def __init__(self, kind: str, entries: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self._table: dict[str, Any] = dict(entries or {})

    def register(self, obj: Any = None, *, name: str | None = None) -> Any:
        """Register ``obj`` under ``name`` (default ``obj.__name__``); usable as a decorator.

        ``@register``, ``@register("name")`` and ``register(obj, name=...)`` all work.
        """
        if isinstance(obj, str):
            return lambda o: self.register(o, name=obj)
        if obj is None:
            return lambda o: self.register(o, name=name)
        key = name or obj.__name__
        if key in self._table and self._table[key] is not obj:
            raise KeyError(f"{self.kind} {key!r} is already registered as {self._table[key]!r}")
        self._table[key] = obj
        return obj

    __call__ = register

    def get(self, name: str) -> Any:
        """The object registered as ``name``; a typo gets the closest names suggested."""
        try:
            return self._table[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._table), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no {self.kind} named {name!r}{hint} (known: {', '.join(sorted(self._table))})") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the object registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def __iter__(self):
        return iter(self._table)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._table)})"


def _builtins() -> tuple[dict[str, Any], dict[str, Callable]]:
    from ._collate import list_records, stack_records
    from ._h5 import H5CachedSource, H5Source
    from ._tar import TarSource

    datasets = {"h5": H5Source, "h5_cached": H5CachedSource, "tar": TarSource}
    collates = {"stack": stack_records, "list": list_records}
    return datasets, collates


_datasets, _collates = _builtins()
DATASET_REGISTRY = Registry("dataset", _datasets)
COLLATE_FN_REGISTRY = Registry("collate function", _collates)
