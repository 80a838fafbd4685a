"""One run directory, one run: the claim a run holds on its directory, and what it may find there.

  claim       `<run dir>/.llm-streamline-run`, locked (flock) for the run's life: a second run into the same
              directory (two launches in one second, the same hydra.run.dir twice) is refused in one line
              before it writes anything; a killed run's lock goes with its process, its claim file stays
  finished    a directory holding results.json is a finished run: refused (checked holding the claim)
  model/      a `model/` the run would replace must be provably this framework's, written by an earlier run
              into this directory (the claim file and `model/llm_streamline.json`); any other is refused
              before any work, never deleted
  leftovers   what a killed save left (`.tmp-model<random>`, `.<file>.<random>.tmp`) is removed when a run
              claims a directory an earlier run claimed
The default run directory names carry a per-process tag (`${run_tag:}` in conf/config.yaml), so launches in
the same second get different directories; the claim catches what remains (an explicit hydra.run.dir).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from llm_streamline.parallel import launch_rank

CLAIM = ".llm-streamline-run"
_HELD: dict[Path, tuple] = {}   # directory -> (its open, locked claim file, claimed before?), one per process
_TAG: list[str] = []
# the names `stages.atomic_dir` (`.tmp-<name><8 random>`) and `stages.write_atomic` (`.<name>.<8 random>.tmp`)
# give a half-written model or file in the run directory
LEFTOVER = re.compile(r"\.tmp-model[a-z0-9_]{8}|\.[\w.-]+\.[a-z0-9_]{8}\.tmp")


class RunDirError(ValueError):
    """The run directory cannot be used by this run: one line (exit 2)."""


def run_tag() -> str:
    """`${run_tag:}`: six hex digits drawn once per process (a sweep's jobs share it). The ranks of one
    data-parallel job are one run in one directory: their tag comes from what their launcher gave them all
    (torchrun's rendezvous id, else the SLURM job, else the launching agent: master address, port, parent pid)."""
    if not _TAG:
        if launch_rank() is None:
            _TAG.append(secrets.token_hex(3))
        else:
            rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
            job = rdzv if rdzv != "none" else os.environ.get("SLURM_JOB_ID") or ":".join(
                (os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), str(os.getppid())))
            _TAG.append(hashlib.sha256(job.encode()).hexdigest()[:6])
    return _TAG[0]


def claim(out_dir: Path) -> bool:
    """Lock `out_dir` for this process (created if missing). Returns True if an earlier run had claimed it.
    Raises RunDirError if another live process holds it or it holds a finished run."""
    out_dir = Path(out_dir)
    key = out_dir.resolve()
    if key in _HELD:
        return _HELD[key][1]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CLAIM
    earlier = path.exists()
    if (launch_rank() or 0) > 0:  # rank 0 holds the claim for the whole data-parallel job
        if (out_dir / "results.json").exists():
            raise RunDirError(f"output directory {out_dir} holds a finished run (results.json); give another "
                              "hydra.run.dir")
        _HELD[key] = (None, earlier)
        return earlier
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"output directory {out_dir} is in use by another run ({holder}); give another "
                          "hydra.run.dir") from None
    if (out_dir / "results.json").exists():
        release(out_dir, f)
        raise RunDirError(f"output directory {out_dir} holds a finished run (results.json); give another "
                          "hydra.run.dir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[key] = (f, earlier)
    return earlier


def release(out_dir: Path, f=None) -> None:
    """Give the claim up (end of a job; the claim file stays: it says a run used this directory)."""
    if f is None:
        f, _ = _HELD.pop(Path(out_dir).resolve(), (None, False))
    if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def prepare(out_dir: Path, earlier: bool, saves_model: bool) -> None:
    """Before any work: refuse a `model/` this framework did not write into this directory; remove what a
    killed earlier run left half-written."""
    out_dir = Path(out_dir)
    model = out_dir / "model"
    if saves_model and (model.exists() or model.is_symlink()):
        ours = earlier and model.is_dir() and not model.is_symlink() and (model / "llm_streamline.json").is_file()
        if not ours:
            raise RunDirError(f"output directory {out_dir} already holds model/, not written there by an "
                              "llm-streamline run; it is never replaced: move it or give another hydra.run.dir "
                              "(or save=false)")
    if earlier and not (launch_rank() or 0) > 0:  # another rank's files are being written, not left over
        for p in out_dir.iterdir():
            if LEFTOVER.fullmatch(p.name) and not p.is_symlink():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
