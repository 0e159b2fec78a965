"""A replication on fresh seeds, read against a plan fixed before their data (issue #15).

Seeds 0-2 suggested the grid's leads (DSRNA-CB's AutoAttack lead over DARTS on pbn above all);
testing a lead on the seeds that suggested it overstates it. ``results/grid/replication_plan.json``
names, before any of the new seeds ran, the seeds, the one primary test and the secondary ones
(Holm among themselves); this module reads it and scores the new seeds alone. A test's verdict
is read only once every planned seed has its value on both sides: before that the test is blinded,
a count with no estimate and no p (no peeking at, or stopping on, a half-finished replication).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dsrna_dist import stats

KEYS = ("recipe", "dsrna", "baseline", "metric")


class PlanError(ValueError):
    """The plan file is malformed; the message names the file and the field."""


def load_plan(path: Path) -> Optional[Dict[str, Any]]:
    """The plan, validated; None when there is no plan file."""
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
    except ValueError as e:
        raise PlanError(f"{path}: not JSON ({e})") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{path}: expected an object")
    seeds = plan.get("seeds")
    if not (isinstance(seeds, list) and len(seeds) >= 2 and all(isinstance(s, int) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise PlanError(f"{path}: 'seeds' must be a list of >= 2 distinct integers")
    alpha = plan.get("alpha")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise PlanError(f"{path}: 'alpha' must be a number in (0, 1)")
    tests = [("primary", plan.get("primary"))] + [
        (f"secondary[{i}]", t) for i, t in enumerate(plan.get("secondary") or [])]
    if not isinstance(plan.get("secondary", []), list):
        raise PlanError(f"{path}: 'secondary' must be a list")
    for where, t in tests:
        if not isinstance(t, dict):
            raise PlanError(f"{path}: '{where}' must be an object with {', '.join(KEYS)}")
        for k in KEYS:
            if not isinstance(t.get(k), str) or not t[k]:
                raise PlanError(f"{path}: '{where}.{k}' must be a non-empty string")
    return plan


def _values(series: Dict[str, Dict[int, float]], method: str, seeds: List[int]) -> Dict[int, float]:
    return {s: v for s, v in (series.get(method) or {}).items() if s in seeds}


def _welch(a: Dict[int, float], b: Dict[int, float]) -> Optional[stats.TTest]:
    """Welch's test, or None where it is undefined (< 2 values a side) or degenerate (no spread
    on either side: its p of 0 or 1 is a convention, not evidence a replication can rest on)."""
    if len(a) < 2 or len(b) < 2 or stats.std(list(a.values())) + stats.std(list(b.values())) == 0:
        return None
    return stats.welch(list(a.values()), list(b.values()))


def score(plan: Dict[str, Any], series: Dict[tuple, Dict[str, Dict[int, float]]]) -> List[Dict[str, Any]]:
    """One row per planned test. ``series[(recipe, metric)][method][seed]`` holds every finished
    value (all seeds); the test uses the plan's seeds only. Until every planned seed is in on both
    sides the test is blinded (no estimate, no p), so nobody reads, or stops on, an interim value.
    Beside it, for reference: the same comparison on the seeds outside the plan (the ones that
    suggested the lead) while it is interim, over every seed once it is complete."""
    seeds = list(plan["seeds"])
    rows = []
    planned = [("primary", plan["primary"])] + [("secondary", t) for t in plan.get("secondary") or []]
    for role, t in planned:
        by = series.get((t["recipe"], t["metric"]), {})
        a, b = _values(by, t["dsrna"], seeds), _values(by, t["baseline"], seeds)
        complete = len(a) == len(b) == len(seeds)
        w = _welch(a, b) if complete else None
        ref_d, ref_b = by.get(t["dsrna"]) or {}, by.get(t["baseline"]) or {}
        if not complete:
            ref_d = {s: v for s, v in ref_d.items() if s not in seeds}
            ref_b = {s: v for s, v in ref_b.items() if s not in seeds}
        ref = _welch(ref_d, ref_b)
        rows.append({"role": role, **{k: t[k] for k in KEYS}, "n": [len(a), len(b)], "planned_n": len(seeds),
                     "complete": complete, "diff": w.diff if w else None, "welch_p": w.p if w else None,
                     "reference": {"over": "all seeds" if complete else "seeds outside the plan",
                                   "n": [len(ref_d), len(ref_b)],
                                   "diff": ref.diff if ref else None, "welch_p": ref.p if ref else None}})
    # Holm over the planned family: a secondary with no test (or not yet complete) counts as p = 1,
    # so the family size is the plan's, never shrunk by a degenerate test.
    sec = [r for r in rows if r["role"] == "secondary"]
    for r, h in zip(sec, stats.holm([1.0 if r["welch_p"] is None else r["welch_p"] for r in sec])):
        r["holm_p"] = None if r["welch_p"] is None else h
    alpha = float(plan["alpha"])
    for r in rows:
        p = r["welch_p"] if r["role"] == "primary" else r.get("holm_p")
        if not r["complete"]:
            r["verdict"] = f"interim ({r['n'][0]} vs {r['n'][1]} of {r['planned_n']} seeds): blinded"
        elif p is None:
            r["verdict"] = "no test (no spread or too few values)"
        elif p < alpha:
            r["verdict"] = "replicated: DSRNA higher" if r["diff"] > 0 else "reversed: DSRNA lower"
        else:
            r["verdict"] = f"not replicated (p >= {alpha:g})"
    return rows


def lines(plan: Dict[str, Any], rows: List[Dict[str, Any]],
          searches: Sequence[Dict[str, Any]] = ()) -> List[str]:
    """The report section; ``searches``: the plan's seeds' search rows (method, seed, converged),
    whose convergence it counts (every cell counts in the tests, converged or not)."""
    f = (lambda v, fmt: "-" if v is None else format(v, fmt))
    out = ["", "## Replication on fresh seeds (plan fixed before their data)", "",
           f"`results/grid/replication_plan.json` ({plan.get('fixed', 'undated')}): seeds "
           f"{', '.join(map(str, plan['seeds']))} only, Welch's two-sided t-test at alpha {plan['alpha']:g}; the "
           "primary test alone, the secondary ones Holm-adjusted among themselves. A verdict is read only "
           "when every planned seed has its value on both sides; until then the test is blinded (no estimate, "
           "no p). Holm counts every planned secondary test (one with no test as p = 1). 'Reference' is the "
           "same comparison, for reference only: on the seeds outside the plan (the ones that suggested the "
           "lead) while the test is interim, on every seed once it is complete.", "",
           "| role | recipe | DSRNA | baseline | metric | diff | Welch p | Holm | n | verdict | reference: over, diff, p, n |",
           "|---" * 11 + "|"]
    for r in rows:
        a = r["reference"]
        out.append(f"| {r['role']} | {r['recipe']} | {r['dsrna']} | {r['baseline']} | {r['metric']} | "
                   f"{f(r['diff'], '+.3g')} | {f(r['welch_p'], '.3g')} | {f(r.get('holm_p'), '.3g')} | "
                   f"{r['n'][0]} vs {r['n'][1]} | {r['verdict']} | {a['over']}: {f(a['diff'], '+.3g')}, {f(a['welch_p'], '.3g')}, "
                   f"{a['n'][0]} vs {a['n'][1]} |")
    conv: Dict[str, List[bool]] = {}
    for r in searches:
        if r.get("converged") is not None:
            conv.setdefault(r["method"], []).append(bool(r["converged"]))
    if conv:
        out += ["", "Converged on these seeds (every cell counts in the tests above, converged or not): " +
                "; ".join(f"{m} {sum(v)} of {len(v)}" for m, v in conv.items()) + "."]
    return out
