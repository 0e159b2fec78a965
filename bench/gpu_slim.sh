#!/usr/bin/env bash
# Keep results/grid out of what the device tool sends, for one call, and put it back after.
# Why: the tool sends the tracked tree (the index) plus untracked, non-ignored files, 64 MiB in
# all; results/grid (checkpoints, per-example records) is most of the tracked tree and outgrows it.
#   bash bench/gpu_slim.sh hide     # before the device call: untrack results/grid, ignore it here
#   bash bench/gpu_slim.sh restore  # after: the index and .git/info/exclude as they were
# Nothing in the working tree is touched. Stop bench/grid_commit.sh first: a commit made while
# the grid is hidden would record its files as deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
EX="$(git rev-parse --git-path info/exclude)"; LINE=/results/grid/
case "${1:-}" in
  hide)
    if pgrep -f "${GPU_SLIM_GUARD:-grid_commit.sh}" > /dev/null; then
      echo "gpu_slim: bench/grid_commit.sh is running; stop it first (its commits would delete the grid)" >&2; exit 1; fi
    if ! git diff --cached --quiet -- results/grid; then
      echo "gpu_slim: results/grid has staged changes; commit or unstage them first" >&2; exit 1; fi
    mkdir -p "$(dirname "$EX")"; grep -qxF "$LINE" "$EX" 2>/dev/null || echo "$LINE" >> "$EX"
    git rm -r -q --cached results/grid
    echo "gpu_slim: results/grid hidden; sent tree now $( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes plus carried paths" ;;
  restore)
    git reset -q -- results/grid
    if [ -f "$EX" ]; then grep -vxF "$LINE" "$EX" > "$EX.tmp" || true; mv "$EX.tmp" "$EX"; fi
    git diff --cached --quiet -- results/grid && echo "gpu_slim: results/grid restored" ;;
  *) echo "usage: bash bench/gpu_slim.sh hide|restore" >&2; exit 2 ;;
esac
