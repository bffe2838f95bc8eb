#!/usr/bin/env bash
# RunPod continuous command: `bash runpod.sh` (RunPod "container start command"). Laptop/tests: `bash runpod.sh --once`.
#   bash runpod.sh --check   preflight only (GPU, disk, work dir, remote, W&B), one line per problem
#
# Loops the pipeline until it finishes: `dvc repro --pull <stage>` then `dvc push --run-cache`, stage by stage, so
# finished stages are never recomputed and an interrupted training resumes from its mirrored checkpoint on any pod.
# Failures back off (full jitter); N fast failures in a row stop the loop instead of burning GPU money. TERM/INT are
# forwarded to the child's whole process tree; a child whose log stops growing is killed and retried (watchdog).
# It never exits into RunPod's container-restart loop: on success it stops the pod, sleeps, or (--once) exits 0.
#
# Settings (environment or .env): MEDASR_WORKDIR (default /workspace: venv, caches, logs, local DVC remote),
# MEDASR_VENV (default $MEDASR_WORKDIR/venv), MEDASR_RUN_ID (names the status `medasr pod watch` reads; default
# "default"), MEDASR_STATUS_EVERY_S (60), MEDASR_ALLOW_CPU=1, MEDASR_MIN_FREE_GB (20), MEDASR_MAX_FAST_FAILURES (5), MEDASR_FAST_FAILURE_S (300),
# MEDASR_BACKOFF_BASE_S (10), MEDASR_BACKOFF_MAX_S (600), MEDASR_HUNG_AFTER_S (1800), MEDASR_ON_SUCCESS
# (stop|sleep, default stop on a pod), MEDASR_GIT_PUSH=1 (commit + push dvc.lock when git credentials exist),
# MEDASR_CHILD (replace the pipeline command; for tests).
set -uo pipefail
cd "$(dirname "$0")"
REPO=$PWD

MODE=loop
case "${1:-}" in
  --once) MODE=once ;;
  --check) MODE=check ;;
  "") ;;
  *) echo "usage: bash runpod.sh [--once|--check]" >&2; exit 2 ;;
esac

if [[ -f .env ]]; then set -a; source .env; set +a; fi   # values are never echoed
WORKDIR=${MEDASR_WORKDIR:-/workspace}
LOGS=$WORKDIR/logs
MAX_FAST_FAILURES=${MEDASR_MAX_FAST_FAILURES:-5}
FAST_FAILURE_S=${MEDASR_FAST_FAILURE_S:-300}
BACKOFF_BASE_S=${MEDASR_BACKOFF_BASE_S:-10}
BACKOFF_MAX_S=${MEDASR_BACKOFF_MAX_S:-600}
HUNG_AFTER_S=${MEDASR_HUNG_AFTER_S:-1800}
ON_SUCCESS=${MEDASR_ON_SUCCESS:-stop}
STATUS_EVERY_S=${MEDASR_STATUS_EVERY_S:-60}
VENV=${MEDASR_VENV:-$WORKDIR/venv}
export MEDASR_WORKDIR=$WORKDIR MEDASR_RUN_ID=${MEDASR_RUN_ID:-default}
# caches on the persistent volume, so a new pod does not download everything again
export PIP_CACHE_DIR=$WORKDIR/cache/pip HF_HOME=$WORKDIR/cache/hf NEMO_CACHE_DIR=$WORKDIR/cache/nemo
export DVC_CACHE_DIR=$WORKDIR/cache/dvc

