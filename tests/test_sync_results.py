"""bench/sync_results.py: the report's tables replace RESULTS.md's quoted ones, prose is kept,
a table whose first column differs is left alone, and a second run changes nothing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sync_results  # noqa: E402

RESULTS = """# RESULTS

> | claim | a table above the quoted part | stays |

## Results so far (today)

### Searches (three seeds)

| method | seed | converged |
|---|---|---|
| darts | 0 | yes |

Converged per method: darts 1 of 1.

Reading: DARTS converged.

### DSRNA against each baseline

| recipe | diff |
|---|---|
| pbn | +1 |

| other | x |
|---|---|
| a | 1 |

## Reading so far

| method | seed | converged |
|---|---|---|
| kept | - | - |
"""

REPORT = """# report

## Searches: convergence

| method | seed | converged |
|---|---|---|
| darts | 0 | yes |
| pdarts | 0 | yes |

Converged per method: darts 1 of 1; pdarts 1 of 1.

## DSRNA against each baseline

| recipe | diff |
|---|---|
| pbn | +2 |

| renamed | x |
|---|---|
| a | 2 |
"""


@pytest.fixture
def files(tmp_path):
    r, p = tmp_path / "RESULTS.md", tmp_path / "report.md"
    r.write_text(RESULTS)
    p.write_text(REPORT)
    return r, p


def test_tables_replaced_prose_and_other_parts_kept(files, capsys):
    r, p = files
    assert sync_results.main(["--results", str(r), "--report", str(p)]) == 0
    assert r.read_text() == RESULTS  # without --write nothing is touched
    assert "3 table(s) or line(s) to update" in capsys.readouterr().out
    assert sync_results.main(["--results", str(r), "--report", str(p), "--write"]) == 0
    out = r.read_text()
    assert "| pdarts | 0 | yes |\n\nConverged per method: darts 1 of 1; pdarts 1 of 1.\n\nReading" in out
    assert "| pbn | +2 |" in out
    assert "| a | 1 |" in out and "| a | 2 |" not in out  # first column differs: left alone
    assert "first column differs" in capsys.readouterr().out
    assert out.count("| kept | - | - |") == 1 and "a table above the quoted part" in out
    assert out.replace("| pdarts | 0 | yes |\n", "").replace("+2", "+1").replace("; pdarts 1 of 1", "") == RESULTS
    sync_results.main(["--results", str(r), "--report", str(p), "--write"])
    assert r.read_text() == out and "0 table(s) or line(s) updated" in capsys.readouterr().out


def test_missing_file_and_missing_part_are_named(files):
    r, p = files
    with pytest.raises(SystemExit, match="no such file: .*nowhere.md"):
        sync_results.main(["--results", str(r.parent / "nowhere.md"), "--report", str(p)])
    r.write_text(RESULTS.replace("## Results so far", "## Results"))
    with pytest.raises(SystemExit, match="expected one '## Results so far' heading, found 0"):
        sync_results.main(["--results", str(r), "--report", str(p), "--write"])
    assert "## Results (today)" in r.read_text()
