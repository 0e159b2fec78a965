"""The data layer's single error type.

Why one class: the stage entry points turn ``DataError`` into one clean ``error: ...`` line
(a user problem: missing or corrupt files, bad dataset choice) instead of a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file is missing, truncated or corrupt, or a data option does not fit the dataset.

    The message always names the file (or config key) and what is wrong with it.
    """
