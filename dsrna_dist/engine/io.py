"""Atomic file writes: temp file in the same directory, fsync, rename.

Why: a run killed mid-write must never leave a truncated checkpoint or result where a good
one used to be; ``os.replace`` is atomic on POSIX within one filesystem. A kill during the
write leaves a temp file (``.<name>.<random>.tmp``) behind; :func:`remove_stale_temps` deletes
those when the next run starts. Files get ``0666 & ~umask`` (0644 under the usual umask, like
the logs): ``mkstemp``'s private 0600 would hide results from the group.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
# what mkstemp(prefix="." + name + ".", suffix=".tmp") creates: a dot, the name, 8 random chars
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows, else set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def remove_stale_temps(*dirs: "str | Path", targets: Optional[Sequence[str]] = None) -> List[Path]:
    """Delete temp files an interrupted atomic write left in ``dirs`` (not recursive); return them.

    ``targets``: only temps of these file names (for a directory shared with other files, e.g. a
    report's). Call only when no other process writes there (a run's start, on rank 0).
    """
    prefixes = None if targets is None else tuple(TEMP_PREFIX + t + "." for t in targets)
    removed: List[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if prefixes is not None and not p.name.startswith(prefixes):
                continue
            if _TEMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


def _atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TEMP_PREFIX + os.path.basename(path) + ".", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
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
    import torch  # here, not at import: this module is on the light start-up path

    _atomic(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------- JSONL
class JSONLError(ValueError):
    """A JSONL file has a bad line that is not its last one: the message names file and line."""


def read_jsonl(path: "str | Path", *, missing_ok: bool = True) -> List[Dict[str, Any]]:
    """The records (JSON objects) of a JSONL file, one per non-blank line.

    Why tolerant at the end only: our JSONL files are appended to (results, metrics) or rewritten
    atomically, so a killed writer can tear the *last* line and nothing else; that line is dropped.
    A bad line anywhere before it means the file was damaged otherwise, and silently skipping it
    would lose records (a result, an epoch) without a trace: :class:`JSONLError` names the file
    and the line. A missing file is ``[]`` unless ``missing_ok=False`` (FileNotFoundError).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    out: List[Dict[str, Any]] = []
    for k, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError as e:
            if k == len(lines) - 1:
                break  # torn last line: the writer was killed mid-line
            raise JSONLError(f"{p}: line {n} is not valid JSON ({e.msg}) and is not the last line; "
                             "the file is damaged (fix or remove that line)") from None
        if not isinstance(rec, dict):
            raise JSONLError(f"{p}: line {n} is a JSON {type(rec).__name__}, not an object (record)")
        out.append(rec)
    return out
