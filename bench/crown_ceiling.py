"""How many of the grid's full-CROWN radii stopped at the radius search's ceiling, per method.

Why: the `crown` stage gives each image at most ``crown_passes + crown_extra_passes`` full passes,
each stepping eps at most 2x from ``eps_init`` while the margin stays flat, so an image whose
cheaper warm start is weak (CROWN-IBP ~0) cannot be certified above
``eps_init * 2 ** (passes + extra - 1)`` (6.4e-3 with the grid's 1e-4, 4 + 3). A net whose images
sit there is censored: its mean radius says where the search stopped, not where the bound fails.
Counting the images certified at the ceiling is the uncensored reading (certified accuracy at
that eps, of the stage's correctly classified images).

    python bench/crown_ceiling.py                 # PGD-AT nets (recipe adv)
    python bench/crown_ceiling.py --recipe pbn
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dsrna_dist.bounds.certify import _SMALL_STEP  # noqa: E402  (the step cap on a flat margin)
from dsrna_dist.engine.io import read_jsonl  # noqa: E402

GRID = ROOT / "results" / "grid"


def ceiling(config: Path) -> float:
    """The largest eps a weakly warm-started image can reach under the stage's config."""
    cert = (yaml.safe_load(config.read_text()) or {}).get("certify") or {}
    try:
        passes = int(cert["crown_passes"]) + int(cert.get("crown_extra_passes", 0))
        return float(cert["eps_init"]) * _SMALL_STEP ** (passes - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"crown_ceiling: {config}: certify.eps_init / crown_passes missing or bad ({e})")


def net_counts(run: Path) -> Tuple[int, int, float]:
    """(images, images certified at or above the ceiling, ceiling) of one net's crown stage."""
    cap = ceiling(run / "config.yaml")
    n = at = 0
    for r in read_jsonl(run / "certify.jsonl", missing_ok=False):
        if r.get("method") == "crown" and r.get("norm") == "inf":
            n += 1
            at += r["radius"] >= cap * (1 - 1e-6)  # stored as float32: 6.4e-3 reads 6.3999998e-3
    return n, at, cap


def methods_by_net(grid: Path, recipe: str) -> Dict[str, str]:
    """'<hash>_s<seed>' -> method, from the crown tasks of the grid's log (one method per net)."""
    out = {}
    for r in read_jsonl(grid / "grid_log.jsonl", missing_ok=False):
        if r.get("stage") == "crown" and r.get("recipe") == recipe and r.get("rc") == 0:
            out[f"{r['genotype_hash']}_s{r['seed']}"] = r["methods"][0]
    return out


def table(grid: Path, recipe: str) -> List[str]:
    per: Dict[str, List[Tuple[int, int, int]]] = defaultdict(list)
    caps = set()
    for net, meth in sorted(methods_by_net(grid, recipe).items()):
        run = grid / "net" / recipe / net / "crown"
        if (run / "summary.json").exists():
            n, at, cap = net_counts(run)
            caps.add(cap)
            per[meth].append((int(net.rsplit("_s", 1)[1]), at, n))
    lines = [f"recipe {recipe}; ceiling {', '.join(f'{c:.3g}' for c in sorted(caps))}",
             "| method | nets | images certified at the ceiling or above | per net (seed: at / images) |", "|---|---|---|---|"]
    for meth, v in sorted(per.items()):
        lines.append(f"| {meth} | {len(v)} | {sum(a for _, a, _ in v)} of {sum(n for _, _, n in v)} | "
                     + ", ".join(f"{s}: {a}/{n}" for s, a, n in sorted(v)) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="adv")
    ap.add_argument("--grid", default=str(GRID))
    a = ap.parse_args(argv)
    print("\n".join(table(Path(a.grid), a.recipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
