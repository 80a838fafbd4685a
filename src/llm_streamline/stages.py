"""The stage cache: each stage's output stored under a key of the config that produced it.

A stage's output is written to a temporary file/dir and renamed into place (atomic on one filesystem), so
a killed run never leaves a half-written entry that a rerun would trust. A rerun with the same config finds
every finished stage and resumes after it; a sweep shares the stages its jobs have in common (the dense
evaluation, the similarity profile, the teacher pairs of a block).
Every entry is sealed: a manifest holding the key it was made for and the size and sha256 of each of its
files is written last (inside a directory entry as MANIFEST.json, beside a file entry as `<name>.manifest`).
A reader trusts an entry only if its manifest matches; one that does not (a truncated or zero-filled file, a
copied or renamed entry) is moved aside as `<name>.corrupt-<time>` with a one-line warning and recomputed.
Root: <cache>/stages (`cache_dir`: $LLM_STREAMLINE_CACHE, else ~/.cache/llm-streamline).
Every file the framework keeps is written by the atomic writer here (`write_atomic`, `atomic_dir`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

STAGE_VERSION = 2  # bump when a stage's computation changes so old entries are not reused (2: sealed entries)
MANIFEST = "MANIFEST.json"  # a directory entry's manifest; a file entry's is `<name>.manifest` beside it
CORRUPT = ".corrupt-"       # infix of an entry moved aside because it failed verification
SMALL_FILE = 1 << 20        # verify(hash_sample=k) rehashes every file below this size and k of the others
log = logging.getLogger("llm_streamline")


OWNER_MARKER = ".llm-streamline"  # at a cache root: `llm-streamline-cache clean` may remove its own entries here


def mark_owned(root: Path) -> Path:
    """Create `root` and its owner marker. Called only where an entry is written into the root (the atomic
    writer, a stage's lock), never by a command that only reads or lists it: a directory the cache command
    was merely pointed at stays unmarked, and nothing in it is ever removed."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / OWNER_MARKER
    if not marker.exists():
        marker.write_text("llm-streamline cache root: `llm-streamline-cache clean` removes only the entries "
                          "it names (assets, <kind>-<16 hex> stage entries, their leftovers)\n")
    return root


def cache_dir() -> Path:
    """The asset cache root ($LLM_STREAMLINE_CACHE, else ~/.cache/llm-streamline); neither created nor marked
    here (see `mark_owned`). A path that exists but is not a directory is refused in one line."""
    given = os.environ.get("LLM_STREAMLINE_CACHE")
    root = Path(given or os.path.join(Path.home(), ".cache", "llm-streamline"))
    if root.exists() and not root.is_dir():
        what = f"LLM_STREAMLINE_CACHE={given}" if given else f"the cache root {root}"
        raise NotWritableError(errno.ENOTDIR, f"{what} is a file, not a directory; point it at a directory")
    return root


def _mark_cache_root(dest: Path) -> None:
    """Mark the cache or stage root an entry is being written into (see `mark_owned`)."""
    dest = Path(dest).absolute()
    try:
        roots = {cache_dir().absolute(), stage_root().absolute()}
    except OSError:  # a root that is a file: nothing can be written under it anyway
        return
    for root in roots:
        if root in dest.parents:
            mark_owned(root)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_key(stage: str, **parts: Any) -> str:
    blob = json.dumps({"stage": stage, "v": STAGE_VERSION, **parts}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def stage_root() -> Path:
    given = os.environ.get("LLM_STREAMLINE_STAGES")
    root = Path(given) if given else cache_dir() / "stages"
    if given and root.exists() and not root.is_dir():
        raise NotWritableError(errno.ENOTDIR, f"LLM_STREAMLINE_STAGES={given} is a file, not a directory; "
                                              "point it at a directory")
    return root


def stage_dir(key: str) -> Path:
    """Where the entry `key` is (not created: the writer creates and marks the root, `_mark_cache_root`)."""
    return stage_root() / key


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


# tempfile creates files 0600 and directories 0700 (private by design); what we rename into place gets the
# mode a plain open()/mkdir() would give instead, so results and models on a shared filesystem are readable
# by the group/others as the user's umask allows (0644 / 0755 with the usual 022).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would create with the process umask."""
    return (0o777 if directory else 0o666) & ~_UMASK


# ------------------------------------------------------------------------------------- the atomic writer
# Every file or directory the framework keeps (stage entries, caches, results, models) is written under a
# temporary name beside its destination and renamed into place (atomic on one filesystem): a killed run
# never leaves a half-written file under the real name. Leftovers of a SIGKILL are `.<name>.<random>.tmp`
# files and `.tmp-<name><random>` directories, which nothing trusts and `llm-streamline-cache clean` removes.
def write_atomic(path: Path, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """Call `write(tmp)` to write the file's content to a temporary path beside `path`, then rename it into
    place with the mode open() would give. `fsync`: flush it to disk before the rename (results files)."""
    path = Path(path)
    _mark_cache_root(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) atomically, fsynced."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=True)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_dir(dest: Path, keep_existing: bool = False, new_only: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest` to fill; when the block ends without an error it replaces
    `dest` (an older one is removed), every file 0644 and directory 0755 under the usual umask (writers such
    as safetensors' create 0600 files, mkdtemp a 0700 directory). On an error nothing is left behind.
    `keep_existing`: a `dest` another process renamed into place first is kept (for content-addressed
    directories, whose content is the same by construction). `new_only`: `dest` is never removed; an empty one
    is replaced, a non-empty one makes the rename fail (OSError ENOTEMPTY) and is left as it was."""
    dest = Path(dest)
    _mark_cache_root(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}"))
    try:
        tmp.chmod(default_mode(directory=True))
        yield tmp
        for p in tmp.rglob("*"):
            p.chmod(default_mode(directory=p.is_dir()))
        if dest.exists() and not keep_existing and not new_only:
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (keep_existing and dest.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def read_json(path: Path) -> Any | None:
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------- sealed entries
def manifest_path(entry: Path) -> Path:
    return entry / MANIFEST if entry.is_dir() else entry.with_name(entry.name + ".manifest")


def _entry_files(entry: Path) -> dict[str, Path]:
    if entry.is_file():
        return {entry.name: entry}
    return {p.relative_to(entry).as_posix(): p for p in sorted(entry.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def seal(entry: Path, key: str) -> None:
    """Write the manifest of a finished entry (a file, or a directory before it is renamed into place):
    the key it was made for and each file's size and sha256. Written last: an entry without one is unfinished."""
    files = {rel: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for rel, p in _entry_files(entry).items()}
    write_json_atomic(manifest_path(entry), {"key": key, "files": files})


def verify(entry: Path, key: str, hash_sample: int | None = None) -> str | None:
    """Why `entry` cannot be trusted, or None when every file matches its manifest (sizes first: cheap).
    `hash_sample`: rehash only that many files drawn at random (every file's size is still checked)."""
    try:
        manifest = json.loads(manifest_path(entry).read_text())
        expected = manifest["files"]
    except FileNotFoundError:
        return "no manifest"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("key") != key:
        return f"made for {manifest.get('key')!r}, not {key!r}"
    files = _entry_files(entry)
    if set(files) != set(expected):
        return f"files {sorted(set(files) ^ set(expected))} missing or unexpected"
    for rel, meta in expected.items():
        if files[rel].stat().st_size != meta["bytes"]:
            return f"{rel} has {files[rel].stat().st_size} bytes, {meta['bytes']} written"
    hashed = list(expected.items())
    if hash_sample is not None:
        # small files (an index, a log) always; of the large ones a fresh draw on every reuse, so that over
        # repeated reuses every file gets checked while no reuse reads them all (a terabyte of teacher pairs)
        small = [(r, m) for r, m in hashed if m["bytes"] < SMALL_FILE]
        large = [(r, m) for r, m in hashed if m["bytes"] >= SMALL_FILE]
        hashed = small + random.sample(large, min(hash_sample, len(large)))
    for rel, meta in hashed:
        if sha256_of(files[rel]) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def quarantine(entry: Path, why: str) -> Path:
    """Move a damaged entry (and a file entry's manifest) aside as `<name>.corrupt-<time>`, with a warning."""
    aside = entry.with_name(f"{entry.name}{CORRUPT}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    sidecar = manifest_path(entry) if entry.is_file() else None
    try:
        os.replace(entry, aside)
    except FileNotFoundError:  # another job moved it aside first
        return aside
    if sidecar is not None and sidecar.exists():
        os.replace(sidecar, aside.with_name(aside.name + ".manifest"))
    log.warning("cache entry %s failed verification (%s): moved to %s and recomputed", entry, why, aside.name)
    return aside


def sealed(entry: Path, key: str, move_aside: bool = True, hash_sample: int | None = None) -> bool:
    """True if `entry` is finished and sound. A damaged one is moved aside (if `move_aside`; do it holding
    the stage's lock) and False returned: the caller recomputes it. A file entry without its manifest is
    unfinished (killed between the two writes): recomputing overwrites it. `hash_sample`: see `verify`."""
    entry = Path(entry)
    if not entry.exists() or (entry.is_file() and not manifest_path(entry).exists()):
        return False
    why = verify(entry, key, hash_sample)
    if why is not None and move_aside:
        quarantine(entry, why)
    return why is None


def read_sealed_json(path: Path, key: str, move_aside: bool = True) -> Any | None:
    """The JSON value of a sound sealed entry, else None (a damaged entry is moved aside)."""
    return json.loads(Path(path).read_text()) if sealed(path, key, move_aside) else None


def write_sealed_json(path: Path, key: str, obj: Any) -> None:
    write_json_atomic(path, obj)
    seal(path, key)


@contextmanager
def stage_lock(key: str):
    """Hold an exclusive lock on one stage while it is computed. Jobs of a sweep that run in parallel (a
    local or SLURM launcher) and need the same stage (the dense evaluation, a block's teacher pairs) then
    compute it once: the others wait, find it finished, and reuse it. flock works across processes on one
    machine and on shared filesystems that support it (NFSv4, Lustre, GPFS)."""
    import fcntl

    locks = mark_owned(stage_root()) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / key, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_json(key: str, compute, log=None) -> tuple[Any, bool]:
    """Return (value, was_cached). `compute()` must return JSON-serialisable data."""
    path = stage_dir(key).with_suffix(".json")
    hit = read_sealed_json(path, key, move_aside=False)
    if hit is None:
        with stage_lock(key):
            hit = read_sealed_json(path, key)  # another job may have finished it while we waited
            if hit is None:
                value = compute()
                write_sealed_json(path, key, value)
                return value, False
    if log:
        log(f"stage {key}: reused from {path}")
    return hit, True


def kill_point(point: str) -> None:
    """A place a test may kill the process at (`LLM_STREAMLINE_KILL_AT=<point>`); nothing in normal use."""
    if os.environ.get("LLM_STREAMLINE_KILL_AT") == point:  # LLM_STREAMLINE_KILL_SIGNAL: INT, TERM (default KILL)
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("LLM_STREAMLINE_KILL_SIGNAL", "KILL")))
