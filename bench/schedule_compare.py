"""Arch-lr schedules side by side (issue 11, "searches that converge"): the same searches (method,
seed, data order, machine) under two schedules, with the convergence criterion per run, the
final cell's smallest decision margin, CPU time, whether the two schedules found the same cell,
and an exact McNemar test on the converged / not-converged pairs.

    python bench/schedule_compare.py runs/sched/cosine runs/sched/cosine2 [--ref results/grid/search]

Each directory holds ``<method>_s<seed>`` search runs; pairs are the names present in both.
``--ref``: a third column set (the grid's record of the first schedule, from another machine).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrna_dist.stats import mcnemar_exact  # noqa: E402
from dsrna_dist.strategies.convergence import run_convergence  # noqa: E402


def row(run: Path) -> Optional[Dict]:
    """Convergence numbers of one finished search run (None while it has no genotype.json)."""
    if not (run / "genotype.json").is_file():
        return None
    c = run_convergence(str(run))
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"converged": bool(c["converged"]), "max_softmax": c.get("max_softmax"),
            "last": f"{c['last_change_arch_step']} / {c['arch_steps']}",
            "margin": c.get("decision_margin"), "cpu_min": (s.get("search_cpu_s") or 0) / 60,
            "genotype": (run / "genotype.json").read_text()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ref", type=Path, default=None)
    args = ap.parse_args(argv)
    names = sorted({p.name for p in args.a.iterdir() if p.is_dir()} & {p.name for p in args.b.iterdir() if p.is_dir()})
    cols = [("ref", args.ref)] if args.ref else []
    cols += [(args.a.name, args.a), (args.b.name, args.b)]
    head = "| run | " + " | ".join(f"{n}: converged, max softmax, last change, margin, CPU min" for n, _ in cols) + \
        f" | same cell ({args.a.name} vs {args.b.name}) |"
    print(head + "\n|" + "---|" * (len(cols) + 2))
    conv = {args.a.name: 0, args.b.name: 0}
    b = c = n = 0
    for name in names:
        rows = [row(d / name) if d is not None else None for _, d in cols]
        if rows[-1] is None or rows[-2] is None:
            continue
        n += 1
        cells = []
        for r in rows:
            if r is None:
                cells.append("-")
                continue
            m = f"{r['margin']:.2g}" if r["margin"] is not None else "-"
            cells.append(f"{'yes' if r['converged'] else 'NO'}, {r['max_softmax']:.3f}, {r['last']}, {m}, {r['cpu_min']:.1f}")
        ra, rb = rows[-2], rows[-1]
        conv[args.a.name] += ra["converged"]
        conv[args.b.name] += rb["converged"]
        b += ra["converged"] and not rb["converged"]
        c += rb["converged"] and not ra["converged"]
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if ra['genotype'] == rb['genotype'] else 'no'} |")
    print(f"\nConverged: {args.a.name} {conv[args.a.name]} of {n}, {args.b.name} {conv[args.b.name]} of {n}; "
          f"discordant pairs {b} ({args.a.name} only) / {c} ({args.b.name} only), exact McNemar p = {mcnemar_exact(b, c):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
