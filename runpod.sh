#!/usr/bin/env bash
# RunPod continuous command: the pod's start command ends in `exec bash runpod.sh`, so this script is the container's
# PID 1. Laptop/tests: `bash runpod.sh --once` (exits when the pipeline finishes or gives up).
#   bash runpod.sh --check   preflight only (GPU, disk, work dir, remote, W&B, the remote's lease, the pod's budget),
#                            one line per problem
#
# Loops the pipeline until it finishes: `dvc repro --pull <stage>` then `dvc push --run-cache`, stage by stage, so
# finished stages are never recomputed and an interrupted training resumes from its mirrored checkpoint on any pod.
# Each attempt first takes the DVC remote's lease (`medasr loop lease take`; one pod per remote, since all share its
# checkpoints), sweeps the temp files of killed writes, and checks the disk and the pod's deadline and budget.
# Failures back off (full jitter). It gives up, and stops the pod, after N fast failures or K attempts in a row that
# made no progress (no new checkpoint step, no stage finished: `medasr loop progress`), so a failure that repeats
# itself does not bill the GPU forever.
# While the pipeline runs, one background process (`medasr loop beat --lease --every`, its warnings in
# $MEDASR_WORKDIR/logs/beat.log) copies the heartbeat to the remote every MEDASR_STATUS_EVERY_S (whole seconds) and
# renews the lease; when another pod has taken the lease, this one stops its pipeline and its pod without publishing
# anything (the run's status is the other pod's now).
# Stop signals (TERM/INT, RunPod's stop): DVC runs a stage as a plain child of its own process, in its process group,
# so the signal goes by pid: SIGTERM to the stage process (every stage command writes its pid to
# $MEDASR_STAGE_PIDFILE; it stops its own data workers and DDP ranks, which must not get the signal themselves) and
# to the pipeline's shell, which then starts nothing new; with no stage running, to the pipeline's whole process
# tree. As PID 1 this script must outlive them (the kernel kills every process left when PID 1 exits), so it waits,
# up to train.stop_grace_s (params.yaml) + MEDASR_STOP_MARGIN_S, then KILLs the tree. A pipeline whose log stops
# growing gets the same TERM, bounded wait and KILL (watchdog), and is retried.
# It never exits into RunPod's container-restart loop: on success it stops the pod (or sleeps), or (--once) exits.
#
# Settings (environment, or .env: KEY=VALUE lines taken literally, no `$` expansion; the environment wins):
# MEDASR_WORKDIR (default /workspace: venv, caches, DVC cache, logs, local DVC remote), MEDASR_VENV (default
# $MEDASR_WORKDIR/venv), MEDASR_RUN_ID (names the status `medasr pod watch` reads; default "default"),
# MEDASR_STATUS_EVERY_S (60), MEDASR_ALLOW_CPU=1, MEDASR_MIN_FREE_GB (20), MEDASR_MAX_FAST_FAILURES (5),
# MEDASR_FAST_FAILURE_S (300), MEDASR_MAX_STALLED_ATTEMPTS (3), MEDASR_BACKOFF_BASE_S (10), MEDASR_BACKOFF_MAX_S
# (600), MEDASR_HUNG_AFTER_S (1800), MEDASR_STOP_MARGIN_S (60), MEDASR_ON_SUCCESS (stop|sleep, default stop on a
# pod), MEDASR_GIT_PUSH=1 (commit dvc.lock and push it to branch medasr-runs/<run id>, with MEDASR_GIT_TOKEN when
# set, given to git by a credential helper, never on a command line or in .git/config). Read by `medasr loop`:
# MEDASR_LEASE_TTL_S (900), MEDASR_LEASE_SETTLE_S (20), MEDASR_DEADLINE_H and MEDASR_MAX_USD (counted from the pod's
# start; off when unset), MEDASR_STOP_RETRIES (4), MEDASR_STOP_BACKOFF_S (5), RUNPOD_API_KEY, MEDASR_RUNPOD_API_URL.
# For tests only: MEDASR_CHILD (a command run instead of the pipeline), MEDASR_TEST_SKIP_SETUP=1 (no install and no
# preflight; the per-attempt steps above still run).
set -uo pipefail
cd "$(dirname "$0")" || exit 1

case "${1:-}" in
  --once | --check | "") ;;
  *) echo "usage: bash runpod.sh [--once|--check]" >&2; exit 2 ;;
esac

