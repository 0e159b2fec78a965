"""``dsrna_dist.engine.io.read_jsonl``: the one JSONL reader (results, metrics, alpha history).

A killed writer tears the last line only: dropped. A bad line before the last: an error naming
the file and the line (it used to be skipped silently by two of the three readers)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dsrna_dist.engine.io import JSONLError, read_jsonl
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

ROOT = Path(__file__).resolve().parents[1]
RECS = [{"index": i, "epoch": i, "x": 0.1 * i} for i in range(4)]


def write(p: Path, recs, tail: str = "") -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return p


def test_round_trip_and_blank_lines(tmp_path):
    p = write(tmp_path / "a.jsonl", RECS)
    assert read_jsonl(p) == RECS
    p.write_text("\n" + json.dumps(RECS[0]) + "\n\n  \n" + json.dumps(RECS[1]) + "\n")
    assert read_jsonl(p) == RECS[:2]


@pytest.mark.parametrize("cut", [1, 7, -2])
def test_torn_last_line_is_dropped(tmp_path, cut):
    line = json.dumps({"index": 9, "label": 1, "clean_pred": 3})
    p = write(tmp_path / "a.jsonl", RECS, tail=line[:cut])  # a kill mid-write, no newline
    assert read_jsonl(p) == RECS
    p = write(tmp_path / "b.jsonl", RECS, tail=line[:cut] + "\n\n")  # newline written, line torn
    assert read_jsonl(p) == RECS


@pytest.mark.parametrize("bad,what", [('{"index": 1, "x"', "not valid JSON"), ("[1, 2]", "not an object")])
def test_bad_middle_line_names_file_and_line(tmp_path, bad, what):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(RECS[0]) + "\n\n" + bad + "\n" + json.dumps(RECS[1]) + "\n")
    with pytest.raises(JSONLError, match=rf"m\.jsonl: line 3 .*{what}"):
        read_jsonl(p)


def test_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl", missing_ok=False)


def test_callers_share_the_reader(tmp_path):
    """evaluate's result files, the search's alpha history, convergence and train's metrics."""
    from dsrna_dist.evaluate import read_records
    from dsrna_dist.search_artifacts import read_alpha_history
    from dsrna_dist.strategies.convergence import run_convergence

    p = write(tmp_path / "attacks.jsonl", RECS + [{"no_index": 1}], tail='{"index": 4, "lab')
    assert read_records(p) == RECS
    assert read_alpha_history(p, 2) == RECS[:2]
    p.write_text(json.dumps(RECS[0]) + "\nnot json\n" + json.dumps(RECS[1]) + "\n")
    for f in (read_records, lambda q: read_alpha_history(q, 9)):
        with pytest.raises(JSONLError, match="line 2"):
            f(p)
    (tmp_path / "alphas.jsonl").write_text(p.read_text())
    with pytest.raises(JSONLError, match="alphas.jsonl: line 2"):
        run_convergence(str(tmp_path))


def test_train_truncates_metrics_on_resume_through_the_reader(tmp_path):
    from types import SimpleNamespace

    from dsrna_dist.train import _truncate_metrics

    p = write(tmp_path / "metrics.jsonl", RECS, tail='{"epoch": 4, "lo')
    _truncate_metrics(SimpleNamespace(is_main=True, run_dir=tmp_path), 2)
    assert p.read_text() == "".join(json.dumps(r) + "\n" for r in RECS[:2])  # byte-identical lines kept


def test_report_cli_names_a_damaged_file(tmp_path):
    """The report exits 2 with the file and line instead of silently dropping a record."""
    run = tmp_path / "runs" / "train0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {genotype: DARTS_V2}\ndata: {name: synthetic}\n")
    write(run / "metrics.jsonl", [{"epoch": 0, "test_top1": 10.0}])
    out = tmp_path / "r.md"
    cmd = [sys.executable, "-m", "dsrna_dist.report", f"--runs={tmp_path / 'runs'}", f"--out={out}", "--plots=false"]
    assert run_proc(cmd, cwd=ROOT, timeout=120).returncode == 0
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo\n{"epoch": 1, "test_top1": 10.0}\n')
    r = run_proc(cmd, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "metrics.jsonl: line 2" in r.stderr, r.stderr
