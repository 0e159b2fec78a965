"""Where a long certification stands: per bound method and norm, the mean radius so far, how
many examples are certified, the search's resolution and the CPU seconds per example, read
from the run's certify.jsonl alone (evaluate writes summary.json only once every example is
done; a CROWN run over 200 examples spans many sessions on CPU).

    python bench/certify_progress.py results/crown200/darts_s0 [more run dirs]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrna_dist.evaluate import CERTIFY_FILE, read_records, summarize_certified  # noqa: E402


def main(argv=None) -> int:
    runs = sys.argv[1:] if argv is None else argv
    if not runs:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for run in runs:
        path = Path(run) / CERTIFY_FILE
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        recs = read_records(path)
        print(json.dumps({"run": str(run), "examples": len({r["index"] for r in recs}),
                          "certified": summarize_certified(recs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
