"""What the user sees when a run fails: one line on stderr (`llm-streamline: error: ...`) and an exit code.

  2    bad input, and only what a check recognised as such: a config value (`config.ConfigError`, the one
       bad-input exception every check of the user's input raises: `validate`, `preflight`, the recipes' and
       methods' checks of what the config asks for, the commands' arguments), an unknown key or preset or a
       wrong type (Hydra's own errors), a model or checkpoint that cannot be loaded, a missing asset offline,
       an output directory that cannot be written or holds a finished run; before any model is loaded where
       possible
  3    a fault while running: NaN/inf, a full or read-only disk, and every error no check foresaw (an
       internal error: a ValueError from a bug is one too); its line names the stage and points to the full
       traceback, written to `<run dir>/traceback.log` (a temporary file when there is no run directory yet)
  130  interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM, e.g. a cluster's pre-emption notice); 129: hung
       up (SIGHUP, the terminal closed). A second signal during the cleanup exits at once with its own line
In a sweep (-m) a failing job is reported and the next one runs; the sweep then exits with the worst code
(2 or 3) after listing the failed jobs. Finished stages are kept in every case.

The modules that detect a problem raise their own exception (ConfigError, NotWritableError, AssetError, ...);
`job_failure` is the one place that turns an exception into its line and code, for the main command and the
plan command (the Python API raises the exception itself: `ConfigError` for bad input).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

from llm_streamline.config import ConfigError, RunConfig, mapping_keys, unknown_key_line

BAD_INPUT = 2
FAULT = 3
INTERRUPTED = 130  # SIGINT
TERMINATED = 143   # SIGTERM
log = logging.getLogger("llm_streamline")


HUNG_UP = 129      # SIGHUP (the terminal or ssh session closed)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (temporary files removed, W&B run finished)."""


class HungUp(KeyboardInterrupt):
    """SIGHUP (the terminal closed), handled as Ctrl-C is: the same cleanup, its one line, exit 129."""


def raise_terminated(signum, frame) -> None:
    _interrupted_once(signum)
    raise Terminated()


def raise_hung_up(signum, frame) -> None:
    _interrupted_once(signum)
    raise HungUp()


def raise_interrupted(signum, frame) -> None:
    _interrupted_once(signum)
    raise KeyboardInterrupt()


_received: list[int] = []  # the signal that interrupted this process (at most one: see `_interrupted_once`)


def interrupting_signal() -> int | None:
    """The SIGINT/SIGTERM/SIGHUP that interrupted this run, or None."""
    return _received[0] if _received else None


def _interrupted_once(signum: int) -> None:
    """After the first SIGINT/SIGTERM/SIGHUP the cleanup runs (temporary files removed, W&B finished); a second
    one (Ctrl-C twice) must not land inside it as a traceback: it ends the process at once, with one line.
    What the cleanup had left to remove is named like every killed run's leftovers (see `stages`)."""
    import signal

    _received.append(signum)

    def again(signum, frame):
        os.write(2, b"llm-streamline: error: interrupted again; exiting now without cleanup (finished stages are "
                    b"kept; leftovers go with the next run or llm-streamline-cache clean --what leftovers)\n")
        os._exit(INTERRUPTED if signum == signal.SIGINT else 128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, again)


