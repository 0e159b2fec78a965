"""Rebuild a grid network's git-ignored checkpoints by re-running its training, and prove it is
the same network.

The grid commits a trained network's light record (`train/metrics.jsonl`, `summary.json`) but not
its weights; a fresh clone (or a machine whose disk was reset) has the evaluations' inputs only
as a recipe. Training is bit-exact on CPU for a fixed seed, thread count and code version (the
code matters: e.g. training in channels_last on CPU since 2026-11-30 changed every later float
sum), so the weights can be regenerated: with `--code REV` (bench/grid.py passes the version its
log recorded for the training task) the training runs from a detached git worktree of that
commit (`.rebuild/<rev>/`, its own configs and package), else from the current tree. It trains
again into `<net>/rebuild/`, compares every deterministic
field of every epoch (losses and accuracies to the last bit, steps) with the committed
`train/metrics.jsonl`, and only when they are identical moves the checkpoints into
`train/checkpoints/` and records the check in `train/rebuilt.json`. A mismatch exits non-zero
naming the first differing epoch and field, and leaves `train/` untouched (the new run stays in
`rebuild/` for inspection), so an evaluation never silently reads a different network than the
one its committed training record describes.

    python bench/rebuild_checkpoint.py results/grid/net/nat/97c7ea0e8a_s0 [--code REV] -- \\
        python -m dsrna_dist.train --config=... --run.name=rebuild ...   # bench/grid.py writes this
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: fields that depend on timing, memory or the host, not on the weights
VOLATILE = frozenset(("img_per_s", "train_time_s", "epoch_time_s", "max_rss_mb", "eval_time_s"))


def read_jsonl(path: Path) -> List[Dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_difference(ref: List[Dict[str, object]], new: List[Dict[str, object]]) -> Optional[str]:
    """None when every epoch's deterministic fields are equal, else where they first differ."""
    if len(ref) != len(new):
        return f"{len(new)} epochs rebuilt, {len(ref)} committed"
    for i, (a, b) in enumerate(zip(ref, new)):
        for key in sorted((set(a) | set(b)) - VOLATILE):
            if a.get(key) != b.get(key):
                return f"epoch {i}: {key} committed {a.get(key)!r}, rebuilt {b.get(key)!r}"
    return None


def worktree(rev: str) -> Path:
    """A detached worktree of ``rev`` under .rebuild/ (created once, shared by later rebuilds)."""
    path = ROOT / ".rebuild" / rev
    if not (path / "dsrna_dist").is_dir():
        path.parent.mkdir(exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), rev],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def rebuild(net: Path, train_argv: Sequence[str], code: Optional[str] = None) -> int:
    train, work = net / "train", net / "rebuild"
    ref_path = train / "metrics.jsonl"
    if not ref_path.exists():
        print(f"rebuild: {ref_path} missing: nothing to compare a rebuilt network with", file=sys.stderr)
        return 2
    if (train / "checkpoints").exists():
        print(f"rebuild: {train / 'checkpoints'} exists; nothing to do")
        return 0
    cwd, env = None, None
    if code:
        try:
            cwd = worktree(code)
        except subprocess.CalledProcessError as e:
            print(f"rebuild: no worktree of code version {code!r} ({e}); is it in this clone's history?",
                  file=sys.stderr)
            return 2
        env = dict(os.environ, PYTHONPATH=str(cwd))  # that version's package, not the installed one
    rc = subprocess.call(list(train_argv), cwd=cwd, env=env)  # resumes from rebuild/checkpoints when killed
    if rc != 0:
        print(f"rebuild: training exited {rc}", file=sys.stderr)
        return rc
    ref, new = read_jsonl(ref_path), read_jsonl(work / "metrics.jsonl")
    diff = first_difference(ref, new)
    if diff is not None:
        print(f"rebuild: {net}: the rebuilt training differs from the committed record ({diff}); "
              f"train/ left as it was, the new run is in {work}", file=sys.stderr)
        return 3
    (work / "checkpoints").rename(train / "checkpoints")  # same filesystem: atomic
    record = {"rebuilt": time.strftime("%Y-%m-%dT%H:%M:%S"), "epochs_compared": len(ref),
              "identical": True, "code": code or "current tree", "volatile_fields_ignored": sorted(VOLATILE), "argv": list(train_argv)}
    tmp = train / "rebuilt.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(train / "rebuilt.json")
    shutil.rmtree(work)
    print(f"rebuild: {net}: {len(ref)} epochs identical to the committed record; checkpoints restored")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = None
    if len(argv) > 2 and argv[1] == "--code":
        code = argv[2]
        argv = argv[:1] + argv[3:]
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    return rebuild(Path(argv[0]), argv[2:], code)


if __name__ == "__main__":
    sys.exit(main())
