"""Error types the runtime reports as one clean ``error: ...`` line (exit code 2).

Why a lookup instead of imports at module level: the data and genotype packages are optional
at import time for the engine (and the data package imports torch-heavy code); resolving the
classes lazily keeps ``dsrna_dist.engine`` importable on its own.
"""
from __future__ import annotations

import errno
import importlib
from typing import Tuple, Type


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was written by an incompatible config."""


# module path, class name: the "user error" family; anything else is a bug (exit 1 + traceback)
_USER_ERRORS = (
    ("dsrna_dist.config", "ConfigError"),
    ("dsrna_dist.genotype", "GenotypeError"),
    ("dsrna_dist.data", "DataError"),
    ("dsrna_dist.registry", "RegistryError"),
)


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """Classes whose instances mean "bad input" rather than "bug"; missing modules are skipped."""
    found: list[Type[BaseException]] = [CheckpointError]
    for mod, name in _USER_ERRORS:
        try:
            cls = getattr(importlib.import_module(mod), name)
        except Exception:  # module not written yet or failing to import: not a user error type
            continue
        found.append(cls)
    return tuple(found)


# An output location the user pointed at that cannot be written is bad input, not a bug.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def is_unwritable_location(exc: BaseException) -> bool:
    """A permission / read-only / full-disk OSError (raised while writing the run dir)."""
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in _UNWRITABLE


def user_message(exc: BaseException) -> str:
    """The one-line text of a user error (KeyError-style quotes and OSError noise removed)."""
    if is_unwritable_location(exc) and not isinstance(exc, user_error_types()):
        where = exc.filename if getattr(exc, "filename", None) else "the output location"
        return f"cannot write {where}: {exc.strerror or exc}; choose a writable run.out_dir"
    return " ".join(str(exc).strip("'\"").split("\n")).strip()


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, user_error_types()) or is_unwritable_location(exc):
        return True
    # same-named classes from a module that failed to import above still count
    names = {n for _, n in _USER_ERRORS} | {"CheckpointError"}
    return any(c.__name__ in names for c in type(exc).__mro__)
