"""The pre-registered replication (bench/replication.py): the planned seeds alone are tested,
verdicts wait for every planned seed, the secondary tests are Holm-adjusted among themselves,
and a malformed plan stops the report with a message naming the field, writing nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy import stats as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import grid  # noqa: E402
import grid_report  # noqa: E402
import replication  # noqa: E402

PRIMARY = {"recipe": "pbn", "dsrna": "dsrna_cb", "baseline": "darts", "metric": "AutoAttack @0.02 (200)"}
SECONDARY = [{**PRIMARY, "metric": "PGD-20 @0.02"}, {**PRIMARY, "metric": "clean"}]


def plan(**kw):
    return {"fixed": "test", "seeds": [3, 4, 5], "alpha": 0.05, "primary": PRIMARY, "secondary": SECONDARY, **kw}


def series(cb: dict, darts: dict, metric: str = "AutoAttack @0.02 (200)") -> dict:
    return {("pbn", metric): {"dsrna_cb": cb, "darts": darts}}


def test_only_the_planned_seeds_are_tested_and_match_scipy():
    # seeds 0-2 carry a huge lead that the new seeds do not: the verdict must ignore them
    cb = {0: 90.0, 1: 91.0, 2: 89.0, 3: 40.0, 4: 44.0, 5: 41.0}
    darts = {0: 20.0, 1: 22.0, 2: 21.0, 3: 41.0, 4: 43.0, 5: 42.5}
    row = replication.score(plan(), series(cb, darts))[0]
    want = st.ttest_ind([40, 44, 41], [41, 43, 42.5], equal_var=False)
    assert row["n"] == [3, 3] and row["complete"]
    assert row["welch_p"] == pytest.approx(want.pvalue) and row["diff"] == pytest.approx(-0.5)
    assert row["verdict"].startswith("not replicated")
    allp = st.ttest_ind(list(cb.values()), list(darts.values()), equal_var=False).pvalue
    ref = row["reference"]  # once complete, the reference pools every seed
    assert ref["over"] == "all seeds" and ref["welch_p"] == pytest.approx(allp) and ref["n"] == [6, 6]


@pytest.mark.parametrize("cb, verdict", [({3: 60.0, 4: 62.0, 5: 61.0}, "replicated: DSRNA higher"),
                                         ({3: 20.0, 4: 22.0, 5: 21.0}, "reversed: DSRNA lower")])
def test_a_clear_difference_on_the_new_seeds_gets_its_direction(cb, verdict):
    darts = {3: 40.0, 4: 41.5, 5: 39.0}
    row = replication.score(plan(), series(cb, darts))[0]
    assert row["welch_p"] < 0.05 and row["verdict"] == verdict


def test_an_interim_test_is_blinded_and_its_reference_uses_only_the_earlier_seeds():
    cb, darts = {0: 70.0, 1: 72.0, 3: 60.0, 4: 62.0, 5: 61.0}, {0: 50.0, 1: 53.0, 3: 40.0, 4: 41.5}
    row = replication.score(plan(), series(cb, darts))[0]
    assert not row["complete"] and row["verdict"] == "interim (3 vs 2 of 3 seeds): blinded"
    assert row["diff"] is None and row["welch_p"] is None  # nothing to read, or stop on, yet
    ref = row["reference"]
    assert ref["over"] == "seeds outside the plan" and ref["n"] == [2, 2]
    assert ref["welch_p"] == pytest.approx(st.ttest_ind([70, 72], [50, 53], equal_var=False).pvalue)
    text = "\n".join(replication.lines(plan(), [row]))
    assert "| - | - | - | 3 vs 2 | interim (3 vs 2 of 3 seeds): blinded | seeds outside the plan: +19.5," in text


def test_zero_spread_on_both_sides_is_no_test():
    row = replication.score(plan(), series({3: 0.0, 4: 0.0, 5: 0.0}, {3: 1.0, 4: 1.0, 5: 1.0}))[0]
    assert row["welch_p"] is None and row["verdict"].startswith("no test")


def test_secondary_tests_are_holm_adjusted_among_themselves_not_with_the_primary():
    s = {("pbn", "AutoAttack @0.02 (200)"): {"dsrna_cb": {3: 50.0, 4: 52.0, 5: 51.0}, "darts": {3: 40.0, 4: 41.0, 5: 39.5}},
         ("pbn", "PGD-20 @0.02"): {"dsrna_cb": {3: 30.0, 4: 33.0, 5: 31.0}, "darts": {3: 25.0, 4: 27.5, 5: 26.0}},
         ("pbn", "clean"): {"dsrna_cb": {3: 90.0, 4: 91.0, 5: 90.4}, "darts": {3: 90.2, 4: 90.9, 5: 90.6}}}
    rows = replication.score(plan(), s)
    ps = [r["welch_p"] for r in rows[1:]]
    lo, hi = sorted(ps)
    holm = [min(1.0, 2 * lo), max(min(1.0, 2 * lo), min(1.0, hi))]
    assert sorted(r["holm_p"] for r in rows[1:]) == pytest.approx(holm)
    assert "holm_p" not in rows[0]  # the primary is tested alone, at alpha
    assert rows[0]["verdict"] == "replicated: DSRNA higher"


def test_holm_counts_a_secondary_with_no_test_in_the_family():
    s = {("pbn", "PGD-20 @0.02"): {"dsrna_cb": {3: 30.0, 4: 33.0, 5: 31.0}, "darts": {3: 25.0, 4: 27.5, 5: 26.0}},
         ("pbn", "clean"): {"dsrna_cb": {3: 90.0, 4: 90.0, 5: 90.0}, "darts": {3: 91.0, 4: 91.0, 5: 91.0}}}
    rows = replication.score(plan(), s)
    p = st.ttest_ind([30, 33, 31], [25, 27.5, 26], equal_var=False).pvalue
    assert rows[2]["welch_p"] is None and rows[2]["holm_p"] is None
    assert rows[1]["holm_p"] == pytest.approx(min(1.0, 2 * p))  # m = 2 planned, not the 1 defined


@pytest.mark.parametrize("bad, field", [({"seeds": [3]}, "'seeds'"), ({"seeds": [3, 3]}, "'seeds'"),
                                        ({"alpha": 0}, "'alpha'"), ({"primary": None}, "'primary'"),
                                        ({"secondary": [{**PRIMARY, "metric": ""}]}, "'secondary[0].metric'"),
                                        ({"secondary": {"x": 1}}, "'secondary'")])
def test_a_malformed_plan_names_its_field_and_the_report_writes_nothing(tmp_path, monkeypatch, capsys, bad, field):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    monkeypatch.setattr(grid_report, "OUT", tmp_path)
    f = tmp_path / "replication_plan.json"
    f.write_text(json.dumps(plan(**bad)))
    with pytest.raises(replication.PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        replication.load_plan(f)
    assert grid_report.main(["--out", str(tmp_path / "r.md")]) == 2
    assert str(f) in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "grid.json").exists()


def test_the_report_carries_the_replication_section(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    monkeypatch.setattr(grid_report, "OUT", tmp_path)
    cell = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]], "normal_concat": [2],
            "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}
    clean = {("darts", 3): 90.0, ("darts", 4): 91.0, ("dsrna_cb", 3): 88.0, ("dsrna_cb", 4): 88.5,
             ("darts", 0): 80.0, ("darts", 1): 81.0, ("dsrna_cb", 0): 85.0, ("dsrna_cb", 1): 87.0}
    for (m, s), a in clean.items():
        d = tmp_path / "search" / f"{m}_s{s}"
        d.mkdir(parents=True)
        second = ["skip_connect", "max_pool_3x3", None, "avg_pool_3x3", "sep_conv_5x5"][s]  # a cell per seed
        c = {**cell, "normal": [["sep_conv_3x3" if m == "darts" else "avg_pool_3x3", 0], [second, 1]]}
        (d / "genotype.json").write_text(json.dumps(c))
        (d / "summary.json").write_text(json.dumps({"convergence": {"converged": True}}))
        ev = tmp_path / "net" / "pbn" / f"{grid.genotype_hash(d / 'genotype.json')}_s{s}" / "eval"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps({"clean_acc": a, "robust_acc": {}}))
    (tmp_path / "replication_plan.json").write_text(json.dumps(plan(seeds=[3, 4], secondary=[SECONDARY[1]])))
    assert grid_report.main(["--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "## Replication on fresh seeds (plan fixed before their data)" in text
    assert "| primary | pbn | dsrna_cb | darts | AutoAttack @0.02 (200) | - | - | - | 0 vs 0 | interim" in text
    res = json.loads((tmp_path / "grid.json").read_text())
    rows = res["replication"]
    assert rows[1]["metric"] == "clean" and rows[1]["diff"] == pytest.approx(-2.25) and rows[1]["complete"]
    assert rows[1]["welch_p"] == pytest.approx(st.ttest_ind([88, 88.5], [90, 91], equal_var=False).pvalue)
    assert rows[1]["reference"]["n"] == [4, 4] and rows[1]["reference"]["over"] == "all seeds"
    # the fresh seeds stay out of the main tables and tests: those are seeds 0-1 alone
    main = [t for t in res["tests"] if t["recipe"] == "pbn" and t["metric"] == "clean"]
    assert [t["n"] for t in main] == [[2, 2]] and main[0]["diff"] == pytest.approx(5.5)
    assert sorted(r["seed"] for r in res["nets"]["pbn"]["darts"]) == [0, 1]
    assert sorted(r["seed"] for r in res["replication_nets"]["pbn"]["darts"]) == [3, 4]
    assert "| darts | 3 |" in text  # the search list shows every seed
    assert "Converged on these seeds (every cell counts in the tests above, converged or not): " in text
