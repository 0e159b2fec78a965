"""Issue 11's DSRNA search checks, from finished search runs (README "Convergence at CPU scale").

    python bench/dsrna_vs_pcdarts.py --base results/fmnist_small/pcdarts_s0_wd0 \
        runs/fmnist_small/dsrna_jacobian_s0 runs/fmnist_small/dsrna_cb_s0

Per run: mean per-edge L1 distance between its final softmax(alpha) and the base run's (same
seed and data order), how many genotype entries differ, and from TensorBoard (``tb/``, when the
run dir still has it) the range of the logged ``grad_share``, DSRNA-CB's bound gap and eps over
the last half of the logged steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch


def final_softmax(run: Path) -> Dict[str, torch.Tensor]:
    rec = [json.loads(line) for line in (run / "alphas.jsonl").read_text().splitlines() if line.strip()][-1]
    return {k: torch.tensor(rec[k]).softmax(-1) for k in ("alphas_normal", "alphas_reduce")}


def last_half(run: Path, tags=("step/grad_share", "step/metric/bound_gap", "step/metric/eps")) -> Dict[str, dict]:
    if not (run / "tb").is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    out = {}
    for t in tags:
        if t in ea.Tags()["scalars"]:
            v = [e.value for e in ea.Scalars(t)]
            h = v[len(v) // 2:]
            out[t] = {"n": len(v), "last_half_min": min(h), "last_half_max": max(h)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--base", type=Path, required=True, help="the run to compare with (e.g. PC-DARTS, same seed)")
    args = ap.parse_args()
    base, gb = final_softmax(args.base), json.loads((args.base / "genotype.json").read_text())
    for run in args.runs:
        a, ga = final_softmax(run), json.loads((run / "genotype.json").read_text())
        l1 = {k: round(float((a[k] - base[k]).abs().sum(-1).mean()), 4) for k in a}
        diff = sum(x != y for c in ("normal", "reduce") for x, y in zip(ga[c], gb[c]))
        n = sum(len(ga[c]) for c in ("normal", "reduce"))
        print(run.name, json.dumps({"mean_edge_L1_softmax_alpha": l1, "genotype_entries_differing": f"{diff}/{n}",
                                    **last_half(run)}))


if __name__ == "__main__":
    main()