load_dotenv() {  # as the CLI's load_dotenv(override=False), but never expanding `$`: a secret may contain one
  [[ -f .env ]] || return 0
  local line key value exported
  exported=" $(compgen -e | tr '\n' ' ') "
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
    key=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]%$'\r'}
    [[ $exported == *" $key "* ]] && continue
    if [[ $value =~ ^\'([^\']*)\' || $value =~ ^\"([^\"]*)\" ]]; then
      value=${BASH_REMATCH[1]}
    else  # unquoted: a ` #` starts a comment; trailing blanks go
      value=${value%%[[:space:]]#*}
      value=${value%"${value##*[![:space:]]}"}
    fi
    export "$key=$value"
  done <.env
}
load_dotenv   # values are never echoed

MODE=loop
[[ ${1:-} == --once ]] && MODE=once
[[ ${1:-} == --check ]] && MODE=check
WORKDIR=${MEDASR_WORKDIR:-/workspace}
LOGS=$WORKDIR/logs
MAX_FAST_FAILURES=${MEDASR_MAX_FAST_FAILURES:-5}
FAST_FAILURE_S=${MEDASR_FAST_FAILURE_S:-300}
MAX_STALLED_ATTEMPTS=${MEDASR_MAX_STALLED_ATTEMPTS:-3}
BACKOFF_BASE_S=${MEDASR_BACKOFF_BASE_S:-10}
BACKOFF_MAX_S=${MEDASR_BACKOFF_MAX_S:-600}
HUNG_AFTER_S=${MEDASR_HUNG_AFTER_S:-1800}
STOP_MARGIN_S=${MEDASR_STOP_MARGIN_S:-60}
ON_SUCCESS=${MEDASR_ON_SUCCESS:-stop}
STATUS_EVERY_S=${MEDASR_STATUS_EVERY_S:-60}
VENV=${MEDASR_VENV:-$WORKDIR/venv}
export MEDASR_WORKDIR=$WORKDIR MEDASR_RUN_ID=${MEDASR_RUN_ID:-default}
# the stage commands write their pid here; the lease names this loop's process as its holder
export MEDASR_STAGE_PIDFILE=$LOGS/stage.pid MEDASR_LEASE_PID=$$
# the git token is for git_push alone: no stage, tracker or DVC process gets it in its environment
export -n MEDASR_GIT_TOKEN 2>/dev/null
# caches on the persistent volume, so a new pod does not download everything again (DVC's: in preflight)
export PIP_CACHE_DIR=$WORKDIR/cache/pip HF_HOME=$WORKDIR/cache/hf NEMO_CACHE_DIR=$WORKDIR/cache/nemo

mkdir -p "$LOGS" 2>/dev/null
log() { printf '[runpod.sh %s] %s\n' "$(date -u +%FT%TZ)" "$*" | tee -a "$LOGS/runpod.log" >&2; }
last_line() { tail -n 1 | tr -d '\r'; }

# --- the heartbeat: one JSON object, which `medasr pod watch` reads from the DVC remote -------------------------------
heartbeat() {
  local detail=${2:-}
  detail=${detail//[\"\\]/\'} detail=${detail//[[:cntrl:]]/ }
  printf '{"time": %s, "state": "%s", "detail": "%s", "pod": "%s", "run": "%s"}\n' "$(date -u +%s)" "$1" "$detail" \
    "${RUNPOD_POD_ID:-}" "$MEDASR_RUN_ID" >"$LOGS/heartbeat.tmp" && mv "$LOGS/heartbeat.tmp" "$LOGS/heartbeat"
}
LEASE_LOST=""  # set when another pod holds the lease: this pod then publishes nothing more
publish() {  # the heartbeat to the remote now (states other than running); `medasr loop beat` adds the step
  [[ -z $LEASE_LOST ]] || return 0
  local line rc=0
  # --lease: a pod that lost the lease since the last beat must not write over the status of the pod that has it
  line=$(timeout 120 medasr loop beat --lease --heartbeat "$LOGS/heartbeat" 2>&1 >/dev/null) || rc=$?
  if (( rc == 2 )); then LEASE_LOST=$(last_line <<<"$line"); log "$LEASE_LOST: status not published"
  elif (( rc )); then log "warning: the status was not published: $(last_line <<<"$line")"; fi
}
PUBLISHER=0 PUBLISHER_AT=0
start_publisher() {  # one process beats every STATUS_EVERY_S (the remote opened once); exit 2: the lease is lost
  medasr loop beat --heartbeat "$LOGS/heartbeat" --lease --every "$STATUS_EVERY_S" >/dev/null 2>>"$LOGS/beat.log" &
  PUBLISHER=$! PUBLISHER_AT=$SECONDS
}
publisher_ended() {  # $1: its exit code. 2: another pod holds the lease (its line, the log's last, says which)
  PUBLISHER=0
  (( $1 == 2 )) && LEASE_LOST=$(last_line <"$LOGS/beat.log") && LEASE_LOST=${LEASE_LOST:-lease lost}
}
check_publisher() {  # stop the pipeline when the lease is lost; restart a publisher that died, at most once a period
  if (( PUBLISHER )) && ! running "$PUBLISHER"; then
    wait "$PUBLISHER"
    local rc=$?
    publisher_ended $rc
    if [[ -n $LEASE_LOST ]]; then begin_stop "$LEASE_LOST"; return; fi
    log "warning: the heartbeat publisher exited (code $rc): $(last_line <"$LOGS/beat.log")"
  fi
  (( PUBLISHER )) || [[ -n $LEASE_LOST ]] || (( SECONDS - PUBLISHER_AT < STATUS_EVERY_S )) || start_publisher
}
stop_publisher() {  # SIGTERM: its beat in flight lands first, so no "running" comes after the loop's final status
  (( PUBLISHER )) || return 0
  local rc until=$(( SECONDS + 120 ))
  kill -TERM "$PUBLISHER" 2>/dev/null
  while running "$PUBLISHER" && (( SECONDS < until )); do sleep 0.2 & wait $!; done
  running "$PUBLISHER" && { log "warning: the heartbeat publisher did not stop: SIGKILL"; kill -KILL "$PUBLISHER"; }
  while :; do wait "$PUBLISHER"; rc=$?; running "$PUBLISHER" || break; done   # a signal to us interrupts `wait`
  publisher_ended $rc
}

# --- setup: once per container start ----------------------------------------------------------------------------------
background() {  # run "$@" in the background and wait: a stop signal is acted on at once, not when it ends
  "$@" & wait $!
  local rc=$?
  [[ -n $STOPPING ]] && { kill $! 2>/dev/null; stopped; }
  return $rc
}

install() {
  # The venv lives on the volume, so a new pod skips the install (a stamp file makes `make install` a no-op).
  # --check writes no heartbeat: a live loop on this pod owns it
  [[ $MODE == check ]] || heartbeat installing
  background make install VENV="$VENV" >>"$LOGS/install.log" 2>&1 \
    || { log "install failed: see $LOGS/install.log"; return 1; }
  export PATH="$VENV/bin:$PATH"
  # the base checkpoint and its LLM's tokenizer into the HF cache on the volume now, not on a stage's GPU time; a
  # failure is not fatal here: the train stage resolves the same files and says what is missing
  [[ $MODE == check ]] || background medasr download-model >>"$LOGS/install.log" 2>&1 \
    || log "warning: medasr download-model failed (see $LOGS/install.log); the train stage will try again"
}

preflight() {
  local problems=0 line
  if [[ "${MEDASR_ALLOW_CPU:-0}" != 1 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    log "problem: no GPU visible (nvidia-smi missing); set MEDASR_ALLOW_CPU=1 to run on CPU"; problems=1
  fi
  if ! touch "$WORKDIR/.write-test" 2>/dev/null; then
    log "problem: $WORKDIR is not writable (attach a volume or set MEDASR_WORKDIR)"; problems=1
  else
    rm -f "$WORKDIR/.write-test"
    disk_ok || problems=1
  fi
  if line=$(medasr wandb check 2>&1 | last_line); then   # W&B's mode (a key means online) is medasr's decision
    log "$line"
  elif [[ $MODE == check ]]; then
    log "problem: $line"; problems=1
  else  # never idle a GPU over logging: the run is kept offline and can be synced later
    log "warning: $line; training with WANDB_MODE=offline (upload later with \`wandb sync\`)"
    export WANDB_MODE=offline
    log "W&B mode: offline"
  fi
  # DVC's cache on the volume outside the checkout, so a checkout cloned again reuses it (DVC reads no variable for it)
  dvc cache dir --local "$WORKDIR/cache/dvc" >>"$LOGS/runpod.log" 2>&1 \
    || { log "problem: could not put the DVC cache in $WORKDIR/cache/dvc (see $LOGS/runpod.log)"; problems=1; }
  if ! medasr remote setup >>"$LOGS/runpod.log" 2>&1; then
    log "problem: could not configure the DVC remote (see $LOGS/runpod.log)"; problems=1
  elif [[ $MODE == check ]]; then
    remote_ready && { lease_free || problems=1; }
    (( REMOTE_RC == 0 )) || problems=1
    budget_left || problems=1
  fi
  return $problems
}

DISK_LINE="" BUDGET_LINE=""
disk_ok() {  # the floor (MEDASR_MIN_FREE_GB) is doctor's, so both checks agree
  DISK_LINE=$(medasr doctor --disk "$WORKDIR" 2>&1 | last_line) && return 0
  log "problem: disk low: $DISK_LINE"
  return 1
}

budget_left() {  # the pod's deadline and budget (MEDASR_DEADLINE_H, MEDASR_MAX_USD), off when not on a pod
  local line rc
  line=$(medasr loop budget 2>&1 | last_line); rc=$?
  if (( rc == 2 )); then log "problem: $line"; BUDGET_LINE=$line; return 1; fi
  [[ -z $line ]] || log "$line"
  return 0
}

lease_free() {  # --check: whether another live pod holds the remote's lease (read only: nothing is taken)
  local line
  line=$(medasr loop lease check 2>&1 | last_line) && { log "$line"; return 0; }
  log "problem: $line"
  return 1
}

REMOTE_RC=0
remote_ready() {  # one line either way; REMOTE_RC: 0 reachable, 1 unreachable (retry), 2 refused (give up)
  local line
  line=$(medasr remote check 2>&1 | last_line); REMOTE_RC=$?   # pipefail: medasr's exit code
  (( REMOTE_RC == 0 )) || log "problem: $line"
  return $REMOTE_RC
}

# --- one attempt ------------------------------------------------------------------------------------------------------
clear_stale_locks() {
  # A SIGKILLed dvc leaves .dvc/tmp/rwlock behind; remove it only when no dvc process of ours is alive (the lease
  # keeps other pods off this checkout's remote, and so off a volume they would share).
  if [[ -e .dvc/tmp/rwlock ]] && ! pgrep -u "$(id -u)" -f '(^|/| )dvc( |$)' >/dev/null; then
    log "removing a stale DVC lock (no dvc process alive)"
    rm -f .dvc/tmp/rwlock .dvc/tmp/lock
  fi
}

take_lease() {  # 0 held by this loop; 1 not now (retry); 2 another pod holds it (LEASE_LOST says who)
  local line rc
  line=$(medasr loop lease take 2>&1 | last_line); rc=$?
  case $rc in
    0) log "$line" ;;
    2) LEASE_LOST=$line ;;
    *) log "problem: $line"; rc=1 ;;
  esac
  return $rc
}

release_lease() {
  [[ -z $LEASE_LOST ]] || return 0
  local line
  line=$(timeout 120 medasr loop lease release 2>&1 | last_line) || log "warning: lease not released: $line"
}

progress() { medasr loop progress 2>/dev/null | last_line || echo unknown; }

stop_bound() {  # seconds a stopping pipeline gets: the trainer's own grace to mirror its last checkpoint, plus margin
  local grace
  grace=$(python -c 'import yaml; print(int(float(yaml.safe_load(open("params.yaml"))["train"]["stop_grace_s"])))' \
    2>/dev/null) || { grace=60; log "warning: train.stop_grace_s not read from params.yaml: taking 60 s"; }
  echo $(( grace + STOP_MARGIN_S ))
}

pipeline() {  # in its own session; on SIGTERM it lets the running command finish (dvc waits for its stage), then stops
  local stage stages stop=""
  trap 'stop=1' TERM
  if [[ -n ${MEDASR_CHILD:-} ]]; then bash -c "$MEDASR_CHILD"; return; fi
  # dvc.yaml's stages in the order it lists them (testsets before train: a test set that cannot be read fails
  # before any GPU time is spent). No stage list is a failure, never an empty success.
  stages=$(python -c 'import yaml; print(*yaml.safe_load(open("dvc.yaml"))["stages"])') && [[ -n $stages ]] \
    || { echo "cannot read the stage list from dvc.yaml" >&2; return 1; }
  for stage in $stages; do
    dvc repro --pull "$stage" && [[ -z $stop ]] || return 1
    dvc push --run-cache && [[ -z $stop ]] || return 1
  done
}

descendants() {  # every process below $1
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}
running() {  # process $1 exists and is no zombie
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  [[ ${stat##*) } != Z* ]]
}
stage_pid() {  # the stage process, when the pidfile names a live process of the pipeline
  local pid
  pid=$(cat "$MEDASR_STAGE_PIDFILE" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ " $(descendants "$CHILD" | tr '\n' ' ') " == *" $pid "* ]] && echo "$pid"
}

CHILD=0 KILL_AT=0 TRACKED=""
begin_stop() {  # $1: why. SIGTERM to the stage process (else to the pipeline's tree); SIGKILL at the bound
  (( CHILD > 0 )) || return 0
  local stage
  if stage=$(stage_pid); then
    log "$1: SIGTERM to the stage process ($stage) and the pipeline's shell; its workers and ranks are its own"
    kill -TERM "$stage" "$CHILD" 2>/dev/null
  else
    log "$1: SIGTERM to the pipeline's process tree (no stage process runs)"
    # shellcheck disable=SC2046
    kill -TERM "$CHILD" $(descendants "$CHILD") 2>/dev/null
  fi
  if (( KILL_AT == 0 )); then
    KILL_AT=$(( SECONDS + STOP_BOUND_S )) TRACKED="$CHILD $stage"
    log "waiting up to ${STOP_BOUND_S}s for the pipeline to exit"
  fi
}
alive() {  # the pipeline runs; once stopping, anything it started counts too (it may have been orphaned)
  (( KILL_AT )) || { running "$CHILD"; return; }
  local pid now=" "
  for pid in $TRACKED $(descendants "$CHILD"); do
    [[ $now != *" $pid "* ]] && running "$pid" && now+="$pid "
  done
  TRACKED=${now# }
  [[ -n $TRACKED ]]
}

on_signal() {
  STOPPING=$1
  begin_stop "SIG$1"
}
STOPPING=""
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
stop_code() { [[ $STOPPING == INT ]] && echo 130 || echo 143; }

run_child() {
  # Runs the pipeline in its own session, logging to a file, with a watchdog on log growth.
  local log_file=$LOGS/pipeline.log size=-1 last_growth=$SECONDS rc now_size
  rm -f "$MEDASR_STAGE_PIDFILE"
  heartbeat running "attempt $attempt"
  setsid bash -c "$(declare -f pipeline); pipeline" >>"$log_file" 2>&1 &
  CHILD=$! KILL_AT=0 TRACKED=""
  start_publisher
  [[ -n $STOPPING ]] && begin_stop "SIG$STOPPING"   # a signal that came before CHILD was set
  while alive; do
    heartbeat running "attempt $attempt${STOPPING:+, stopping on SIG$STOPPING}"
    check_publisher
    if (( KILL_AT == 0 )); then
      now_size=$(stat -c %s "$log_file" 2>/dev/null || echo 0)
      if (( now_size != size )); then size=$now_size; last_growth=$SECONDS; fi
      (( SECONDS - last_growth > HUNG_AFTER_S )) && begin_stop "watchdog: no output for ${HUNG_AFTER_S}s"
    elif (( SECONDS >= KILL_AT )); then
      log "the pipeline did not exit within ${STOP_BOUND_S}s: SIGKILL to ${TRACKED% }"
      # shellcheck disable=SC2086
      kill -KILL $TRACKED -- "-$CHILD" 2>/dev/null
    fi
    sleep 1 & wait $!
  done
  wait "$CHILD"; rc=$?
  reap_survivors
  (( KILL_AT )) && log "the pipeline exited (code $rc)"
  stop_publisher
  CHILD=0 KILL_AT=0
  return $rc
}

reap_survivors() {  # what the pipeline started and left running (dvc died; ranks or a trainer still up): stopped
  # before the next attempt starts a second trainer on the same GPU and checkpoint folder. setsid made the
  # pipeline's pid its process group, which DVC's and Lightning's plain child processes keep.
  pgrep -g "$CHILD" >/dev/null 2>&1 || return 0
  log "processes of the pipeline outlived it ($(pgrep -g "$CHILD" | tr '\n' ' ')): SIGTERM, SIGKILL after ${STOP_BOUND_S}s"
  kill -TERM -- "-$CHILD" 2>/dev/null
  local until=$(( SECONDS + STOP_BOUND_S ))
  while pgrep -g "$CHILD" >/dev/null 2>&1 && (( SECONDS < until )); do sleep 1 & wait $!; done
  kill -KILL -- "-$CHILD" 2>/dev/null
  return 0
}

# --- endings: this script never exits into RunPod's container-restart loop --------------------------------------------
idle() {  # until the pod is stopped (a stop signal ends it)
  while :; do
    [[ -n $STOPPING ]] && exit "$(stop_code)"
    sleep 3600 & wait $!
    [[ -n $STOPPING ]] && exit "$(stop_code)"
  done
}

stop_pod_or_sleep() {
  local line rc=0
  if [[ $1 == stop ]]; then
    if command -v medasr >/dev/null; then
      line=$(medasr loop stop-pod 2>&1 | last_line) || rc=$?   # retried there, then through RunPod's API
    elif [[ -n ${RUNPOD_POD_ID:-} ]]; then  # no venv (the install failed)
      line=$(runpodctl stop pod "$RUNPOD_POD_ID" 2>&1 | last_line) || rc=$?
    fi
    if (( rc == 0 )); then log "${line:-not on a pod: nothing to stop}"
    else log "could not stop the pod, it bills until stopped by hand: $line"; fi
  fi
  log "sleeping until the pod is stopped"
  idle
}

git_push() {  # MEDASR_GIT_PUSH=1: the pod's checkout is a detached HEAD, so the results go to a branch of this run
  local who=() auth=() branch=medasr-runs/$MEDASR_RUN_ID
  git config user.email >/dev/null || who=(-c user.name="medasr runpod.sh" -c user.email=runpod@medasr.invalid)
  # the token reaches git through a helper that names the variable: never an argument, never in .git/config, and
  # `credential.helper=` first so no configured helper (e.g. `store`) keeps it
  # shellcheck disable=SC2016
  local helper='!f() { test "$1" = get && printf "username=x-access-token\npassword=%s\n" "$MEDASR_GIT_TOKEN"; }'
  helper+='; f'
  [[ -n ${MEDASR_GIT_TOKEN:-} ]] && auth=(-c credential.helper= -c credential.helper="$helper")
  if git add dvc.lock \
    && { git diff --cached --quiet || git "${who[@]}" commit -qm "runpod: results of run $MEDASR_RUN_ID"; } \
    && GIT_TERMINAL_PROMPT=0 MEDASR_GIT_TOKEN=${MEDASR_GIT_TOKEN:-} git "${auth[@]}" push -q origin \
      "HEAD:refs/heads/$branch" >>"$LOGS/runpod.log" 2>&1; then
    log "pushed dvc.lock to branch $branch"
  else
    log "could not commit/push dvc.lock to branch $branch (git credentials? see $LOGS/runpod.log)"
  fi
}

on_success() {
  heartbeat done
  log "pipeline finished"
  dvc metrics show 2>&1 | tee -a "$LOGS/runpod.log" >&2
  publish
  [[ ${MEDASR_GIT_PUSH:-0} == 1 ]] && git remote get-url origin >/dev/null 2>&1 && git_push
  release_lease
  [[ $MODE == once ]] && exit 0
  stop_pod_or_sleep "$ON_SUCCESS"
}

give_up() {  # a problem retrying cannot fix: say why, then stop paying for the GPU
  heartbeat "gave up" "$1"
  log "giving up: $1"
  publish
  release_lease
  [[ $MODE != loop ]] && exit 1
  stop_pod_or_sleep stop
}

lease_lost() {  # another pod runs this remote's pipeline: this one publishes nothing and stops
  log "$LEASE_LOST: this pod stops (the run's status is the other pod's)"
  [[ $MODE != loop ]] && exit 1
  stop_pod_or_sleep stop
}

stopped() {
  heartbeat stopped "SIG$STOPPING"
  publish
  release_lease
  log "stopped by SIG$STOPPING"
  exit "$(stop_code)"
}

# --- main -------------------------------------------------------------------------------------------------------------
# A setting bash cannot count with would end this script (PID 1) in an arithmetic error, into RunPod's restart loop:
# each is checked once, here
for setting in MAX_FAST_FAILURES FAST_FAILURE_S MAX_STALLED_ATTEMPTS BACKOFF_BASE_S BACKOFF_MAX_S HUNG_AFTER_S STOP_MARGIN_S \
  STATUS_EVERY_S; do
  [[ ${!setting} =~ ^[0-9]+$ ]] || give_up "MEDASR_$setting must be a whole number, got '${!setting}'"
done
[[ $ON_SUCCESS == stop || $ON_SUCCESS == sleep ]] || give_up "MEDASR_ON_SUCCESS must be stop or sleep"
if [[ ${MEDASR_TEST_SKIP_SETUP:-0} != 1 || $MODE == check ]]; then
  if ! install; then
    [[ $MODE == check ]] && { log "problem: install failed"; exit 1; }  # nothing published: a live loop may run
    give_up "install failed"
  fi
  if ! preflight; then
    [[ $MODE == check ]] && exit 1
    give_up "preflight failed (see the problem lines above)"
  fi
  [[ $MODE == check ]] && { log "preflight ok"; exit 0; }
fi

fast_failures=0 stalled=0 failures=0 attempt=0
TOKEN=$(progress)
while :; do
  attempt=$((attempt + 1))
  started=$SECONDS ran=0
  rm -f "$MEDASR_STAGE_PIDFILE"   # no stage runs now; a pid left by a killed one may be reused by any process
  log "attempt $attempt"
  [[ -n $STOPPING ]] && stopped   # a signal during the backoff's publish or the setup
  if take_lease; rc=$?; (( rc != 0 )); then
    (( rc == 2 )) && lease_lost
    what="lease not taken"
    if ! remote_ready; then  # why: a refusal is final, an outage is retried like any failed attempt
      (( REMOTE_RC == 2 )) && give_up "the DVC remote refused access or is not configured (see the problem line above)"
      what="DVC remote unreachable"
    fi
  else
    clear_stale_locks
    line=$(medasr loop sweep 2>&1 | last_line) && log "$line" || log "warning: temp files not swept: $line"
    disk_ok || give_up "disk low after sweeping temp files: $DISK_LINE"
    budget_left || give_up "$BUDGET_LINE"
    [[ -n $STOPPING ]] && stopped
    STOP_BOUND_S=$(stop_bound) ran=1
    run_child
    rc=$? what="pipeline failed (exit $rc)"
  fi
  [[ -n $LEASE_LOST ]] && lease_lost
  [[ -n $STOPPING ]] && stopped
  (( rc == 0 )) && on_success
  # only progress (a new checkpoint step, a stage finished) resets the counts: a failure that repeats itself after
  # each resume is given up on however slow it is
  if (( ran )); then
    token=$(progress)
    if [[ $token == unknown || $TOKEN == unknown ]]; then  # unreadable: neither progress nor a stall
      [[ $token == unknown ]] || TOKEN=$token
    elif [[ $token != "$TOKEN" ]]; then
      log "progress since the last attempt: $token"
      TOKEN=$token stalled=0 fast_failures=0 failures=0
    else
      stalled=$((stalled + 1))
    fi
  fi
  (( SECONDS - started < FAST_FAILURE_S )) && fast_failures=$((fast_failures + 1))
  failures=$((failures + 1))
  log "$what (attempt $attempt; since the last progress: $fast_failures fast failure(s) in a row," \
    "$stalled attempt(s) without progress)"
  [[ $what == pipeline* ]] && tail -n 5 "$LOGS/pipeline.log" 2>/dev/null | sed 's/^/    /' >&2
  if (( fast_failures >= MAX_FAST_FAILURES )); then
    give_up "$fast_failures fast failures in a row ($what): fix the cause (see $LOGS) instead of retrying"
  fi
  if (( stalled >= MAX_STALLED_ATTEMPTS )); then
    give_up "$stalled attempts in a row made no progress ($what): fix the cause (see $LOGS) instead of retrying"
  fi
  cap=$(( BACKOFF_BASE_S * (1 << (failures > 10 ? 10 : failures)) ))
  (( cap > BACKOFF_MAX_S )) && cap=$BACKOFF_MAX_S
  delay=$(( cap > 0 ? RANDOM % (cap + 1) : 0 ))   # full jitter
  log "retrying in ${delay}s"
  heartbeat backoff "${delay}s after attempt $attempt"
  publish
  [[ -n $STOPPING ]] || { sleep "$delay" & wait $!; }   # a signal during publish: no sleep first
  [[ -n $STOPPING ]] && { kill $! 2>/dev/null; stopped; }
done
