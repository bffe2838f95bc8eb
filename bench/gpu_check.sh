#!/usr/bin/env bash
# The one prepared command a GPU session runs (bench/DEVICE.md); `--size tiny` runs the same on the CPU (make test).
#
#   bench/gpu_check.sh [--size full|tiny] [--sections stages,train_speed,decode,restart] [--precision P] OUT_DIR
#
# Installs the carried wheels (.whl/, bench/device_wheels.sh) when this Python lacks NeMo, then runs the sections
# in order of value, each in its own process under its own `timeout`, each writing its result file into OUT_DIR as
# soon as it ends (train_speed.py also after every row, so a section cut off keeps what it finished):
#   stages       the real train (with a resume), eval and transcribe code on the accelerator, tiny preset, with
#                device/dtype hooks (bench/gpu_check.py)                          -> stages.json
#   train_speed  training throughput and peak memory: train_speed.py compare,defaults -> train_speed.json
#   decode       greedy decoding RTFx: train_speed.py decode                      -> decode.json
#   restart      process start to first step, fresh and resumed: train_speed.py restart -> restart.json
# plus env.json (machine, versions), status.tsv (each section's outcome and seconds) and gpu_check.log (all
# output): 7 files, under the 8 that come back from the device machine. --precision (auto|bf16|32) sets the stages
# section's train.precision (default: params.yaml's): `--size tiny --sections stages --precision bf16` checks the
# GPU's dtype path on a CPU.
#
# Time, by construction: every section's timeout is its cap or what is left of the run's deadline, whichever is
# smaller (--kill-after 10 s on top), and a section with under 20 s left is skipped. At --size full the deadline
# is 280 s after start, wheel install included, so the whole run ends within about 290 s on any machine; a section
# that finishes early leaves its time to the next. Exits 1 when a section failed, timed out or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

SIZE=full
SECTIONS=stages,train_speed,decode,restart
OUT=
PRECISION=()
while (($#)); do
  case $1 in
    --size) SIZE=$2; shift 2 ;;
    --sections) SECTIONS=$2; shift 2 ;;
    --precision) PRECISION=(--precision "$2"); shift 2 ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[[ -n $OUT && $SIZE =~ ^(full|tiny)$ ]] || { echo "usage: $0 [--size full|tiny] [--sections a,b] OUT_DIR" >&2; exit 2; }
for s in ${SECTIONS//,/ }; do
  [[ $s =~ ^(stages|train_speed|decode|restart)$ ]] || { echo "unknown section $s" >&2; exit 2; }
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE=$!

# Caps in seconds, by value and by what each costs at full size (canary-qwen shapes, random weights, bf16 on one
# H100; each train_speed.py process starts NeMo, builds the model and writes its synthetic clips before measuring).
# Tiny runs on 2 CPU cores under `make test`: generous caps there, the test's own timeout bounds it.
if [[ $SIZE == full ]]; then
  DEADLINE=280
  declare -A CAP=([install]=90 [stages]=100 [train_speed]=150 [decode]=90 [restart]=120)
else
  DEADLINE=1500
  declare -A CAP=([install]=90 [stages]=400 [train_speed]=400 [decode]=300 [restart]=400)
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device machine has no network: nothing may wait on the hub, W&B or DVC's usage analytics.
export HF_HUB_OFFLINE=1 WANDB_MODE=offline DVC_NO_ANALYTICS=1
: >"$OUT/status.tsv"
failed=0

# Run a section's command under min(cap, time left) and record its outcome in status.tsv.
section() {
  local name=$1 cap=${CAP[$1]} left=$((DEADLINE - SECONDS)) started=$SECONDS rc status
  shift
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    status=skipped
  else
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  [[ $status == ok ]] || failed=1
  # section, outcome (ok|failed|timeout|skipped), seconds taken, seconds allowed
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" "$limit" >>"$OUT/status.tsv"
  echo "=== $name: $status after $((SECONDS - started)) s (allowed $limit s)"
}

# The device image lacks NeMo and what it pulls in: install the carried wheels (a few seconds, no network).
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("nemo") is None)'; then
  section install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/medasr-site .whl/*.whl
  export PYTHONPATH="/tmp/medasr-site:$PYTHONPATH"
fi
"$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("nemo") is None)' ||
  echo "=== NeMo is not importable here and no wheels were installed: carry .whl (bench/device_wheels.sh)"

require_cuda=()
if [[ $SIZE == full ]] || nvidia-smi -L >/dev/null 2>&1; then require_cuda=(--require-cuda); fi
timeout 60 "$PY" bench/gpu_check.py env --size "$SIZE" --sections "$SECTIONS" --out "$OUT/env.json" || failed=1

for s in ${SECTIONS//,/ }; do
  case $s in
    stages) section stages "$PY" bench/gpu_check.py stages --out "$OUT/stages.json" "${PRECISION[@]}" "${require_cuda[@]}" ;;
    train_speed) section train_speed "$PY" bench/train_speed.py --size "$SIZE" --sections compare,defaults \
      --out "$OUT/train_speed.json" ;;
    decode) section decode "$PY" bench/train_speed.py --size "$SIZE" --sections decode --out "$OUT/decode.json" ;;
    restart) section restart "$PY" bench/train_speed.py --size "$SIZE" --sections restart --out "$OUT/restart.json" ;;
  esac
done
echo "=== gpu_check --size $SIZE done in $SECONDS s:"
cat "$OUT/status.tsv"
exec >&- 2>&-
wait "$TEE"  # the log is complete before the command returns
exit $failed
