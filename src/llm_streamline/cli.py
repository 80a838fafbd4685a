"""`llm-streamline`: the Hydra app. Composes conf/, validates it once, runs the recipe it names (see `recipes`).

Every failure ends with one line on stderr and an exit code (2 bad input, 3 a fault while running or an internal
error, its traceback in the run directory's traceback.log; 130/143 interrupted or terminated): see `errors`.
In a sweep (-m) a failing job is reported and the next one runs.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from llm_streamline import errors, rundir
from llm_streamline.composition import CONF_DIR, to_run_config
from llm_streamline.config import OBJECTIVE_DIRECTIONS, check_overrides, validate

log = logging.getLogger("llm_streamline")


FAILED_JOBS: list[tuple[str, int, str]] = []  # (job directory, exit code, message) of the sweep's failed jobs


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    """One job. In a sweep, a job's failure (its one line already printed) is recorded and the sweep goes on."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        check_sweep_direction(cfg)
    try:
        return _job(cfg)
    except SystemExit as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN or e.code in (0, None, errors.INTERRUPTED, errors.TERMINATED):
            raise
        FAILED_JOBS.append((HydraConfig.get().runtime.output_dir, int(e.code), getattr(e, "line", "")))
        return None


def check_sweep_direction(cfg: DictConfig) -> None:
    """An optimising sweeper (Optuna's `hydra.sweeper.direction`) must optimise the way the objective improves,
    or it would search for the worst model. Checked in the first job before any model is loaded; the error
    ends the whole sweep (raised outside `_job`, so it is not recorded as one job's failure)."""
    direction = HydraConfig.get().sweeper.get("direction")
    wanted = OBJECTIVE_DIRECTIONS.get(cfg.objective)  # an unknown objective: `validate` names it
    if direction is None or wanted is None:  # the basic sweeper optimises nothing
        return
    given = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
    given = [getattr(d, "name", str(d)) for d in given]  # Optuna's Direction enum or a plain string
    if given != [wanted]:
        errors.fail(f"hydra.sweeper.direction={','.join(given)} but objective={cfg.objective} needs {wanted}: "
                    f"set hydra.sweeper.direction={wanted} (the hparams_search presets follow the objective)")


def _job(cfg: DictConfig) -> float | None:
    from llm_streamline.api import job
    from llm_streamline.tracking import sweep_objective

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:  # held for the job's life: a second run into this directory is refused (see `rundir`)
        earlier = rundir.claim(out_dir)
    except rundir.RunDirError as e:
        errors.fail(str(e))
    run_cfg = None
    try:
        run_cfg = to_run_config(cfg)
        validate(run_cfg)
        check_overrides(run_cfg, list(HydraConfig.get().overrides.task))
        results = job(run_cfg, out_dir, earlier)
    except (KeyboardInterrupt, Exception) as e:
        errors.fail(*errors.job_failure(e, run_cfg, out_dir))
    finally:
        rundir.release(out_dir)
    return sweep_objective(results, run_cfg.objective)  # returned to Hydra: what a sweeper optimises


