"""Weights & Biases logging: one run per job, grouped per sweep, offline when there is no API key.

`mode=auto` goes online only if an API key is configured (WANDB_API_KEY or a netrc entry) and otherwise
writes an offline run under `<run dir>/wandb/` for a later `wandb sync`. The key itself is never read into
our records or logs. The run is always finished in a `finally` (Hydra's default launcher runs multirun
jobs in one process; a dangling run would swallow the next job's logs).
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from llm_streamline.config import WandbConfig

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: WandbConfig) -> str:
    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "online"):
        return os.environ["WANDB_MODE"]
    if cfg.mode == "auto":
        return "online" if _has_api_key() else "offline"
    return cfg.mode


class Tracker:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, name: str, job_type: str = "pipeline"):
        self.mode = resolve_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=job_type,
                              name=name, config=config, dir=str(run_dir), mode=self.mode, reinit="finish_previous")
        log.info("W&B run %s (%s) in %s", self.run.id, self.mode, run_dir)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def image(self, key: str, path: Path) -> None:
        if self.run is not None and Path(path).exists():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
