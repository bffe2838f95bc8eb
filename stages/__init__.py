"""medasr: one module per DVC stage (fetch, subset, manifest, ...) plus the few shared modules they use."""


class StageError(RuntimeError):
    """A stage cannot run on its inputs as configured (missing upstream output, wrong column, unreachable source).

    The CLI prints the message and exits 1, without a traceback; any other exception is a bug and keeps its traceback.
    """
