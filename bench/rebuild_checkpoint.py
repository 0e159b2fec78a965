"""Rebuild a grid network's git-ignored checkpoints by re-running its training, and prove it is
the same network.

The grid commits a trained network's light record (`train/metrics.jsonl`, `summary.json`) but not
its weights; a fresh clone (or a machine whose disk was reset) has the evaluations' inputs only
as a recipe. Training is bit-exact on CPU for a fixed seed and thread count, so the weights can
be regenerated: this script trains again into `<net>/rebuild/`, compares every deterministic
field of every epoch (losses and accuracies to the last bit, steps) with the committed
`train/metrics.jsonl`, and only when they are identical moves the checkpoints into
`train/checkpoints/` and records the check in `train/rebuilt.json`. A mismatch exits non-zero
naming the first differing epoch and field, and leaves `train/` untouched (the new run stays in
`rebuild/` for inspection), so an evaluation never silently reads a different network than the
one its committed training record describes.

    python bench/rebuild_checkpoint.py results/grid/net/nat/97c7ea0e8a_s0 -- \\
        python -m dsrna_dist.train --config=... --run.name=rebuild ...   # bench/grid.py writes this
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def rebuild(net: Path, train_argv: Sequence[str]) -> int:
    train, work = net / "train", net / "rebuild"
    ref_path = train / "metrics.jsonl"
    if not ref_path.exists():
        print(f"rebuild: {ref_path} missing: nothing to compare a rebuilt network with", file=sys.stderr)
        return 2
    if (train / "checkpoints").exists():
        print(f"rebuild: {train / 'checkpoints'} exists; nothing to do")
        return 0
    rc = subprocess.call(list(train_argv))  # resumes from rebuild/checkpoints when killed
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
              "identical": True, "volatile_fields_ignored": sorted(VOLATILE), "argv": list(train_argv)}
    tmp = train / "rebuilt.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(train / "rebuilt.json")
    shutil.rmtree(work)
    print(f"rebuild: {net}: {len(ref)} epochs identical to the committed record; checkpoints restored")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    return rebuild(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
