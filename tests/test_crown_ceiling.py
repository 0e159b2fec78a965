"""bench/crown_ceiling.py: the images of a net's full-CROWN stage certified at the radius
search's ceiling (eps_init * 2 ** (passes + extra - 1)), read from the stage's real files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import crown_ceiling  # noqa: E402


def _net(grid: Path, name: str, radii, other=()) -> None:
    run = grid / "net" / "adv" / name / "crown"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("certify:\n  eps_init: 1.0e-4\n  crown_passes: 4\n  crown_extra_passes: 3\n")
    recs = [{"index": i, "method": "crown", "norm": "inf", "radius": r} for i, r in enumerate(radii)]
    recs += [{"index": i, "method": m, "norm": "inf", "radius": 1.0} for i, m in enumerate(other)]
    (run / "certify.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "summary.json").write_text("{}")


def test_counts_the_float32_ceiling_and_ignores_other_bounds(tmp_path):
    # 6.4e-3 as the stage stores it (float32), above it (a strong warm start), just below it
    _net(tmp_path, "aaa_s0", [0.006399999838322401, 0.035, 0.0063, 0.0], other=["crown-ibp", "ibp"])
    _net(tmp_path, "bbb_s1", [0.0001])
    _net(tmp_path, "ccc_s2", [0.0064])  # its task failed: not in the table
    log = [{"stage": "crown", "recipe": "adv", "rc": 0, "genotype_hash": "aaa", "seed": 0, "methods": ["m1"]},
           {"stage": "crown", "recipe": "adv", "rc": 0, "genotype_hash": "bbb", "seed": 1, "methods": ["m1"]},
           {"stage": "crown", "recipe": "adv", "rc": 1, "genotype_hash": "ccc", "seed": 2, "methods": ["m2"]},
           {"stage": "crown", "recipe": "pbn", "rc": 0, "genotype_hash": "aaa", "seed": 0, "methods": ["m3"]}]
    (tmp_path / "grid_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    n, at, cap = crown_ceiling.net_counts(tmp_path / "net" / "adv" / "aaa_s0" / "crown")
    assert (n, at) == (4, 2) and cap == pytest.approx(6.4e-3)
    lines = crown_ceiling.table(tmp_path, "adv")
    assert lines[0] == "recipe adv; ceiling 0.0064"
    assert lines[3:] == ["| m1 | 2 | 2 of 5 | 0: 2/4, 1: 0/1 |"]


def test_a_config_without_the_passes_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("certify:\n  eps_init: 1.0e-4\n")
    with pytest.raises(SystemExit, match="config.yaml"):
        crown_ceiling.ceiling(tmp_path / "config.yaml")
