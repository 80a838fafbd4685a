"""`llm-streamline`: the Hydra app. Composes conf/, validates, runs the pipeline (or mode=eval).

Bad input ends with one line on stderr and exit code 2, before any model is loaded where possible.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llm_streamline.config import ConfigError, RunConfig, register_configs, validate

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("llm_streamline")
register_configs()


def to_run_config(cfg: DictConfig) -> RunConfig:
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, RunConfig):
        raise ConfigError("the composed config is not a RunConfig (is `run_schema` first in the defaults list?)")
    return obj


def _fail(msg: str) -> None:
    print(f"llm-streamline: error: {msg}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    from llm_streamline import pipeline
    from llm_streamline.assets import AssetError
    from llm_streamline.data import HubUnavailable
    from llm_streamline.models.layers import NoDecoderLayersError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_cfg = to_run_config(cfg)
        validate(run_cfg)
        if run_cfg.mode == "eval":
            pipeline.evaluate_checkpoint(run_cfg, out_dir)
            return None
        results = pipeline.run(run_cfg, out_dir)
    except (ConfigError, AssetError, HubUnavailable, NoDecoderLayersError, FileNotFoundError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    # returned to Hydra (sweepers optimise it): the average stability of the pruned model
    return (results.get("stability") or {}).get("average", {}).get("stability")


def main() -> None:
    _app()


def eval_main() -> None:
    """`llm-streamline-eval`: the same app with mode=eval (e.g. `checkpoint=outputs/.../model eval=cpu`)."""
    sys.argv = [sys.argv[0], "mode=eval", *sys.argv[1:]]
    _app()


if __name__ == "__main__":
    main()
