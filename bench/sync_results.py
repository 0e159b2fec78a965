"""Copy the tables of ``results/grid/report.md`` into RESULTS.md's "Results so far", prose untouched.

RESULTS.md quotes the report's tables, each followed by its reading; after ``grid_report.py``
regenerates the report, this puts the new tables in place so the two never disagree. A table is
matched by its section (RESULTS.md's ``###`` heading to the report's ``##`` one, by the prefixes
in ``SECTIONS``) and its position in the section, and is replaced only when its first column
header is the same in both; anything that does not match is listed and left alone. The report's
one-line summaries named in ``LINES`` are copied too, where each occurs once on both sides.

    python bench/sync_results.py            # list what would change
    python bench/sync_results.py --write    # write RESULTS.md (atomically)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsrna_dist.engine.io import atomic_write_text  # noqa: E402
PART = "## Results so far"  # the part of RESULTS.md that quotes the report

#: RESULTS.md section heading prefix -> report section heading prefix (the longest prefix wins)
SECTIONS: Dict[str, str] = {
    "Searches": "Searches: convergence",
    "Natural retraining": "Retrained with natural training:",
    "Natural retraining with precise BN": "Retrained with natural training and precise BN",
    "Capacity control": "Capacity controls",
    "PGD adversarial training": "Retrained with PGD adversarial",
    "Certified (IBP) training": "Retrained with certified (IBP)",
    "DSRNA against each baseline": "DSRNA against each baseline",
    "The paper's tables in its form": "The paper's tables in its form",
    "Certified radius against the cell's convolutions": "Certified radius against the cell's convolutions",
    "Certified radius on the log scale": "Certified radius on the log scale",
    "Certified radius against accuracy and robustness": "Certified radius against accuracy and robustness",
    "Accuracy and robustness against the cell's convolutions": "Accuracy and robustness against the cell's convolutions",
}


#: report lines (by prefix) that RESULTS.md quotes verbatim beside the tables
LINES = ("Parameter-free ops (pools, skip) in the found cells", "Converged per method:")


def sections(lines: List[str], level: int, lo: int = 0, hi: Optional[int] = None) -> Dict[str, List[int]]:
    """heading -> the line numbers under it (deeper headings included), for ``level`` headings
    between lines ``lo`` and ``hi``."""
    out: Dict[str, List[int]] = {}
    cur = None
    for i in range(lo, len(lines) if hi is None else hi):
        m = re.match(r"^(#+) (.*)", lines[i])
        if m and len(m.group(1)) <= level:
            cur = m.group(2).strip() if len(m.group(1)) == level else None
            if cur is not None:
                out[cur] = []
            continue
        if cur is not None:
            out[cur].append(i)
    return out


def tables(lines: List[str], idx: List[int]) -> List[Tuple[int, int]]:
    """(first, last) line of each markdown table among the lines ``idx``."""
    out: List[Tuple[int, int]] = []
    for i in idx:
        if not lines[i].startswith("|"):
            continue
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def report_section(heading: str, report: Dict[str, List[int]]) -> Optional[str]:
    keys = [k for k in SECTIONS if heading.startswith(k)]
    if not keys:
        return None
    want = SECTIONS[max(keys, key=len)]
    hits = [h for h in report if h.startswith(want)]
    return hits[0] if len(hits) == 1 else None


def plan(results: List[str], report: List[str]) -> Tuple[List[Tuple[int, int, List[str]]], List[str]]:
    """The replacements (first, last, new lines) and a note for each table left alone."""
    starts = [i for i, l in enumerate(results) if l.startswith(PART)]
    if len(starts) != 1:
        raise SystemExit(f"sync_results.py: RESULTS.md: expected one '{PART}' heading, found {len(starts)}")
    lo = starts[0]
    hi = next((i for i in range(lo + 1, len(results)) if results[i].startswith("## ")), len(results))
    rsec, psec = sections(results, 3, lo + 1, hi), sections(report, 2)
    repl, notes = [], []
    for heading, idx in rsec.items():
        ours = tables(results, idx)
        if not ours:
            continue
        src = report_section(heading, psec)
        if src is None:
            notes.append(f"no report section for '{heading}'")
            continue
        theirs = tables(report, psec[src])
        for n, (a, b) in enumerate(ours):
            if n >= len(theirs):
                notes.append(f"'{heading}': table {n + 1} has no counterpart in the report")
                continue
            c, d = theirs[n]
            if results[a].split("|")[1] != report[c].split("|")[1]:
                notes.append(f"'{heading}': table {n + 1}'s first column differs; left alone")
                continue
            new = report[c:d + 1]
            if new != results[a:b + 1]:
                repl.append((a, b, new))
    for prefix in LINES:
        ours_l = [i for i in range(lo, hi) if results[i].startswith(prefix)]
        theirs_l = [l for l in report if l.startswith(prefix)]
        if len(ours_l) != 1 or len(theirs_l) != 1:
            notes.append(f"line '{prefix}': {len(ours_l)} in RESULTS.md, {len(theirs_l)} in the report")
        elif results[ours_l[0]] != theirs_l[0]:
            repl.append((ours_l[0], ours_l[0], theirs_l))
    return repl, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    ap.add_argument("--report", default=str(ROOT / "results" / "grid" / "report.md"))
    ap.add_argument("--write", action="store_true", help="write the changes (default: list them)")
    args = ap.parse_args(argv)
    for f in (args.results, args.report):
        if not Path(f).is_file():
            raise SystemExit(f"sync_results.py: no such file: {f}")
    results = Path(args.results).read_text().split("\n")
    report = Path(args.report).read_text().split("\n")
    repl, notes = plan(results, report)
    for note in notes:
        print(f"left alone: {note}")
    for a, b, new in repl:
        print(f"at line {a + 1}: {b - a + 1} -> {len(new)} lines ({results[a][:60]}...)")
    if args.write and repl:
        for a, b, new in sorted(repl, reverse=True):
            results[a:b + 1] = new
        atomic_write_text(args.results, "\n".join(results))
    print(f"{len(repl)} table(s) or line(s) {'updated' if args.write else 'to update'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
