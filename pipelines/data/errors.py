"""The one error type of data preparation, so callers can tell bad settings from bugs."""

from __future__ import annotations


class DataError(ValueError):
    """A data setting or input that cannot work. The message names it and says how to fix it."""
