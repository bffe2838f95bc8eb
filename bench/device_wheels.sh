#!/usr/bin/env bash
# Download the wheels the GPU machine this project borrows for measurements (an H100 by default, an H200 on request;
# x86_64, no network) lacks for `from nemo.collections.speechlm2.models import SALM`, `from
# nemo.collections.speechlm2.data import DataModule, SALMDataset`, building a SALM and training it with Lightning.
# Also dvc + dvclive, which the train stage's trackers import (gpu_check's stages and restart sections need them).
# Writes them into .whl/ (git-ignored here); bench/gpu_check.sh installs them there (bench/DEVICE.md). Only what that
# import chain and a training step import and the machine's image lacks is here; torch, transformers, peft, numpy,
# etc. are the image's own. The image was reported with Python 3.12 on the H200; the H100 is assumed to share it
# (not checked). Versions are those of requirements.txt.
#   DEVICE_WHEELS_DIR     target folder (default: .whl in the repo root)
#   DEVICE_PYTHON_VERSION Python the wheels are for (default: 3.12, the image's; 3.11 only for a local simulation)
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(
  nemo-toolkit==3.0.0                                  # SALM, DataModule, SALMDataset themselves (2.8 MB wheel, no slimming needed)
  lightning==2.4.0                                     # NeMo 3.0.0 caps it; with the image's 2.6.x nv-one-logger's Trainer override fails at import (TypeError)
  omegaconf==2.3.0                                     # NeMo configs, imported everywhere
  antlr4-python3-runtime==4.9.3                        # omegaconf's parser; sdist only on PyPI, built into a pure wheel below
  hydra-core==1.3.2                                    # nemo.core: hydra.utils.instantiate builds SALM's modules
  nv-one-logger-core==2.3.1                            # nemo.lightning.one_logger_callback, imported by ModelPT
  nv-one-logger-training-telemetry==2.3.1              # same
  nv-one-logger-pytorch-lightning-integration==2.3.1   # same
  overrides==7.7.0                                     # nv-one-logger's @override
  toml==0.10.2                                         # nv-one-logger's version module
  StrEnum==0.4.15                                      # nv-one-logger
  pydantic==2.14.3                                     # nv-one-logger and wandb models
  pydantic_core==2.50.4                                # pydantic's compiled core
  annotated-types==0.8.0                               # pydantic
  typing-inspection==0.4.5                             # pydantic
  lhotse==1.33.0                                       # speechlm2 data layer: lhotse cut sets, samplers, dataloader
  soundfile==0.14.0                                    # audio decoding (libsndfile bundled) for lhotse and NeMo's ASR preprocessing
  cffi==2.1.1                                          # soundfile's binding (not in the image)
  soxr==1.1.0                                          # librosa.core.audio imports it at import time
  intervaltree==3.2.1                                  # lhotse supervisions
  cytoolz==1.2.0                                       # NeMo's lhotse adapters (the image has toolz, not cytoolz)
  kaldialign==0.12.0                                   # NeMo's ASR WER metrics import it at import time
  librosa==0.11.0                                      # NeMo's mel filterbank (AudioToMelSpectrogramPreprocessor)
  decorator==5.3.1                                     # librosa, when the preprocessor is built
  pooch==1.9.0                                         # librosa, when the preprocessor is built
  braceexpand==0.1.7                                   # NeMo ASR data and webdataset (tarred-manifest paths)
  webdataset==1.0.2                                    # nemo.utils exposes it; ASR perturb.py fails with ImportError without it
  datasets==5.2.0                                      # NeMo ASR hf_audio_to_text imports it unconditionally
  dill==0.4.1                                          # datasets
  multiprocess==0.70.19                                # datasets
  wandb==0.31.0                                        # speechlm2.data -> duplex_ear_tts_dataset -> nemo.collections.tts -> magpietts: `import wandb` (20 MB)
  platformdirs==4.14.5                                 # wandb
  opentelemetry-api==1.45.2                            # wandb.analytics, at import time
  whisper_normalizer==0.1.15                           # speechlm2 WER/BLEU metrics, imported by SALM
  more-itertools==11.2.1                               # whisper_normalizer
  # The train stage's trackers (medasr/tracking.py): `dvclive.lightning` imports `dvc` at import time, and dvc pulls
  # its whole dependency tree in (15.1 MiB, pygit2 and cryptography 9.2 of it). Needed by gpu_check's stages and
  # restart sections (stages.train.run.run, `medasr train`); W&B offline needs nothing beyond wandb's own set above.
  dvclive==3.49.1 dvc==3.67.1 dvc-data==3.18.3 dvc-objects==5.2.0 dvc-http==2.32.0 dvc-render==1.0.2
  dvc-studio-client==0.23.0 dvc-task==0.40.2 scmrepo==3.6.2 pygit2==1.21.0 dulwich==1.2.21 gitpython==3.2.1
  gitdb==4.0.12 smmap==5.0.3 asyncssh==2.24.1 cryptography==50.0.2 pycparser==3.12 aiohttp-retry==2.9.1
  celery==5.7.0 kombu==5.7.0 amqp==5.4.2 vine==5.1.0 billiard==4.3.2 click-didyoumean==0.3.1
  click-plugins==1.1.1.2 click-repl==0.4.1 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
  gto==1.10.1 entrypoints==0.4.2 semver==3.1.1 pydantic-settings==2.16.3 python-dotenv==1.2.4
  funcy==2.1 ruamel.yaml==0.19.1 configobj==5.0.9 dictdiffer==0.10.0 diskcache==5.6.3 distro==1.9.0
  dpath==2.2.0 flatten-dict==0.5.0 flufl.lock==9.2.0 atpublic==9.0.0 grandalf==0.8 iterative-telemetry==0.0.10
  appdirs==1.4.4 orjson==3.13.0 pydot==4.0.1 pygtrie==2.6.2 sqltrie==0.11.3 shortuuid==1.0.13 shtab==1.13.0
  tomlkit==0.15.2 voluptuous==0.16.0 zc.lockfile==4.0
)
SDIST_ONLY=(antlr4-python3-runtime)   # no wheel on PyPI: `pip wheel` builds a py3-none-any wheel from the sdist
LIMIT_MIB=60                          # at most 64 MiB travel with a command, the repo itself included

