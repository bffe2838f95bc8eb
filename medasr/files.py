"""Atomic writes: a stage either leaves its previous output intact or replaces it whole, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def update_digest(digest: Any, path: Path) -> Any:
    """Feed a file to a hashlib digest in 1 MiB blocks (checkpoints are GBs); returns the digest."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    return update_digest(hashlib.sha256(), path).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """JSON lines with a fixed key order and no ASCII escaping, so reruns are byte-identical and text stays readable."""
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty sibling temp folder; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# mkstemp/mkdtemp above name their temp entries `.<name>.<8 random chars>.tmp` (tempfile's random names use
# a-z0-9_): a write killed mid-way leaves one behind, several GB for a checkpoint or the audio of a manifest.
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def sweep_temps(roots: Iterable[Path]) -> tuple[int, int]:
    """Delete the temp files and folders killed atomic writes left under `roots` (names matching TEMP_NAME, nothing
    else); returns (entries removed, bytes freed). Only safe while nothing writes there."""
    removed = freed = 0
    for root in roots:
        for top, dirs, files in os.walk(root):  # symlinks are not followed
            for name in [d for d in dirs if TEMP_NAME.fullmatch(d)] + [f for f in files if TEMP_NAME.fullmatch(f)]:
                path = Path(top) / name
                size = _size(path)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                    dirs.remove(name)
                else:
                    path.unlink()
                removed, freed = removed + 1, freed + size
    return removed, freed
