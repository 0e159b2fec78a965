"""Soundness check of an evaluate run, per example: an example certified at eps (radius >= eps,
l_inf) must not be broken by the run's PGD attack at that eps. Prints, per bound method, how many
examples are certified at eps and how many of them PGD broke (violations; must be 0); exit 1 if
any, 2 if the run has no such records (missing file, no record of the attack or no l_inf radius).

    python bench/check_certified_vs_pgd.py RUN_DIR 0.05 [--attack PGD-20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsrna_dist.engine.io import read_jsonl  # noqa: E402


def check(run: Path, eps: float, attack: str = "PGD-20") -> Dict[str, Dict[str, int]]:
    """Per bound method: examples certified at ``eps`` and violations (PGD broke them).
    Raises ValueError (naming the file) when there is nothing to check."""
    try:
        att, cert = (read_jsonl(run / f, missing_ok=False) for f in ("attacks.jsonl", "certify.jsonl"))
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename}: no such file (is {run} an evaluate run directory?)") from None
    pgd = {r["index"]: bool(r["correct"]) for r in att if "index" in r and r.get("attack") == attack}
    if not pgd:
        raise ValueError(f"{run / 'attacks.jsonl'}: no records of attack {attack!r}")
    out: Dict[str, Dict[str, int]] = {}
    for r in cert:
        if r.get("norm") != "inf" or "radius" not in r:
            continue
        o = out.setdefault(r["method"], {"records": 0, "certified": 0, "violations": 0, "attacked": len(pgd)})
        o["records"] += 1
        if r["radius"] >= eps:
            o["certified"] += 1
            o["violations"] += int(not pgd.get(r["index"], True))
    if not out:
        raise ValueError(f"{run / 'certify.jsonl'}: no l_inf radius records")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("eps", type=float)
    ap.add_argument("--attack", default="PGD-20", help="attack label in attacks.jsonl")
    a = ap.parse_args(argv)
    try:
        res = check(a.run, a.eps, a.attack)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m, o in sorted(res.items()):
        print(f"{m}: certified at {a.eps:g}: {o['certified']} of {o['attacked']} attacked "
              f"({100 * o['certified'] / o['attacked']:.1f}%), violations (certified but {a.attack} broke it): "
              f"{o['violations']}")
    return 1 if any(o["violations"] for o in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
