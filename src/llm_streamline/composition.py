"""The run's config composed from conf/ with Hydra's compose API, exactly as `llm-streamline` composes it.

`CONF_DIR` is where the configs are read; `to_run_config` turns Hydra's DictConfig into the typed `RunConfig`;
`compose(overrides)` does both and validates; `default_run_dir(cfg)` is where the CLI would run it. The CLI
(`cli`), the plan command (`plan`) and the Python API (`api`) import them from here, below all three: nothing
here imports a recipe.
"""

from __future__ import annotations

from pathlib import Path

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
register_configs()  # the schema node (`run_schema`) and resolvers the defaults list names


def to_run_config(cfg: DictConfig) -> RunConfig:
    reject_unknown_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):
        raise ConfigError("the composed config is not a RunConfig (is `run_schema` first in the defaults list?)")
    return obj


def _hydra_compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    init = (initialize_config_module(config_module="llm_streamline.conf", version_base="1.3")
            if CONF_DIR.startswith("pkg://") else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"))
    with init:
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def compose(overrides: list[str]) -> RunConfig:
    """The run's config as `llm-streamline` composes it, without Hydra's run directory or logging."""
    cfg = to_run_config(_hydra_compose(overrides))
    validate(cfg)
    return cfg


def default_run_dir(cfg: RunConfig) -> Path:
    """The directory `llm-streamline` would create for `cfg`: conf/config.yaml's `hydra.run.dir` (date, time, a
    per-process tag, the model and the replacement), resolved against `cfg` now."""
    template = OmegaConf.to_container(_hydra_compose([], hydra_config=True).hydra.run, resolve=False)["dir"]
    values = OmegaConf.to_container(OmegaConf.structured(cfg))  # plain values: the template may read any of them
    return Path(OmegaConf.create({**values, "_run_dir": template})._run_dir)
