"""Weights & Biases logging: one run per job, grouped per sweep, offline when there is no API key.

`mode=auto` goes online only if an API key is configured (WANDB_API_KEY or a netrc entry) and otherwise
writes an offline run under `<run dir>/wandb/` for a later `wandb sync`. The key itself is never read into
our records or logs. The run is always finished in a `finally` (Hydra's default launcher runs multirun
jobs in one process; a dangling run would swallow the next job's logs).

The run id is derived from the run directory, with resume="allow": a requeued SLURM job (or a rerun into
the same directory) continues its W&B run instead of starting a new one. `job_type` says what the job did
(run, eval, report, export) and the tags say which configuration it was (method, replacement, sparsity, seed), so
runs filter in the W&B UI without opening their configs.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from llm_streamline.config import RunConfig, WandbConfig

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


def _online_unavailable(timeout_s: float = 3.0) -> str | None:
    """Why an online W&B run cannot start (no API key, the server unreachable within `timeout_s`), else None.
    Checked first: wandb.init would otherwise retry for minutes (127 s measured) and end in a CommError."""
    from urllib.parse import urlparse

    if not _has_api_key():
        return "no API key"
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{url.hostname}:{port} unreachable: {e.strerror or e}"
    return None


JOB_TYPES = ("run", "eval", "report", "export")


def run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: the same directory (a requeued job) gives the same id."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def run_tags(cfg: RunConfig) -> list[str]:
    """Tags naming the configuration: method, replacement, sparsity (layers or target) and seed."""
    s = cfg.sparsity
    sparsity = f"layers={s.layers}" if s.layers is not None else f"target={s.target}"
    return [f"method={cfg.method.name}", f"replacement={cfg.replacement.type}", sparsity, f"seed={cfg.seed}"]


def sweep_objective(results: dict, objective: str) -> float | None:
    """The number a sweeper optimises (`objective=`): the pruned model's perplexity (`ppl`, lower is
    better), its mean accuracy over the suite (`avg_acc`), or its average stability against the dense
    model (`stability`). Works on the results of a run and of mode=eval (whose eval table is flat)."""
    if objective == "ppl":
        return ((results.get("perplexity") or {}).get("pruned") or {}).get("ppl")
    if objective == "stability":
        return ((results.get("stability") or {}).get("average") or {}).get("stability")
    if objective == "avg_acc":
        accs = [row.get("pruned", row).get("acc") for row in (results.get("eval") or {}).values()]
        accs = [a for a in accs if a is not None]
        return sum(accs) / len(accs) if accs else None
    raise ValueError(f"objective={objective!r}: ppl | avg_acc | stability")


class Tracker:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, name: str, job_type: str,
                 tags: list[str] | None = None):
        if job_type not in JOB_TYPES:
            raise ValueError(f"job_type={job_type!r}: one of {JOB_TYPES}")
        self.mode = resolve_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        if self.mode == "online" and (why := _online_unavailable()):
            log.warning("W&B online is not possible (%s): writing an offline run for `wandb sync`", why)
            self.mode = "offline"
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=job_type,
                              name=name, config=config, dir=str(run_dir), mode=self.mode, tags=tags or None,
                              id=run_id(run_dir), resume="allow", reinit="finish_previous")
        log.info("W&B run %s (%s, %s) in %s", self.run.id, job_type, self.mode, run_dir)

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

    def artifact(self, directory: Path, name: str, kind: str, metadata: dict | None = None) -> None:
        """`directory` as a W&B artifact of this run (offline: recorded for `wandb sync`)."""
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind, metadata=metadata or {})
            art.add_dir(str(directory))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
