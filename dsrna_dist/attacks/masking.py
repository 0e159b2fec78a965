"""Gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness", Sec. 5).

A robust accuracy is only an upper bound on the true one; these checks look for the symptoms of
an attack that failed because the model's gradients mislead it, so a reviewer sees a warning
instead of a silently optimistic number:

- ``eps_monotone``: robust accuracy must not rise with eps (the eps sweep, from the clean point
  at eps = 0): an adversarial example at a small eps is also one at every larger eps.
- ``huge_eps``: PGD at a huge l_inf eps (1.0 = the whole [0,1] box) must reach 0%.
- ``effort``: more work must never help the model: FGSM < PGD-k < PGD-K < PGD-K x restarts
  < AutoAttack at the same eps and norm (the check attacks use step 2.5 eps / steps, Madry et
  al., and share one seed, so restart 0 of the restarted PGD is the plain one).
- ``blackbox``: a score-based attack (Square) must not beat the strongest white-box attack at
  the same eps and norm.

Every comparison is made on the examples both attacks ran on, and flags only when it goes the
wrong way by more than ``tolerance`` percentage points (or ``tolerance_examples`` examples,
whichever is larger): attacks with random starts are noisy by an example or two.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import AttackConfig, EvalConfig

PREFIX = "mask/"
EFFORT_ATTACKS = ("fgsm", "pgd", "autoattack")


def check_specs(cfg: EvalConfig) -> List[Tuple[str, AttackConfig, str]]:
    """The extra attacks the checks need: (key for errors, attack config, role)."""
    m = cfg.masking
    if not m.enabled:
        return []
    first = next((a for a in cfg.attacks if a.name == "pgd"), None)
    eps = m.eps or (first.eps if first is not None else 0.0)
    norm = m.norm or (first.norm if first is not None else "inf")
    out: List[Tuple[str, AttackConfig, str]] = []
    if eps > 0:
        out.append(("masking", AttackConfig(name="fgsm", eps=eps, norm=norm, label=f"{PREFIX}FGSM"), "effort"))
        steps = sorted({int(s) for s in m.steps if int(s) >= 1})
        for k, s in enumerate(steps):
            base = AttackConfig(name="pgd", eps=eps, norm=norm, steps=s, step_size=2.5 * eps / s)
            out.append(("masking.steps", replace(base, label=f"{PREFIX}PGD-{s}"), "effort"))
            if k == len(steps) - 1 and m.restarts > 1:
                out.append(("masking.restarts", replace(base, restarts=m.restarts,
                                                        label=f"{PREFIX}PGD-{s}x{m.restarts}"), "effort"))
        if m.blackbox_queries and norm == "inf":
            out.append(("masking.blackbox_queries", AttackConfig(name="square", eps=eps, norm="inf",
                                                                 steps=m.blackbox_queries,
                                                                 label=f"{PREFIX}Square-{m.blackbox_queries}"),
                        "blackbox"))
    out.append(("masking.huge_eps", AttackConfig(name="pgd", eps=m.huge_eps, norm="inf", steps=m.huge_steps,
                                                 step_size=m.huge_eps / 4,
                                                 label=f"{PREFIX}PGD-{m.huge_steps}@{m.huge_eps:g}"), "huge"))
    return out


# --------------------------------------------------------------------------- the checks
def _per_example(records: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[int, bool]]:
    by: Dict[str, Dict[int, bool]] = {}
    for r in records:
        by.setdefault(r["attack"], {})[int(r["index"])] = bool(r["correct"])
    return by


def _acc(col: Mapping[int, bool], idx: Sequence[int]) -> float:
    return 100.0 * sum(col[i] for i in idx) / len(idx)


def _common(*cols: Mapping[int, bool]) -> List[int]:
    keys = set(cols[0])
    for c in cols[1:]:
        keys &= set(c)
    return sorted(keys)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def run_checks(records: Sequence[Mapping[str, Any]], attacks: Sequence[Tuple[str, Any, Mapping[str, Any]]],
               tolerance: float = 1.0, tolerance_examples: int = 1) -> Dict[str, Any]:
    """``{"checks": [...], "flagged": [names], "warnings": [messages]}`` from attacks.jsonl records.

    ``attacks``: (label, attack, meta) as evaluate builds them (meta: name, eps, norm, sweep,
    role, steps, restarts, blackbox).
    """
    col = _per_example(records)
    meta = {lab: dict(m) for lab, _, m in attacks if lab in col}

    def tol(n: int) -> float:
        return max(tolerance, 100.0 * tolerance_examples / max(n, 1))

    checks: List[Dict[str, Any]] = []

    def add(name: str, status: str, message: str, **values: Any) -> None:
        checks.append({"check": name, "status": status, "message": message, **values})

    # ---- accuracy falls monotonically with eps (the sweep, from the clean point)
    sweep = sorted(((m["eps"], lab) for lab, m in meta.items() if m.get("sweep")), key=lambda t: t[0])
    if "clean" in col and sweep and not any(_same(e, 0.0) for e, _ in sweep):
        sweep = [(0.0, "clean")] + sweep
    if len(sweep) >= 2:
        idx = _common(*(col[lab] for _, lab in sweep))
        pts = [(e, lab, _acc(col[lab], idx)) for e, lab in sweep]
        worst, pair = 0.0, None
        for j in range(1, len(pts)):
            i = min(range(j), key=lambda k: pts[k][2])
            if pts[j][2] - pts[i][2] > worst:
                worst, pair = pts[j][2] - pts[i][2], (pts[i], pts[j])
        t = tol(len(idx))
        if pair and worst > t:
            (e0, _, a0), (e1, _, a1) = pair
            add("eps_monotone", "flagged", f"robust accuracy rises with eps: {a0:.2f}% at eps {e0:g} but {a1:.2f}% at "
                f"eps {e1:g} (+{worst:.2f} pp > tolerance {t:.2f}); an adversarial example at the smaller eps is one "
                "at the larger: the attack fails at larger radii (gradient masking?)", worst_pp=worst, tolerance_pp=t,
                n=len(idx), points=[{"eps": e, "acc": a} for e, _, a in pts])
        else:
            add("eps_monotone", "ok", f"robust accuracy non-increasing in eps (within {t:.2f} pp)", worst_pp=worst,
                tolerance_pp=t, n=len(idx), points=[{"eps": e, "acc": a} for e, _, a in pts])
    else:
        add("eps_monotone", "skipped", "no eps sweep")

    # ---- PGD at a huge eps reaches 0%
    huge = [lab for lab, m in meta.items() if m.get("role") == "huge"]
    if huge:
        lab = huge[0]
        idx = sorted(col[lab])
        a, t = _acc(col[lab], idx), tol(len(idx))
        m = meta[lab]
        if a > t:
            add("huge_eps", "flagged", f"PGD at l_{m['norm']} eps {m['eps']:g} leaves {a:.2f}% robust (> {t:.2f}); "
                "every image is within reach, so the attack, not the model, failed (gradient masking?)",
                acc=a, tolerance_pp=t, n=len(idx), attack=lab)
        else:
            add("huge_eps", "ok", f"PGD at l_{m['norm']} eps {m['eps']:g} reaches {a:.2f}%", acc=a, tolerance_pp=t,
                n=len(idx), attack=lab)
    else:
        add("huge_eps", "skipped", "no huge-eps attack (masking.enabled false)")

    # ---- more effort never helps the model (same eps and norm)
    def effort(m: Mapping[str, Any]) -> Optional[float]:
        if m.get("sweep") or m.get("name") not in EFFORT_ATTACKS:
            return None
        if m["name"] == "fgsm":
            return 1.0
        if m["name"] == "autoattack":
            return math.inf
        return float(m.get("steps") or 1) * float(m.get("restarts") or 1)

    def reach(m: Mapping[str, Any]) -> Optional[float]:
        """How far the attack can walk, steps x step size in units of eps (None: not known).
        More steps with a much smaller step size reach less (PGD-20 at eps/4 walks 5 eps, the
        masking check's PGD-50 at 2.5 eps/50 walks 2.5 eps); such a pair says nothing about
        masking, so it is not compared."""
        if m["name"] == "fgsm":
            return 1.0
        if m["name"] == "autoattack":
            return math.inf
        ss, eps = float(m.get("step_size") or 0), float(m.get("eps") or 0)
        return float(m.get("steps") or 1) * ss / eps if ss > 0 and eps > 0 else None

    def dominates(b: Mapping[str, Any], a: Mapping[str, Any]) -> bool:
        ra, rb = reach(a), reach(b)
        return effort(a) < effort(b) and (ra is None or rb is None or rb >= ra * (1 - 1e-9))

    groups: Dict[Tuple[str, float], List[str]] = {}
    for lab, m in meta.items():
        if effort(m) is not None:
            key = next((k for k in groups if k[0] == m["norm"] and _same(k[1], m["eps"])), (m["norm"], m["eps"]))
            groups.setdefault(key, []).append(lab)
    info: Optional[Dict[str, Any]] = None  # the pair that goes the wrong way the most (beyond its tolerance)
    n_pairs = 0
    for (norm, eps), labs in groups.items():
        for a in labs:
            for b in labs:
                if dominates(meta[b], meta[a]):
                    idx = _common(col[a], col[b])
                    if not idx:
                        continue
                    n_pairs += 1
                    acc_a, acc_b = _acc(col[a], idx), _acc(col[b], idx)
                    t = tol(len(idx))
                    if info is None or acc_b - acc_a - t > info["excess"]:
                        info = {"excess": acc_b - acc_a - t, "worst_pp": acc_b - acc_a, "weaker": a, "stronger": b,
                                "acc_weaker": acc_a, "acc_stronger": acc_b, "norm": norm, "eps": eps,
                                "n": len(idx), "tolerance_pp": t}
    if not n_pairs:
        add("effort", "skipped", "no two attacks of different effort (and no shorter reach) at the same eps and norm")
    elif info["excess"] > 0:
        i = info
        add("effort", "flagged", f"more effort helps the model: {i['stronger']} leaves {i['acc_stronger']:.2f}% but "
            f"the weaker {i['weaker']} {i['acc_weaker']:.2f}% (l_{i['norm']} eps {i['eps']:g}, {i['n']} examples, "
            f"+{i['worst_pp']:.2f} pp > {i['tolerance_pp']:.2f}); the stronger attack got stuck (gradient masking?)",
            pairs=n_pairs, **{k: v for k, v in i.items() if k != "excess"})
    else:
        add("effort", "ok", f"more steps/restarts never helped the model ({n_pairs} pairs compared)", pairs=n_pairs,
            **{k: v for k, v in info.items() if k != "excess"})

    # ---- a black-box attack does not beat the white-box ones
    bb = [lab for lab, m in meta.items() if m.get("blackbox")]
    info, n_pairs = None, 0  # the white-box attack that does best against the black-box one
    for b in bb:
        mb = meta[b]
        for w, mw in meta.items():
            if mw.get("blackbox") or w == "clean" or mw.get("sweep") or mw.get("role") == "huge":
                continue
            if mw["norm"] != mb["norm"] or not _same(mw["eps"], mb["eps"]):
                continue
            idx = _common(col[b], col[w])
            if not idx:
                continue
            n_pairs += 1
            acc_b, acc_w = _acc(col[b], idx), _acc(col[w], idx)
            t = tol(len(idx))
            # beating a weak white-box attack (FGSM) is normal: compare with the strongest one
            if info is None or acc_w - acc_b - t < info["excess"]:
                info = {"excess": acc_w - acc_b - t, "worst_pp": acc_w - acc_b, "blackbox": b, "whitebox": w,
                        "acc_blackbox": acc_b, "acc_whitebox": acc_w, "n": len(idx), "tolerance_pp": t}
    if not n_pairs:
        add("blackbox", "skipped", "no black-box attack next to a white-box one at the same eps and norm")
    elif info["excess"] > 0:
        i = info
        add("blackbox", "flagged", f"black-box {i['blackbox']} leaves {i['acc_blackbox']:.2f}% but white-box "
            f"{i['whitebox']} {i['acc_whitebox']:.2f}% ({i['n']} examples, +{i['worst_pp']:.2f} pp > "
            f"{i['tolerance_pp']:.2f}): the gradients mislead the white-box attack (gradient masking?)",
            pairs=n_pairs, **{k: v for k, v in i.items() if k != "excess"})
    else:
        add("blackbox", "ok", f"no black-box attack beats a white-box one ({n_pairs} pairs)", pairs=n_pairs,
            **{k: v for k, v in info.items() if k != "excess"})
    flagged = [c["check"] for c in checks if c["status"] == "flagged"]
    return {"checks": checks, "flagged": flagged,
            "warnings": [c["message"] for c in checks if c["status"] == "flagged"]}
