#!/usr/bin/env bash
# Commit issue 15's finished grid stages as they land, one commit per stage directory (those with
# a summary.json and uncommitted files), each with results/grid/grid_log.jsonl. A session can end
# hard at any time; what finished is then already in git, and a running stage (no summary yet)
# is left to its resumable worker.
#   bash bench/grid_commit.sh                 # once
#   nohup bash bench/grid_commit.sh 600 > commit.log 2>&1 &   # every 600 s beside the workers
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
EVERY=${1:-0}
case "$EVERY" in ''|*[!0-9]*) echo "grid_commit.sh: the interval must be whole seconds, got '$EVERY'" >&2; exit 2 ;; esac
commit_done() {
  local s d rel
  while IFS= read -r s; do
    d=$(dirname "$s")
    [ -n "$(git status --porcelain -- "$d")" ] || continue
    rel=${d#results/grid/}
    git add -- "$d" results/grid/grid_log.jsonl &&
      git commit -q -m "#15 grid: $rel" -- "$d" results/grid/grid_log.jsonl &&
      echo "$(date -u +%T) committed $rel"
  done < <(find results/grid/search results/grid/net results/grid/control -name summary.json 2>/dev/null | sort)
}
commit_done
while [ "$EVERY" -gt 0 ]; do sleep "$EVERY"; commit_done; done
