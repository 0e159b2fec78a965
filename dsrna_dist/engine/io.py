"""Atomic file writes: temp file in the same directory, fsync, rename.

Why: a run killed mid-write must never leave a truncated checkpoint or result where a good
one used to be; ``os.replace`` is atomic on POSIX within one filesystem.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Callable

import torch


def _atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable too
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_torch_save(path: str, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))
