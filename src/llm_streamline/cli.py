"""`llm-streamline`: the Hydra app. Composes conf/, validates, runs the pipeline (or mode=eval).

Bad input ends with one line on stderr and exit code 2, before any model is loaded where possible. A fault
met while running (NaN/inf, a full or read-only disk) ends with one line naming the stage and exit code 3.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
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
    print(f"llm-streamline: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _disk_message(e: BaseException, err: int) -> str:
    stage = getattr(e, "stage", None)
    filename = getattr(e, "filename", None)
    what = os.strerror(err) + (f": {filename}" if filename else "")
    return (f"stage {stage}: cannot write ({what}); finished stages are kept, nothing partial is" if stage
            else f"cannot write ({what})")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    from llm_streamline import pipeline
    from llm_streamline.assets import AssetError
    from llm_streamline.data import HubUnavailable
    from llm_streamline.faults import NumericalFault, disk_errno
    from llm_streamline.models.layers import NoDecoderLayersError
    from llm_streamline.store import NotWritableError
    from llm_streamline.tracking import sweep_objective

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if (out_dir / "results.json").exists():  # a run dir from an interpolation, or a sweep's job dir
        _fail(f"output directory {out_dir} holds a finished run (results.json); give another run directory")
    try:
        run_cfg = to_run_config(cfg)
        validate(run_cfg)
        if run_cfg.mode == "eval":
            results = pipeline.evaluate_checkpoint(run_cfg, out_dir)
        else:
            results = pipeline.run(run_cfg, out_dir)
    except NotWritableError as e:
        _fail(e.strerror)
    except (ConfigError, AssetError, HubUnavailable, NoDecoderLayersError, FileNotFoundError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except NumericalFault as e:
        log.error("NumericalFault: %s", e)
        _fail(f"numerical fault: {e}", 3)
    except Exception as e:
        err = disk_errno(e)
        if err is None:
            raise
        log.error("disk: %s", e)
        _fail(_disk_message(e, err), 3)
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
    _app()


def eval_main() -> None:
    """`llm-streamline-eval`: the same app with mode=eval (e.g. `checkpoint=outputs/.../model eval=cpu`)."""
    sys.argv = [sys.argv[0], "mode=eval", *sys.argv[1:]]
    check_output_dir(sys.argv[1:])
    _app()


if __name__ == "__main__":
    main()
