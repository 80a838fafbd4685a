"""The run's config composed from conf/ with Hydra's compose API, exactly as `llm-streamline` composes it.

`CONF_DIR` is where the configs are read; `to_run_config` turns Hydra's DictConfig into the typed `RunConfig`;
`compose(overrides)` does both and validates. The CLI (`cli`), the plan command (`plan`) and the Python API
(`llm_streamline.compose`) import them from here, below all three: nothing here imports a recipe.
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


def compose(overrides: list[str]) -> RunConfig:
    """The run's config as `llm-streamline` composes it, without Hydra's run directory or logging."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    init = (initialize_config_module(config_module="llm_streamline.conf", version_base="1.3")
            if CONF_DIR.startswith("pkg://") else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"))
    with init:
        cfg = to_run_config(hydra_compose(config_name="config", overrides=overrides))
    validate(cfg)
    return cfg