DIR=${DEVICE_WHEELS_DIR:-.whl}
PYV=${DEVICE_PYTHON_VERSION:-3.12}
PY=${PYTHON:-python3}

if [[ $DIR == .whl ]]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi
mkdir -p "$DIR"
rm -f "$DIR"/*.whl   # one version of each package: two stop the install there

binary=() built=()
for pin in "${PINS[@]}"; do
  if [[ " ${SDIST_ONLY[*]} " == *" ${pin%%==*} "* ]]; then built+=("$pin"); else binary+=("$pin"); fi
done

plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
  -d "$DIR" "${binary[@]}"
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DIR" "${built[@]}"

# Exactly one wheel per pin, each at its pinned version.
norm() { tr 'A-Z' 'a-z' | tr -- '-.' '__'; }
have=$(for f in "$DIR"/*.whl; do basename "$f" | cut -d- -f1-2 | norm; done | sort)
want=$(for pin in "${PINS[@]}"; do echo "${pin%%==*}-${pin##*==}" | norm; done | sort)
if [[ $have != "$want" ]]; then
  echo "wheels in $DIR do not match the pins:" >&2
  diff <(echo "$want") <(echo "$have") >&2 || true
  exit 1
fi

ls -S -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
bytes=$(cat "$DIR"/*.whl | wc -c)
echo "total: ${#PINS[@]} wheels, $bytes bytes ($(awk -v b="$bytes" 'BEGIN{printf "%.1f", b/1048576}') MiB) in $DIR for Python $PYV"
if ((bytes > LIMIT_MIB * 1048576)); then
  echo "too large: over $LIMIT_MIB MiB" >&2
  exit 1
fi
