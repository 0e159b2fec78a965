"""Rank-aware logging: rank 0 logs at INFO, other ranks only warnings, every line says its rank.

Why: N ranks printing the same progress line N times hides the one line that matters (a
warning or error from a single rank).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

LOGGER_NAME = "dsrna_dist"


def setup_logging(rank: int, world_size: int, log_file: Optional[Path] = None) -> logging.Logger:
    """Configure the package logger once per process (idempotent: old handlers are replaced)."""
    log = logging.getLogger(LOGGER_NAME)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    tag = f"[rank{rank}] " if world_size > 1 else ""
    fmt = logging.Formatter(f"{tag}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if log_file is not None and rank == 0:
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


def close_logging() -> None:
    """Flush and drop our handlers; the logger goes back to propagating to the root logger."""
    log = logging.getLogger(LOGGER_NAME)
    for h in list(log.handlers):
        h.flush()
        log.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    log.setLevel(logging.NOTSET)
    log.propagate = True
