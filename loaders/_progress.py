"""A progress bar for long work (tqdm when asked for, otherwise nothing)."""

from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, enabled: bool, unit: str = "rec"):
    """A tqdm bar on stderr when ``enabled``, else an object that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