mkdir -p "$LOGS" 2>/dev/null
log() { printf '[runpod.sh %s] %s\n' "$(date -u +%FT%TZ)" "$*" | tee -a "$LOGS/runpod.log" >&2; }
# The heartbeat is JSON: `medasr pod watch` reads it (from the DVC remote) on the user's machine.
heartbeat() {
  local detail=${2:-}; detail=${detail//[\"\\]/\'}
  printf '{"time": %s, "state": "%s", "detail": "%s", "pod": "%s", "run": "%s"}\n' "$(date -u +%s)" "$1" "$detail" \
    "${RUNPOD_POD_ID:-}" "$MEDASR_RUN_ID" > "$LOGS/heartbeat.tmp" && mv "$LOGS/heartbeat.tmp" "$LOGS/heartbeat"
}
PUBLISH=0 PUBLISHER=0 PUBLISHED_AT=-1000000
publish_status() {  # copy the heartbeat to the DVC remote; in the background unless $1 == wait
  (( PUBLISH )) || return 0
  if [[ ${1:-} == wait ]]; then
    timeout 120 medasr remote publish-status --heartbeat "$LOGS/heartbeat" >>"$LOGS/runpod.log" 2>&1
  elif ! kill -0 "$PUBLISHER" 2>/dev/null; then
    medasr remote publish-status --heartbeat "$LOGS/heartbeat" >>"$LOGS/runpod.log" 2>&1 &
    PUBLISHER=$!
  fi
  PUBLISHED_AT=$SECONDS
}

install() {
  # The venv lives on the volume, so a new pod skips the install (a stamp file makes `make install` a no-op).
  heartbeat installing
  make install VENV="$VENV" >>"$LOGS/install.log" 2>&1 || { log "install failed: see $LOGS/install.log"; return 1; }
  export PATH="$VENV/bin:$PATH"
  # the base checkpoint and its LLM's tokenizer into the HF cache on the volume now, not on a stage's GPU time; a
  # failure is not fatal here: the train stage resolves the same files and says what is missing
  [[ $MODE == check ]] || medasr download-model >>"$LOGS/install.log" 2>&1 \
    || log "warning: medasr download-model failed (see $LOGS/install.log); the train stage will try again"
  PUBLISH=1
}

preflight() {
  local problems=0
  if [[ "${MEDASR_ALLOW_CPU:-0}" != 1 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    log "problem: no GPU visible (nvidia-smi missing); set MEDASR_ALLOW_CPU=1 to run on CPU"; problems=1
  fi
  if ! touch "$WORKDIR/.write-test" 2>/dev/null; then
    log "problem: $WORKDIR is not writable (attach a volume or set MEDASR_WORKDIR)"; problems=1
  else
    rm -f "$WORKDIR/.write-test"
    local disk_line   # the floor (MEDASR_MIN_FREE_GB) is doctor's, so both checks agree
    disk_line=$(medasr doctor --disk "$WORKDIR" 2>&1 | tail -n 1) || { log "problem: disk: $disk_line"; problems=1; }
  fi
  local wandb_line  # W&B's mode (a key means online) is decided by medasr, as training decides it
  if wandb_line=$(medasr wandb check 2>&1 | tail -n 1); then   # pipefail: medasr's exit code
    log "$wandb_line"
  elif [[ $MODE == check ]]; then
    log "problem: $wandb_line"; problems=1
  else  # never idle a GPU over logging: the run is kept offline and can be synced later
    log "warning: $wandb_line; training with WANDB_MODE=offline (upload later with \`wandb sync\`)"
    export WANDB_MODE=offline
    log "W&B mode: offline"
  fi
  if ! medasr remote setup >>"$LOGS/runpod.log" 2>&1; then
    log "problem: could not configure the DVC remote (see $LOGS/runpod.log)"; problems=1
  elif [[ $MODE == check ]] && ! remote_ready; then
    problems=1
  fi
  return $problems
}

REMOTE_RC=0
remote_ready() {  # one line either way; REMOTE_RC: 0 reachable, 1 unreachable (retry), 2 refused (give up)
  local line
  line=$(medasr remote check 2>&1 | tail -n 1); REMOTE_RC=$?   # pipefail: medasr's exit code
  (( REMOTE_RC == 0 )) || log "problem: $line"
  return $REMOTE_RC
}

clear_stale_locks() {
  # A SIGKILLed dvc leaves .dvc/tmp/rwlock behind; remove it only when no dvc process of ours is alive.
  if [[ -e .dvc/tmp/rwlock ]] && ! pgrep -u "$(id -u)" -f '(^|/| )dvc( |$)' >/dev/null; then
    log "removing a stale DVC lock (no dvc process alive)"
    rm -f .dvc/tmp/rwlock .dvc/tmp/lock
  fi
}

pipeline() {
  local stage stages
  # dvc.yaml's stages in the order it lists them (testsets before train: a test set that cannot be read fails
  # before any GPU time is spent). No stage list is a failure, never an empty success.
  stages=$(python -c 'import yaml; print(*yaml.safe_load(open("dvc.yaml"))["stages"])') && [[ -n $stages ]] \
    || { echo "cannot read the stage list from dvc.yaml" >&2; return 1; }
  for stage in $stages; do
    dvc repro --pull "$stage" || return 1
    dvc push --run-cache || return 1
  done
}

descendants() {  # every process below $1 (dvc starts stages in their own process groups)
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}

CHILD=0
signal_child() {
  local sig=$1
  if (( CHILD > 0 )); then
    log "forwarding SIG$sig to the pipeline (process tree of $CHILD)"
    # shellcheck disable=SC2046
    kill -s "$sig" -- "-$CHILD" $(descendants "$CHILD") 2>/dev/null
  fi
}
on_signal() {
  STOPPING=$1
  signal_child "$1"
}
STOPPING=""
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

run_child() {
  # Runs the pipeline (or $MEDASR_CHILD) in its own session, logging to a file, with a watchdog on log growth.
  local log_file=$LOGS/pipeline.log size=-1 last_growth=$SECONDS rc
  if [[ -n "${MEDASR_CHILD:-}" ]]; then
    setsid bash -c "$MEDASR_CHILD" >>"$log_file" 2>&1 &
  else
    setsid bash -c "$(declare -f pipeline); pipeline" >>"$log_file" 2>&1 &
  fi
  CHILD=$!
  while kill -0 "$CHILD" 2>/dev/null; do
    heartbeat running "attempt $attempt"
    (( SECONDS - PUBLISHED_AT >= STATUS_EVERY_S )) && publish_status
    local now_size
    now_size=$(stat -c %s "$log_file" 2>/dev/null || echo 0)
    if (( now_size != size )); then size=$now_size; last_growth=$SECONDS; fi
    if (( SECONDS - last_growth > HUNG_AFTER_S )); then
      log "watchdog: no output for ${HUNG_AFTER_S}s, killing the pipeline"
      signal_child TERM; sleep 5; signal_child KILL
    fi
    sleep 1
  done
  wait "$CHILD"; rc=$?
  CHILD=0
  return $rc
}

stop_pod_or_sleep() {
  if [[ $1 == stop && -n "${RUNPOD_POD_ID:-}" ]] && command -v runpodctl >/dev/null; then
    log "stopping pod $RUNPOD_POD_ID (the volume, logs and remote keep everything)"
    runpodctl stop pod "$RUNPOD_POD_ID"
  fi
  exec sleep infinity   # never exit: RunPod would restart the container and loop
}

on_success() {
  heartbeat done
  log "pipeline finished"
  dvc metrics show 2>&1 | tee -a "$LOGS/runpod.log" >&2 || true
  publish_status wait
  if [[ "${MEDASR_GIT_PUSH:-0}" == 1 ]] && git remote get-url origin >/dev/null 2>&1; then
    git add dvc.lock && git commit -qm "runpod: pipeline results $(date -u +%FT%TZ)" && git push -q \
      || log "could not commit/push dvc.lock (git credentials?)"
  fi
  [[ $MODE == once ]] && exit 0
  stop_pod_or_sleep "$ON_SUCCESS"
}

give_up() {  # a problem retrying cannot fix: say why, then stop paying for the GPU
  heartbeat "gave up" "$1"
  log "giving up: $1"
  publish_status wait
  [[ $MODE != loop ]] && exit 1
  stop_pod_or_sleep stop
}

if [[ -z "${MEDASR_CHILD:-}" ]] || [[ $MODE == check ]]; then
  install || give_up "install failed"
  if ! preflight; then
    [[ $MODE == check ]] && exit 1
    give_up "preflight failed (see the problem lines above)"
  fi
  [[ $MODE == check ]] && { log "preflight ok"; exit 0; }
fi

fast_failures=0
attempt=0
while :; do
  attempt=$((attempt + 1))
  clear_stale_locks
  started=$SECONDS
  log "attempt $attempt"
  if (( PUBLISH )) && ! remote_ready; then
    (( REMOTE_RC == 2 )) && give_up "the DVC remote refused access or is not configured (see the problem line above)"
    rc=1 what="DVC remote unreachable"   # back off and retry like any failed attempt
  else
    run_child
    rc=$? what="pipeline failed (exit $rc)"
  fi
  if [[ -n $STOPPING ]]; then
    heartbeat stopped "SIG$STOPPING"
    publish_status wait
    log "stopped by SIG$STOPPING (pipeline exit code $rc)"
    exit $((128 + $([[ $STOPPING == TERM ]] && echo 15 || echo 2)))
  fi
  (( rc == 0 )) && on_success
  if (( SECONDS - started < FAST_FAILURE_S )); then fast_failures=$((fast_failures + 1)); else fast_failures=1; fi
  log "$what (attempt $attempt, $fast_failures fast failure(s) in a row)"
  [[ $what == pipeline* ]] && tail -n 5 "$LOGS/pipeline.log" 2>/dev/null | sed 's/^/    /' >&2
  if (( fast_failures >= MAX_FAST_FAILURES )); then
    give_up "$fast_failures fast failures in a row ($what): fix the cause (see $LOGS) instead of retrying"
  fi
  cap=$(( BACKOFF_BASE_S * (1 << (fast_failures > 10 ? 10 : fast_failures)) ))
  (( cap > BACKOFF_MAX_S )) && cap=$BACKOFF_MAX_S
  delay=$(( cap > 0 ? RANDOM % (cap + 1) : 0 ))   # full jitter
  log "retrying in ${delay}s"
  heartbeat backoff "${delay}s after attempt $attempt"
  publish_status
  sleep "$delay" & wait $!
  if [[ -n $STOPPING ]]; then log "stopped by SIG$STOPPING during backoff"; exit $((128 + $([[ $STOPPING == TERM ]] && echo 15 || echo 2))); fi
done
