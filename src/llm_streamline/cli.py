"""`llm-streamline`: the Hydra app. Composes conf/, validates, runs the pipeline (or mode=eval).

Every failure ends with one line on stderr (`llm-streamline: error: ...`) and an exit code:
  2    bad input: a config value, an unknown key or preset, a wrong type (Hydra's own errors too), a model or
       checkpoint that cannot be loaded, an output directory that cannot be written or holds a finished run;
       before any model is loaded where possible
  3    a fault while running: NaN/inf, a full or read-only disk, an internal error (its traceback is written
       to `<run dir>/traceback.log`)
  130  interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM, e.g. a cluster's pre-emption notice)
In a sweep (-m) a failing job is reported and the next one runs; the sweep then exits with the worst code
(2 or 3) after listing the failed jobs. Finished stages are kept in every case.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from llm_streamline.config import ConfigError, RunConfig, register_configs, reject_unknown_keys, validate


def _config_path() -> str:
    """Where Hydra finds config.yaml. A source checkout (the package imported from `src/`, editable or on
    PYTHONPATH) reads the repository's top-level conf/, so edits there take effect at once; an installed
    wheel reads the copy shipped as the package `llm_streamline.conf` (pyproject's package-dir mapping)."""
    checkout_conf = Path(__file__).resolve().parents[2] / "conf"
    if (checkout_conf / "config.yaml").is_file() and Path(__file__).resolve().parent.parent.name == "src":
        return str(checkout_conf)
    return "pkg://llm_streamline.conf"


CONF_DIR = _config_path()
log = logging.getLogger("llm_streamline")
register_configs()


def to_run_config(cfg: DictConfig) -> RunConfig:
    reject_unknown_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):
        raise ConfigError("the composed config is not a RunConfig (is `run_schema` first in the defaults list?)")
    return obj


def _fail(msg: str, code: int = 2) -> None:
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a stage's open progress bar would print after us
        bar.close()
    print(f"llm-streamline: error: {msg}", file=sys.stderr, flush=True)
    exit_ = SystemExit(code)
    exit_.line = msg  # a sweep lists it at the end
    raise exit_


def _log_to_file(msg: str) -> None:
    """The error with its type goes to the run's log file only: the console shows it once, as `_fail`'s line
    (Hydra's console handler would print it a second time)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail_unexpected(e: Exception, out_dir: Path) -> None:
    """An error no check foresaw: one line naming the stage, exit 3; the traceback goes to a file."""
    stage = getattr(e, "stage", None)
    where = out_dir / "traceback.log"
    try:
        where.write_text(traceback.format_exc())
    except OSError:
        where = None
    _fail(f"{f'stage {stage}: ' if stage else ''}{type(e).__name__}: {_first_line(e)}"
          f"{f' (traceback in {where})' if where else ''}", 3)


def _load_error_line(e: Exception, cfg: RunConfig) -> str:
    source = cfg.checkpoint if cfg.mode == "eval" and cfg.checkpoint else cfg.model.name_or_path or cfg.model.name
    return f"cannot load the model from {source}: {type(e).__name__}: {_first_line(e)}"


def _hydra_error_line(e: Exception) -> str | None:
    """Hydra's and OmegaConf's composition errors (unknown key or preset, wrong type) as one line, or None."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from llm_streamline.config import _schema_keys

    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    unknown = re.match(r"Could not override '([^']+)'", str(e))
    if unknown:  # Hydra's hint would be `+key=...`, which the schema then refuses: name the closest key
        close = difflib.get_close_matches(unknown.group(1), list(_schema_keys(RunConfig)), n=1)
        return f"unknown key {unknown.group(1)}" + (f": did you mean {close[0]}?" if close else "")
    line = _first_line(e)
    if isinstance(e, MissingConfigException) and e.options:
        line += f"; available: {', '.join(e.options)}"
    if e.__cause__ is not None:
        line += f": {_first_line(e.__cause__)}"
    return line


def _disk_message(e: BaseException, err: int) -> str:
    stage = getattr(e, "stage", None)
    filename = getattr(e, "filename", None)
    what = os.strerror(err) + (f": {filename}" if filename else "")
    return (f"stage {stage}: cannot write ({what}); finished stages are kept, nothing partial is" if stage
            else f"cannot write ({what})")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (temporary files removed, W&B run finished)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


