"""medasr: the library the pipeline's stages share.

Layers, each importing only the ones listed after it: `stages` (what dvc.yaml runs, and the `medasr` command line)
-> `medasr.ops` (checkpoint mirror and run status on the DVC remote, the RunPod client and watcher, `doctor`) and
`medasr.sources` (one reader per dataset layout) -> the core modules here (params, paths, log, files, audio, text,
scoring, model, inference, tracking). Nothing in `medasr` imports `stages`.
"""


class MedasrError(RuntimeError):
    """An expected failure with a message a user can act on: the CLI prints it as one line and exits 1, without a
    traceback. Any other exception is a bug and keeps its traceback."""


class StageError(MedasrError):
    """A stage cannot run on its inputs as configured (missing upstream output, wrong column, unreachable source)."""
