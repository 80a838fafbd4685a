"""The Python API: compose a run's config as the command line composes it, run it, get its record.

    from llm_streamline import compose, run

    cfg = compose(overrides=["experiment=smoke"])   # the typed RunConfig, validated (Hydra's compose API)
    result = run(cfg)                               # the run's record (record.RunRecord of its results.json)
    print(result.average().text(), result.where())

`compose` takes the command line's overrides (`model=...`, `replacement=ffn`, `sparsity.layers=4`) and
refuses bad input with `config.ConfigError`, as `llm-streamline` does (exit 2 there); `run` is the CLI's job:
the run directory claimed, the recipe the config names run, the record written to `<out_dir>/results.json`.
`out_dir` defaults to the directory the CLI would create (conf/config.yaml's `hydra.run.dir`). Logging is the
caller's: `logging.basicConfig(level=logging.INFO)` shows the stages as the CLI prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llm_streamline import composition, record, rundir
from llm_streamline.config import RunConfig, check_overrides, validate
from llm_streamline.record import RunRecord


def compose(overrides: Sequence[str] = ()) -> RunConfig:
    """The run's config from conf/ and `overrides`, validated; bad input raises `ConfigError` (one line)."""
    overrides = list(overrides)
    cfg = composition.compose(overrides)
    check_overrides(cfg, overrides)
    return cfg


def run(cfg: RunConfig, out_dir: str | Path | None = None) -> RunRecord:
    """Run `cfg` into `out_dir` (a new directory; default: where the CLI would put it) and return its record.
    A directory another run holds, or one with a finished run, raises `rundir.RunDirError`."""
    out_dir = Path(out_dir) if out_dir is not None else composition.default_run_dir(cfg)
    earlier = rundir.claim(out_dir)
    try:
        validate(cfg)
        return record.of(job(cfg, out_dir, earlier), out_dir)
    finally:
        rundir.release(out_dir)


def job(cfg: RunConfig, out_dir: Path, earlier: bool) -> dict:
    """One run in its claimed directory, its config validated: what `llm-streamline` and `run` both do. Returns
    the results record (results.json's content)."""
    from llm_streamline import recipes

    rundir.prepare(out_dir, earlier, saves_model=cfg.mode == "run" and cfg.save)
    return recipes.run(cfg, out_dir)