def ignore_signals_at_exit() -> None:
    """Registered by `llm-streamline` before anything else, so it runs last of the exit handlers (after W&B's,
    which a second Ctrl-C may still cut short): the interpreter's teardown then resets Python-level handlers to
    the default, under which a late second Ctrl-C killed the process by SIGINT (exit -2) instead of letting it
    end with its code (130); an ignored signal stays ignored through the teardown.

    It also keeps the exit code ours after an interrupt. CPython marks a KeyboardInterrupt that propagates out
    of code run from a *string* (`exec(str)`, which dataclasses and namedtuple use to build their methods: an
    interrupt while a module defines one) as unhandled at top level, although we catch it and exit with 130;
    under `python -m` the interpreter then ends by killing itself with SIGINT (exit -2, CPython 3.10-3.13's
    `exit_sigint`), 1 run in ~7 of `Ctrl-C twice` under load. Running a string resets that mark first thing,
    so an empty one clears it (the exit code is already decided: every interrupt ends in `fail`)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if _received:
        exec("")  # clears CPython's unhandled-KeyboardInterrupt mark, see above


def interrupt_code(e: KeyboardInterrupt) -> int:
    return TERMINATED if isinstance(e, Terminated) else HUNG_UP if isinstance(e, HungUp) else INTERRUPTED


class PipeSafeStdout:
    """stdout that survives its reader going away (`llm-streamline ... | head`): the first BrokenPipeError is
    said once on stderr, stdout then goes to /dev/null and the run goes on (its log file is complete); without
    this every log record printed a 'Logging error' traceback (45 in a smoke run)."""

    def __init__(self, stream):
        self._stream, self._broken = stream, False

    def _closed(self) -> None:
        if not self._broken:
            self._broken = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the interpreter's last flush goes nowhere, silently
            os.close(devnull)
            print("llm-streamline: note: standard output was closed by its reader (a pipe into head?); the run "
                  "goes on, its log is in the run directory", file=sys.stderr, flush=True)

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def __getattr__(self, name):  # fileno, isatty, encoding, ... of the real stream
        return getattr(self._stream, name)


def fail(msg: str, code: int = BAD_INPUT) -> NoReturn:
    """Print the one line and exit with `code` (the SystemExit carries the line: a sweep lists it at the end).
    Imports nothing: an interrupt can land inside an import (asyncio, torch), and importing it again here would
    raise instead of printing the line. Open progress bars exist only if tqdm was imported already."""
    std = sys.modules.get("tqdm.std")
    bars = getattr(getattr(std, "tqdm", None), "_instances", ())  # shared by tqdm.auto's subclasses
    for bar in list(bars):  # a stage's open progress bar would print after us
        try:
            bar.close()
        except OSError:
            pass
    try:
        print(f"llm-streamline: error: {msg}", file=sys.stderr, flush=True)
    except OSError:  # stderr gone with its terminal (SIGHUP): the exit code still says what happened
        pass
    exit_ = SystemExit(code)
    exit_.line = msg
    raise exit_


def usage_error(line: str) -> SystemExit:
    """A command's bad input (`llm-streamline-report`, `llm-streamline-cache`): the line, already prefixed with
    the command's name, printed here; exit code 2 (a SystemExit carrying the text would exit 1). The exception's
    text stays the line, for callers in Python."""
    print(line, file=sys.stderr)
    e = SystemExit(line)
    e.code = BAD_INPUT
    return e


def command_internal_error(prog: str, e: BaseException) -> NoReturn:
    """A command other than a run (report, cache, export) met an error no check foresaw: one line naming the
    temporary file that holds its traceback, exit 3 (not Python's traceback and exit 1)."""
    print(f"{prog}: error: {internal_error(e, None)}", file=sys.stderr, flush=True)
    raise SystemExit(FAULT)


def _log_to_file(msg: str) -> None:
    """The error with its type goes to the run's log file only: the console shows it once, as `fail`'s line
    (Hydra's console handler would print it a second time)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hydra_error_line(e: Exception) -> str | None:
    """Hydra's and OmegaConf's composition errors (unknown key or preset, wrong type) as one line, or None."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    unknown = re.match(r"Could not override '([^']+)'", str(e))
    if unknown:  # Hydra's hint would be `+key=...`, which the schema then refuses: name the closest key
        key = unknown.group(1)
        mapping = next((k for k in (key, key.rsplit(".", 1)[0]) if k in mapping_keys()), None)
        if mapping:  # a free mapping (eval.task_limits): Hydra replaces it with ++, adds one entry with +
            given = re.search(r"use \+(\S+)", str(e))
            value = given.group(1).split("=", 1)[1] if given and "=" in given.group(1) else "<value>"
            return (f"++{mapping}={value} replaces the mapping {mapping}" if key == mapping else
                    f"+{key}={value} adds an entry to the mapping {mapping}") + \
                f": write it so ({key} cannot be overridden as given)"
        return unknown_key_line(key, getattr(e.__cause__, "object_type", None))
    line = first_line(e)
    if isinstance(e, MissingConfigException) and e.options:
        line += f"; available: {', '.join(e.options)}"
    if e.__cause__ is not None:
        line += f": {first_line(e.__cause__)}"
    return line


