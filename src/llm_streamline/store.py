"""The stage cache: each stage's output stored under a key of the config that produced it.

A stage's output is written to a temporary file/dir and renamed into place (atomic on one filesystem), so
a killed run never leaves a half-written entry that a rerun would trust. A rerun with the same config finds
every finished stage and resumes after it; a sweep shares the stages its jobs have in common (the dense
evaluation, the similarity profile, the teacher pairs of a block).
Root: <cache>/stages (see `assets.cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from llm_streamline.assets import cache_dir

STAGE_VERSION = 1  # bump when a stage's computation changes so old entries are not reused


def stage_key(stage: str, **parts: Any) -> str:
    blob = json.dumps({"stage": stage, "v": STAGE_VERSION, **parts}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def stage_root() -> Path:
    return Path(os.environ.get("LLM_STREAMLINE_STAGES") or cache_dir() / "stages")


def stage_dir(key: str) -> Path:
    root = stage_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / key


class NotWritableError(OSError):
    """A directory the run must write to cannot be written: reported as bad input, before any heavy work."""


def check_writable(directory: Path, what: str) -> None:
    """Fail now, before any heavy work, if `directory` cannot be created or written (read-only mount, a
    file in the way, no permission, a full disk): one probe file written, fsynced and removed."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise NotWritableError(e.errno, f"{what} {directory} is not writable: {e.strerror}") from e


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def read_json(path: Path) -> Any | None:
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def cached_json(key: str, compute, log=None) -> tuple[Any, bool]:
    """Return (value, was_cached). `compute()` must return JSON-serialisable data."""
    path = stage_dir(key).with_suffix(".json")
    hit = read_json(path)
    if hit is not None:
        if log:
            log(f"stage {key}: reused from {path}")
        return hit, True
    value = compute()
    write_json_atomic(path, value)
    return value, False
