"""Soundness check of an evaluate run, per example: an example certified at eps (radius >= eps,
l_inf) must not be broken by the run's PGD attack at that eps. Prints, per bound method, how many
examples are certified at eps and how many of them PGD broke (violations; must be 0); exit 1 if
any.

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
    """Per bound method: examples certified at ``eps`` and violations (PGD broke them)."""
    att = [r for r in read_jsonl(run / "attacks.jsonl") if "index" in r]
    pgd = {r["index"]: bool(r["correct"]) for r in att if r["attack"] == attack}
    if not pgd:
        raise SystemExit(f"{run / 'attacks.jsonl'}: no records of attack {attack!r}")
    out: Dict[str, Dict[str, int]] = {}
    for r in read_jsonl(run / "certify.jsonl"):
        if r.get("norm") != "inf" or "radius" not in r:
            continue
        o = out.setdefault(r["method"], {"records": 0, "certified": 0, "violations": 0, "attacked": len(pgd)})
        o["records"] += 1
        if r["radius"] >= eps:
            o["certified"] += 1
            o["violations"] += int(not pgd.get(r["index"], True))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("eps", type=float)
    ap.add_argument("--attack", default="PGD-20", help="attack label in attacks.jsonl")
    a = ap.parse_args(argv)
    res = check(a.run, a.eps, a.attack)
    for m, o in sorted(res.items()):
        print(f"{m}: certified at {a.eps:g}: {o['certified']} of {o['attacked']} attacked "
              f"({100 * o['certified'] / o['attacked']:.1f}%), violations (certified but {a.attack} broke it): "
              f"{o['violations']}")
    return 1 if any(o["violations"] for o in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