def check_output_dir(argv: list[str]) -> None:
    """Hydra creates the run directory before our code runs and fails with a traceback if it cannot; check
    the directory the command line names (or `outputs/`) first, so a read-only or blocked path gets one line.
    The part of the path before any `${...}` interpolation is checked: its deepest existing ancestor must
    be a writable directory."""
    multirun = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = next((a[len(key):] for a in reversed(argv) if a.startswith(key)), "outputs").strip("'\"")
    target = Path(given.split("${", 1)[0] or ".")
    if not multirun and "${" not in given and (target / "results.json").exists():
        errors.fail(f"output directory {target} holds a finished run (results.json); give another hydra.run.dir")
    probe = target
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # exists() follows links: a dangling link or a loop
            errors.fail(f"output directory {target}: {probe} is a dangling symlink or a symlink loop")
        probe = probe.parent
    if not probe.is_dir():
        errors.fail(f"output directory {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        errors.fail(f"output directory {target}: {probe} is not writable")
    # a run directory the command line names is claimed now, before Hydra writes its .hydra/ files into it
    # (`--help`, `--cfg` and the like write nothing and claim nothing)
    named = any(a.startswith(key) for a in argv)
    if named and not multirun and "${" not in given and not any(a.startswith("-") for a in argv):
        try:
            rundir.claim(target)
        except rundir.RunDirError as e:
            errors.fail(str(e))
        except OSError as e:
            errors.fail(f"output directory {target}: {e.strerror}")


def _os_error_line(e: OSError) -> str:
    """An OSError before the job (Hydra writing the run directory's .hydra/ files): what and where."""
    if e.errno == errno.ENAMETOOLONG:
        return (f"{e.filename}: a path component is longer than the filesystem allows (255 bytes); give a shorter "
                "hydra.run.dir or model.name")
    return f"cannot write the run directory ({e.strerror}{f': {e.filename}' if e.filename else ''})"


def print_version() -> None:
    """`--version` of every command: the package's version (Hydra's own flag would print Hydra's)."""
    from llm_streamline import __version__

    print(f"llm-streamline {__version__}")


def main() -> None:
    if "--version" in sys.argv[1:]:
        print_version()
        return
    atexit.register(errors.ignore_signals_at_exit)  # first registered, last run: see its docstring
    # before anything else (a signal while the run directory is claimed or Hydra composes gets its line too);
    # SIGINT also when started with it ignored (&); SIGHUP: the terminal closed (nohup ignores it before us)
    signal.signal(signal.SIGTERM, errors.raise_terminated)
    signal.signal(signal.SIGINT, errors.raise_interrupted)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, errors.raise_hung_up)
    sys.stdout = errors.PipeSafeStdout(sys.stdout)  # `| head`: one note, the run goes on
    try:
        check_output_dir(sys.argv[1:])
    except OSError as e:  # e.g. a path component longer than the filesystem allows
        errors.fail(_os_error_line(e))
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for Hydra's tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its errors instead of printing them: one line here
    try:
        _app()
    except KeyboardInterrupt as e:  # outside a job: during composition or between a sweep's jobs
        errors.fail(*errors.job_failure(e, None, None))
    except Exception as e:
        if errors.interrupting_signal() is not None:  # an error the interrupt caused: see `job_failure`
            errors.fail(*errors.job_failure(e, None, None))
        if full_error:  # the user asked for the traceback on the console
            raise
        line = errors.hydra_error_line(e)
        if line is None and isinstance(e, OSError):  # Hydra creating the run dir, its config
            errors.fail(_os_error_line(e), errors.BAD_INPUT if e.errno == errno.ENAMETOOLONG else errors.FAULT)
        if line is None:  # outside a job (composing, launching a sweep): no run directory to hold the traceback
            errors.fail(errors.internal_error(e, None), errors.FAULT)
        errors.fail(line)
    if FAILED_JOBS:
        for job_dir, code, line in FAILED_JOBS:
            print(f"llm-streamline: failed job {job_dir} (exit {code}): {line}", file=sys.stderr)
        errors.fail(f"{len(FAILED_JOBS)} sweep job(s) failed (listed above)", max(code for _, code, _ in FAILED_JOBS))


def eval_main() -> None:
    """`llm-streamline-eval`: the same Hydra app with mode=eval (e.g. `checkpoint=outputs/.../model eval=cpu`), so
    `-m`, `--help` (its own page: conf/hydra/help/eval.yaml) and shell completion work as for the main command.
    One app with two entry points rather than subcommands: the overrides, presets, sweeps and launchers are the
    same, and `llm-streamline mode=eval ...` is the same job. mode=eval goes before the user's overrides (Hydra's parser
    wants the overrides in one run; see `first_override`)."""
    args = sys.argv[1:]
    if "-sc" not in args and "--shell-completion" not in args:  # completion: the same config, nothing to add
        at = first_override(args)
        args = [*args[:at], "mode=eval", "hydra/help=eval", *args[at:]]
    sys.argv = [sys.argv[0], *args]
    main()


# Hydra's flags that take a value (the next token is not an override)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}
_INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def first_override(args: list[str]) -> int:
    """Where the overrides start in a Hydra command line (after its flags): an override inserted there stays in
    the one run of positional arguments Hydra's parser accepts, wherever the user put the flags."""
    k = 0
    while k < len(args):
        a = args[k]
        if a in _VALUE_FLAGS:
            k += 2
        elif a == "--info" and k + 1 < len(args) and args[k + 1] in _INFO:
            k += 2
        elif a.startswith("-"):
            k += 1
        else:
            return k
    return len(args)


if __name__ == "__main__":
    main()
