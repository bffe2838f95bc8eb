#!/usr/bin/env bash
# RunPod continuous command: `bash runpod.sh` (or `bash runpod.sh --once` on a laptop: exit 0 when done).
#
# SKELETON. It installs the pinned environment and loops `dvc repro` with full-jitter exponential backoff,
# giving up after MEDASR_MAX_FAILURES failures in a row. The S3-remote issue completes it: caches and venv on
# /workspace, preflight checks, `dvc repro --pull` + `dvc push --run-cache` per stage, signal forwarding to DVC's
# process group, heartbeat and watchdog, and stopping the pod when done.
set -uo pipefail
cd "$(dirname "$0")"

MAX_FAILURES="${MEDASR_MAX_FAILURES:-5}"
MAX_DELAY="${MEDASR_MAX_BACKOFF_S:-600}"

make install || { echo "runpod.sh: install failed" >&2; exit 1; }
export PATH="$PWD/.venv/bin:$PATH"
[[ -f .env ]] && { set -a; source .env; set +a; }   # values are never echoed

failures=0
delay=15
until dvc repro; do
  failures=$((failures + 1))
  if (( failures >= MAX_FAILURES )); then
    echo "runpod.sh: dvc repro failed ${failures} times in a row; giving up instead of burning GPU time" >&2
    break
  fi
  wait_s=$(( (RANDOM % delay) + 1 ))
  echo "runpod.sh: dvc repro failed (${failures}/${MAX_FAILURES}); retrying in ${wait_s}s" >&2
  sleep "${wait_s}"
  delay=$(( delay * 2 > MAX_DELAY ? MAX_DELAY : delay * 2 ))
done

(( failures < MAX_FAILURES )) && dvc metrics show
[[ "${1:-}" == "--once" ]] && exit $(( failures >= MAX_FAILURES ))
# A continuous command that exits makes RunPod restart the container (and re-run everything): stay up instead.
exec sleep infinity
