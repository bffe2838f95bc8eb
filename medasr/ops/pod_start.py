"""The pod's start command: put the volume's checkout at exactly the launched commit, then `exec bash runpod.sh`.

RunPod runs it as the container's start command (`bash -c '<START_SCRIPT>'`), so it holds no single quote and no
newline. Whatever the volume holds, the checkout ends at $MEDASR_GIT_REF or the pod stops with one line saying why:
- no checkout: clone into `.medasr.clone`, then rename it, so a killed clone never leaves a `medasr/.git`;
- git's lock files left by a git killed with its container are removed first: nothing else runs git at this point;
- a checkout already at the launched commit (MEDASR_GIT_REF is a full sha from `pod up`): no fetch (a restart needs
  no network) and no forced checkout, so the run's own dvc.lock stays (a plain one still completes a work tree
  that a killed clone never wrote);
- a checkout at another ref: fetch, then check out the ref detached; edits to tracked files (dvc.lock) give way,
  untracked and ignored outputs (data/, checkpoints/) stay. A branch or tag name resolves to what origin has (never
  a stale local branch); when origin cannot be reached for a name, the checkout goes on where it is, with a warning;
- something that is not a usable checkout (no HEAD, a half clone, a plain folder, a broken checkout): moved aside
  to `medasr.aside.<time>.<pid>`, never deleted, then cloned again;
- an unknown ref, or a repo that cannot be reached after retries: one line, then the pod is stopped
  (`runpodctl stop pod`, else RunPod's REST API with curl, as medasr.ops.runpod.RunPodAPI.action calls it, the key
  read by curl from stdin) and the script sleeps: exiting would put the container into RunPod's restart loop.
The git token (MEDASR_GIT_TOKEN, or the user:token@ of a URL, split off first) reaches git only through a
credential helper given per command whose text names the variable: never in a process's arguments, never in
.git/config, and `credential.helper=` first so no configured helper (e.g. `store`) keeps it.
MEDASR_WORKSPACE (default /workspace) and MEDASR_START_RETRY_S (10) exist for tests.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

# Joined into one line: so no `#` comment in it (it would swallow the rest), and every line ends where `;` may.
_SCRIPT = r"""
set -u;
W=${MEDASR_WORKSPACE:-/workspace}; U=${MEDASR_REPO_URL:-}; R=${MEDASR_GIT_REF:-};
export GIT_TERMINAL_PROMPT=0;
say() { echo "medasr start: $*" >&2; };
api_stop() {
  [ -n "${RUNPOD_API_KEY:-}" ] && command -v curl >/dev/null || return 1;
  A=${MEDASR_RUNPOD_API_URL:-https://api.runpod.io};
  echo "Authorization: Bearer $RUNPOD_API_KEY" | curl -fsS -m 30 -o /dev/null -X POST -H @-
    -H "Content-Type: application/json" -d "{\"action\": \"stop\"}" "${A%/}/v2/pods/$RUNPOD_POD_ID/action";
};
die() {
  say "$*";
  if [ -n "${RUNPOD_POD_ID:-}" ]; then
    for k in 1 2 3; do
      runpodctl stop pod "$RUNPOD_POD_ID" >/dev/null && exec sleep infinity;
      api_stop && exec sleep infinity;
      sleep ${MEDASR_START_RETRY_S:-10};
    done;
    say "cannot stop the pod (runpodctl, RunPod API): sleeping, the pod bills until it is stopped";
  fi;
  exec sleep infinity;
};
r=${U#*://}; a=${r%%/*};
case $U in http://*@*|https://*@*) case $a in *@*)
  t=${a%@*}; export MEDASR_GIT_TOKEN=${MEDASR_GIT_TOKEN:-${t#*:}};
  U=${U%%://*}://${a##*@}${r#"$a"}; export MEDASR_REPO_URL=$U;;
esac;; esac;
H="!f() { test \"\$1\" = get && printf \"username=x-access-token\\npassword=%s\\n\" \"\$MEDASR_GIT_TOKEN\"; }; f";
g() { git -c credential.helper= -c "credential.helper=$H" "$@"; };
try() {
  k=1;
  until "$@"; do [ "$k" -ge 5 ] && return 1; sleep $((k * ${MEDASR_START_RETRY_S:-10})); k=$((k + 1)); done;
};
named() { case $R in *[!0-9a-f]*) return 0;; esac; return 1; };
sha() { c=$(git rev-parse -q --verify "$R^{commit}") && [ "$c" = "$R" ] && echo "$c"; };
at_ref() {
  git remote set-url origin "$U" || return 1;
  h=$(git rev-parse -q --verify "HEAD^{commit}"); C=$h;
  if [ "$h" != "$R" ]; then
    if try g fetch -q origin; then
      C=$( { g fetch -q origin "$R" 2>/dev/null && git rev-parse -q --verify "FETCH_HEAD^{commit}"; }
        || git rev-parse -q --verify "refs/remotes/origin/$R^{commit}"
        || git rev-parse -q --verify "refs/tags/$R^{commit}" || sha ) || return 3;
    else
      [ -n "${1:-}" ] && named || return 2;
      say "cannot fetch $R from $U: going on with the checkout at $h";
    fi;
  fi;
  f=; [ "$C" = "$h" ] || f=-f;
  git checkout -q $f --detach "$C" && [ "$(git rev-parse HEAD)" = "$C" ];
};
fresh() { rm -rf .medasr.clone && g clone -q --no-checkout "$U" .medasr.clone; };
[ -n "$U" ] && [ -n "$R" ] || die "MEDASR_REPO_URL and MEDASR_GIT_REF must both be set";
mkdir -p "$W" && cd "$W" || die "cannot enter the workspace $W";
if [ -e medasr ] || [ -L medasr ]; then
  rm -f medasr/.git/index.lock medasr/.git/packed-refs.lock medasr/.git/HEAD.lock medasr/.git/config.lock;
  [ -d medasr/.git/refs ] && find medasr/.git/refs -name "*.lock" -type f -delete;
  git --git-dir=medasr/.git rev-parse -q --verify "HEAD^{tree}" >/dev/null 2>&1 && (cd medasr && at_ref kept);
  case $? in
    0) ;;
    2) die "cannot fetch from $U";;
    3) die "git ref $R does not exist in $U";;
    *) B=medasr.aside.$(date -u +%Y%m%dT%H%M%S).$$;
       mv medasr "$B" || die "cannot move $W/medasr aside";
       say "moved $W/medasr aside to $W/$B: not a usable checkout";;
  esac;
fi;
if [ ! -e medasr ]; then
  try fresh || die "cannot clone $U";
  (cd .medasr.clone && at_ref);
  case $? in
    0) mv .medasr.clone medasr || die "cannot rename $W/.medasr.clone to $W/medasr";;
    3) die "git ref $R does not exist in $U";;
    *) die "cannot check out $R from $U";;
  esac;
fi;
cd medasr && exec bash runpod.sh
"""
START_SCRIPT = " ".join(line.strip() for line in _SCRIPT.strip().splitlines())


def split_repo_url(url: str) -> tuple[str, str | None]:
    """A repo URL without its credentials, and the token they held (https://user:token@host/..., https://token@host/...)
    so the token can travel as MEDASR_GIT_TOKEN instead. URLs without credentials and ssh URLs pass through."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    token = unquote(userinfo.split(":", 1)[-1])  # user:token@ or token@
    return urlunsplit(parts._replace(netloc=host)), token or None
