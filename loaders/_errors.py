"""Errors raised by Tandem's loaders.

Every error names the file, the record or tar member, and what was expected, so a
user can find the bad input without a debugger.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a malformed file, member or record."""


class StateMismatchError(ValueError):
    """A resume state that does not belong to this source and sampler."""


class StepOutOfRangeError(StateMismatchError, IndexError):
    """A resume state whose step is before 0 or past the sampler's end.

    An ``IndexError`` too, as Grain raises for an out-of-range iterator state.
    """
