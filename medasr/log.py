"""The one logging interface: `log = get_logger(__name__)`; the CLI calls `setup()` once.

Messages go to stderr through rich, so stdout stays free for results (tables, transcripts). Secrets are never passed
to a logger: callers log whether a variable is set, not its value.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

_ROOT = "medasr"


def setup(verbose: bool = False) -> None:
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.{name.rsplit('.', 1)[-1]}")
