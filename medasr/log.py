"""The one logging interface: `log = get_logger(__name__)`; the CLI calls `setup()` once.

The console (stderr, through rich) shows medasr's own messages and any library's errors; stdout stays free for results
(tables, transcripts). What the libraries say otherwise (NeMo, Lightning, transformers, PEFT, telemetry notices,
Python warnings) goes to the command's log file only, unless `-v` asks for everything on the console too. Secrets are
never passed to a logger: callers log whether a variable is set, not its value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

_ROOT = "medasr"
_configured = False


def setup(verbose: bool = False, log_file: Path | None = None) -> None:
    """Route every logger in this process: medasr's INFO (DEBUG with `verbose`) and everyone's ERRORs to the
    console; everything at INFO and above, medasr's included, to `log_file` (appended to) when given."""
    global _configured
    if _configured:  # once per process: the CLI's callback runs again for each in-process invocation (tests)
        return
    _configured = True
    root = logging.getLogger()
    console = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False)
    console.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    console.addFilter(lambda r: _ours(r.name) or r.levelno >= (logging.INFO if verbose else logging.ERROR))
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # opened at the first record: a command that logs nothing leaves no file
        to_file = logging.FileHandler(log_file, encoding="utf-8", delay=True)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # libraries' DEBUG stays out even with -v (some set their loggers to DEBUG): HTTP, file locks, W&B internals
        to_file.addFilter(lambda r: _ours(r.name) or r.levelno >= logging.INFO)
        root.addHandler(to_file)
    root.setLevel(logging.INFO)
    logging.getLogger(_ROOT).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # Python warnings become records of the `py.warnings` logger, routed as above
    logging.setLogRecordFactory(_detaching(logging.getLogRecordFactory()))
    if not verbose:
        # W&B prints its notices itself, not through logging; silent, it writes them to its run folder's logs
        os.environ.setdefault("WANDB_SILENT", "true")


def _ours(name: str) -> bool:
    return name == _ROOT or name.startswith(_ROOT + ".")


def _detaching(make_record: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """Some libraries print through console handlers of their own, attached at import (long after `setup`) to
    loggers that do not propagate: NeMo's `nemo_logger` (its INFO to stdout), transformers, Lightning when the root
    had no handler yet. Before a record of such a logger is handled, its chain up to the root loses those console
    handlers and propagates, so the record reaches ours (the file, and the console by the rule above)."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        node: logging.Logger | None = logging.getLogger(record.name) if not _ours(record.name) else None
        while node is not None and node is not logging.root:
            for handler in list(node.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    node.removeHandler(handler)
            node.propagate = True
            node = node.parent
        return record

    return factory


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.{name.rsplit('.', 1)[-1]}")