def _load_error_line(e: Exception, cfg: RunConfig) -> str:
    source = cfg.checkpoint if cfg.mode == "eval" and cfg.checkpoint else cfg.model.name_or_path or cfg.model.name
    return f"cannot load the model from {source}: {type(e).__name__}: {first_line(e)}"


def _disk_line(e: BaseException, err: int) -> str:
    stage = getattr(e, "stage", None)
    filename = getattr(e, "filename", None)
    what = os.strerror(err) + (f": {filename}" if filename else "")
    return (f"stage {stage}: cannot write ({what}); finished stages are kept, nothing partial is" if stage
            else f"cannot write ({what})")


def internal_error(e: BaseException, out_dir: Path | None) -> str:
    """The line of an error no check foresaw (exit 3): the stage, the error's first line, and where its full
    traceback went: `<out_dir>/traceback.log`, written atomically (a reader never sees half of it), or a
    temporary file when there is no run directory yet (composing the config) or it cannot be written."""
    from llm_streamline.stages import write_text_atomic

    stage = getattr(e, "stage", None)
    text = "".join(traceback.format_exception(e))
    where = None
    if out_dir is not None:
        try:
            where = write_text_atomic(Path(out_dir) / "traceback.log", text)
        except OSError:
            where = None
    if where is None:
        try:
            fd, name = tempfile.mkstemp(prefix="llm-streamline-traceback-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            where = Path(name)
        except OSError:  # nowhere to write: the line still says what failed
            where = None
    return (f"{f'stage {stage}: ' if stage else ''}internal error: {type(e).__name__}: {first_line(e)}"
            f"{f' (traceback in {where})' if where else ''}")


def job_failure(e: BaseException, cfg: RunConfig | None, out_dir: Path | None) -> tuple[str, int]:
    """The one line and the exit code of an exception a job raised (`cfg`: None if composing it failed;
    `out_dir`: None before there is a run directory)."""
    signum = interrupting_signal()
    if isinstance(e, KeyboardInterrupt) or signum is not None:  # before the imports below: a signal landing
        # inside `import torch` leaves it half-initialised, and importing it again would raise instead of naming
        # the interrupt. Any error after an interrupt is its consequence: a library's cleanup that fails on its
        # half-built state as the KeyboardInterrupt unwinds it replaces it (omegaconf's flag_override raised an
        # AttributeError: exit 3, an internal error, for a Ctrl-C during composition)
        stage = getattr(e, "stage", None)
        code = interrupt_code(e) if isinstance(e, KeyboardInterrupt) else 128 + signum
        return f"interrupted{f' during stage {stage}' if stage else ''}; finished stages are kept", code
    # imported here, when a job has failed: `--help` and Hydra's composition errors need no torch
    from llm_streamline.assets import AssetError
    from llm_streamline.data import HubUnavailable
    from llm_streamline.faults import NumericalFault, disk_errno
    from llm_streamline.models.layers import NoDecoderLayersError
    from llm_streamline.rundir import RunDirError
    from llm_streamline.stages import NotWritableError

    if isinstance(e, NotWritableError):
        return e.strerror, BAD_INPUT
    if isinstance(e, (ConfigError, AssetError, HubUnavailable, NoDecoderLayersError, FileNotFoundError, RunDirError)):
        _log_to_file(f"{type(e).__name__}: {e}")
        return first_line(e), BAD_INPUT
    composing = hydra_error_line(e)  # an unknown key or preset, a wrong type: Hydra's and OmegaConf's checks
    if composing is not None:
        _log_to_file(f"{type(e).__name__}: {e}")
        return composing, BAD_INPUT
    if isinstance(e, NumericalFault):
        _log_to_file(f"NumericalFault: {e}")
        return f"numerical fault: {e}", FAULT
    err = disk_errno(e)
    if err is not None:
        _log_to_file(f"disk: {e}")
        return _disk_line(e, err), FAULT
    if getattr(e, "stage", None) == "load_model" and cfg is not None:  # a damaged or foreign model or checkpoint
        return _load_error_line(e, cfg), BAD_INPUT  # (a truncated config.json: a JSON error, naming no file)
    line = internal_error(e, out_dir)
    _log_to_file(line)
    return line, FAULT
