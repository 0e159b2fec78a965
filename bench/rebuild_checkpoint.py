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
one its committed training record describes. With `--adopt STAGE...` a mismatch instead makes the
rebuilt run the network: `train/` is replaced by it (`rebuilt.json` says so, with the first
difference and the old test accuracy) and those evaluation stages are deleted to run again.

Measured 2026-11-30 (twelfth session, a new machine: AMD EPYC, AVX2): the recorded code version
does not reproduce the earlier machine's runs bit for bit (DSRNA-CB s0 natural, code 8eb490d:
epoch-0 train loss 0.565962 against 0.565986 committed), so float results differ across CPUs;
since then the grid commits the checkpoint its evaluations read (.gitignore), and nets trained
before are retrained with `bench/grid.py --rebuild adopt`.

    python bench/rebuild_checkpoint.py results/grid/net/nat/97c7ea0e8a_s0 [--code REV] -- \\
        python -m dsrna_dist.train --config=... --run.name=rebuild ...   # bench/grid.py writes this
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dsrna_dist.engine.io import atomic_write_json, read_jsonl  # noqa: E402  (the project's one reader/writer)
#: fields that depend on timing, memory or the host, not on the weights
VOLATILE = frozenset(("img_per_s", "train_time_s", "epoch_time_s", "max_rss_mb", "eval_time_s"))


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


def adopt(net: Path, diff: str, stages: Sequence[str], code: Optional[str]) -> None:
    """The rebuilt run becomes the network: train/ is replaced by it, and the evaluation stages
    that measured the old weights are deleted so they run again on the new ones (the old records
    stay in git history). A crash midway is finished by the next call (see `rebuild`)."""
    train, work, old = net / "train", net / "rebuild", net / "train.superseded"
    before = json.loads((train / "summary.json").read_text()) if (train / "summary.json").exists() else {}
    record = {"rebuilt": time.strftime("%Y-%m-%dT%H:%M:%S"), "identical": False, "first_difference": diff,
              "code": code or "current tree", "superseded": {"test_top1": before.get("test_top1"),
                                                            "stages_deleted": [s for s in stages if (net / s).exists()]},
              "why": "the committed run's weights were lost and a bit-identical rebuild was not possible "
                     "here; this is a new network of the same recipe and seed"}
    atomic_write_json(str(work / "rebuilt.json"), record)
    train.rename(old)
    work.rename(train)
    finish_adopt(net, stages)


def finish_adopt(net: Path, stages: Sequence[str]) -> None:
    for stage in stages:
        shutil.rmtree(net / stage, ignore_errors=True)
    shutil.rmtree(net / "train.superseded", ignore_errors=True)


def rebuild(net: Path, train_argv: Sequence[str], code: Optional[str] = None,
            adopt_stages: Optional[Sequence[str]] = None) -> int:
    """Train again into <net>/rebuild/; keep it if identical, else fail (exit 3) or, with
    ``adopt_stages``, adopt it as a new network and delete those evaluation stages."""
    train, work = net / "train", net / "rebuild"
    if (net / "train.superseded").exists() and adopt_stages is not None:  # an adopt was killed midway
        if not train.exists():
            work.rename(train)
        finish_adopt(net, adopt_stages)
        return 0
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
    if diff is not None and adopt_stages is not None:
        adopt(net, diff, adopt_stages, code)
        print(f"rebuild: {net}: not identical ({diff}); adopted as a new network, stages "
              f"{', '.join(adopt_stages)} to run again")
        return 0
    if diff is not None:
        print(f"rebuild: {net}: the rebuilt training differs from the committed record ({diff}); "
              f"train/ left as it was, the new run is in {work}", file=sys.stderr)
        return 3
    (work / "checkpoints").rename(train / "checkpoints")  # same filesystem: atomic
    atomic_write_json(str(train / "rebuilt.json"), {
        "rebuilt": time.strftime("%Y-%m-%dT%H:%M:%S"), "epochs_compared": len(ref), "identical": True,
        "code": code or "current tree", "volatile_fields_ignored": sorted(VOLATILE), "argv": list(train_argv)})
    shutil.rmtree(work)
    print(f"rebuild: {net}: {len(ref)} epochs identical to the committed record; checkpoints restored")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description="rebuild a grid network's checkpoints (see the module docstring)")
    ap.add_argument("net", type=Path)
    ap.add_argument("--code", help="git revision to train with (a worktree of it); default: the current tree")
    ap.add_argument("--adopt", nargs="+", metavar="STAGE",
                    help="on a mismatch adopt the rebuilt run as the network and delete these stage dirs")
    args = ap.parse_args(argv[:cut])
    if not argv[cut + 1:]:
        print("rebuild: no training command after --", file=sys.stderr)
        return 2
    return rebuild(args.net, argv[cut + 1:], args.code, args.adopt)


if __name__ == "__main__":
    sys.exit(main())