FAILED_JOBS: list[tuple[str, int, str]] = []  # (job directory, exit code, message) of the sweep's failed jobs


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    """One job. In a sweep, a job's failure (its one line already printed) is recorded and the sweep goes on."""
    try:
        return _job(cfg)
    except SystemExit as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN or e.code in (0, None, 130, 143):
            raise
        FAILED_JOBS.append((HydraConfig.get().runtime.output_dir, int(e.code), getattr(e, "line", "")))
        return None


def _job(cfg: DictConfig) -> float | None:
    from llm_streamline import pipeline
    from llm_streamline.assets import AssetError
    from llm_streamline.data import HubUnavailable
    from llm_streamline.faults import NumericalFault, disk_errno
    from llm_streamline.models.layers import NoDecoderLayersError
    from llm_streamline.stages import NotWritableError
    from llm_streamline.tracking import sweep_objective

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if (out_dir / "results.json").exists():  # a run dir from an interpolation, or a sweep's job dir
        _fail(f"output directory {out_dir} holds a finished run (results.json); give another run directory")
    run_cfg = None
    try:
        run_cfg = to_run_config(cfg)
        validate(run_cfg)
        if run_cfg.mode == "eval":
            results = pipeline.evaluate_checkpoint(run_cfg, out_dir)
        else:
            results = pipeline.run(run_cfg, out_dir)
    except NotWritableError as e:
        _fail(e.strerror)
    except (ConfigError, AssetError, HubUnavailable, NoDecoderLayersError, FileNotFoundError) as e:
        _log_to_file(f"{type(e).__name__}: {e}")
        _fail(_first_line(e))
    except ValueError as e:
        _log_to_file(f"{type(e).__name__}: {e}")
        corrupt_json = isinstance(e, json.JSONDecodeError) and getattr(e, "stage", None) == "load_model"
        _fail(_load_error_line(e, run_cfg) if corrupt_json else _first_line(e))  # a JSON error names no file
    except NumericalFault as e:
        _log_to_file(f"NumericalFault: {e}")
        _fail(f"numerical fault: {e}", 3)
    except KeyboardInterrupt as e:
        stage = getattr(e, "stage", None)
        _fail(f"interrupted{f' during stage {stage}' if stage else ''}; finished stages are kept",
              143 if isinstance(e, Terminated) else 130)
    except Exception as e:
        err = disk_errno(e)
        if err is not None:
            _log_to_file(f"disk: {e}")
            _fail(_disk_message(e, err), 3)
        if getattr(e, "stage", None) == "load_model":  # a damaged or foreign model or checkpoint
            _fail(_load_error_line(e, run_cfg))
        _fail_unexpected(e, out_dir)
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
        _fail(f"output directory {target} holds a finished run (results.json); give another hydra.run.dir")
    probe = target
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # exists() follows links: a dangling link or a loop
            _fail(f"output directory {target}: {probe} is a dangling symlink or a symlink loop")
        probe = probe.parent
    if not probe.is_dir():
        _fail(f"output directory {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"output directory {target}: {probe} is not writable")


def main() -> None:
    check_output_dir(sys.argv[1:])
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (nohup, &)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for Hydra's tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its errors instead of printing them: one line here
    try:
        _app()
    except KeyboardInterrupt as e:  # outside a job: during composition or between a sweep's jobs
        _fail("interrupted; finished stages are kept", 143 if isinstance(e, Terminated) else 130)
    except Exception as e:
        line = None if full_error else _hydra_error_line(e)
        if line is None:
            raise
        _fail(line)
    if FAILED_JOBS:
        for job_dir, code, line in FAILED_JOBS:
            print(f"llm-streamline: failed job {job_dir} (exit {code}): {line}", file=sys.stderr)
        _fail(f"{len(FAILED_JOBS)} sweep job(s) failed (listed above)", max(code for _, code, _ in FAILED_JOBS))


def eval_main() -> None:
    """`llm-streamline-eval`: the same app with mode=eval (e.g. `checkpoint=outputs/.../model eval=cpu`)."""
    sys.argv = [sys.argv[0], "mode=eval", *sys.argv[1:]]
    main()


if __name__ == "__main__":
    main()
