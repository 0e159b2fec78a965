"""bench/grid_queue.py: every step is a valid grid.py invocation, steps run in order from --from,
and an unknown step name is refused with the name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import grid  # noqa: E402
import grid_queue  # noqa: E402


@pytest.mark.parametrize("name, args", grid_queue.STEPS, ids=[n for n, _ in grid_queue.STEPS])
def test_each_step_is_a_valid_grid_invocation(tmp_path, monkeypatch, capsys, name, args):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    assert grid.main([*args, "--status"]) == 0  # argparse exits 2 on a misspelt method or stage
    assert "usage" not in capsys.readouterr().err


def test_the_queue_runs_its_steps_in_order_from_the_named_one(monkeypatch):
    seen = []
    monkeypatch.setattr(grid, "main", lambda a: seen.append(list(a)) or (1 if "crown" in a else 0))
    assert grid_queue.main(["--from", "group2-autoattack"]) == 1  # a failed step is reported, the rest still run
    assert seen == [a for _, a in grid_queue.STEPS[1:]]


def test_an_unknown_step_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(grid, "main", lambda a: pytest.fail("ran a step"))
    with pytest.raises(SystemExit, match="no step 'grop3'"):
        grid_queue.main(["--from", "grop3"])


def test_list_prints_the_commands_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(grid, "main", lambda a: pytest.fail("ran a step"))
    assert grid_queue.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in out] == [n for n, _ in grid_queue.STEPS]
    assert out[0].endswith("--seeds 3 4 5 6 7 8 9 --recipes pbn --stages search train eval certify autoattack")
