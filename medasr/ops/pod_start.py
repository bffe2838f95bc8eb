"""The pod's start command: put the checkout on the volume at the launched commit, then `exec bash runpod.sh`.

RunPod runs it as the container's start command (`bash -c '<START_SCRIPT>'`), so it must not contain a single quote.
"""

from __future__ import annotations

START_SCRIPT = (
    'set -e; mkdir -p /workspace; cd /workspace; [ -d medasr/.git ] || { git clone -q "$MEDASR_REPO_URL" medasr; '
    'git -C medasr checkout -q "$MEDASR_GIT_REF"; }; cd medasr; exec bash runpod.sh'
)
