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
    env = os.environ.get("WANDB_MODE")
    if env is not None and not env.strip():  # `WANDB_MODE= cmd`: unset (wandb itself would fail validating "")
        del os.environ["WANDB_MODE"]
    elif env is not None and env not in ("disabled", "offline", "online", "dryrun", "run"):
        from llm_streamline.config import ConfigError

        raise ConfigError(f"WANDB_MODE={env!r}: one of online, offline, disabled (or unset it)")
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
    """The number a sweeper optimises (`objective=`), read from the record as every other reader reads it
    (`record.RunRecord.objective`: `avg_acc` is the table's average, each task's reported metric)."""
    from llm_streamline import record

    return record.of(results).objective(objective)


def run_name(cfg: RunConfig) -> str:
    """A W&B run named after what it evaluates: the model, method:replacement, layers or target removed and
    the seed (a run), or the checkpoint / model and the suite (an eval job)."""
    s = cfg.sparsity
    if cfg.mode == "eval":
        what = Path(cfg.checkpoint.rstrip("/")).name if cfg.checkpoint else cfg.model.name
        if what in ("model", "export") and cfg.checkpoint:  # <run>/model: the run directory says which
            what = Path(cfg.checkpoint.rstrip("/")).parent.name
        return f"eval-{what}-{cfg.eval.name}"
    amount = f"n{s.layers}" if s.layers is not None else f"t{s.target}"
    return f"{cfg.model.name}-{cfg.method.name}:{cfg.replacement.type}-{amount}-s{cfg.seed}"


def sweep_group() -> str | None:
    """The group of a multirun job without `wandb.group`: its sweep directory, so every ad-hoc `-m` sweep is one
    group (W&B limits a group to 128 characters: the end of the path is kept)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return str(HydraConfig.get().sweep.dir)[-128:]
    except Exception:  # noqa: BLE001 - no Hydra context (the Python API, tests): no group
        return None


class Tracker:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, name: str, job_type: str,
                 tags: list[str] | None = None, id_from: Path | None = None):
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

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or sweep_group(),
                              job_type=job_type,
                              name=name, config=config, dir=str(run_dir), mode=self.mode, tags=tags or None,
                              id=run_id(id_from or run_dir), resume="allow", reinit="finish_previous")
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

    def use(self, artifact: str) -> None:
        """Mark an artifact of another run as this run's input (W&B lineage). Offline there is no server to
        resolve it: the link is the `source_run_id` in the config then."""
        if self.run is not None and self.mode == "online":
            try:
                self.run.use_artifact(artifact)
            except Exception as e:  # noqa: BLE001 - lineage is a convenience: never fail an export on it
                log.warning("W&B: could not link %s (%s)", artifact, e)

    def artifact_files(self, files: list[Path], kind: str, name: str | None = None) -> None:
        """Files (results.json, the per-sample rows) as one artifact of this run, named after the run."""
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name or f"{kind}-{self.run.id}", type=kind)
            for f in files:
                if Path(f).is_file():
                    art.add_file(str(f))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_offline_run(run_dir: Path) -> dict:
    """What an offline run (`<dir>/wandb/offline-run-*/run-*.wandb`, or that file) holds: {"group", "name",
    "job_type", "summary"} (the summary's last value per key), for checks without `wandb sync`. The file is a
    LevelDB-style log (32 KiB blocks; per chunk a 7-byte header: crc32, length, type) of protobuf Records."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_dir)
    if path.is_dir():
        path = next(path.glob("*.wandb"))
    data = path.read_bytes()
    block, pos, buf, out = 32768, 7, b"", {"group": None, "name": None, "job_type": None, "summary": {}}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += (block - pos % block) % block
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            which = rec.WhichOneof("record_type")
            if which == "run":
                out.update(group=rec.run.run_group or None, name=rec.run.display_name or None,
                           job_type=rec.run.job_type or None)
            elif which == "summary":
                for u in rec.summary.update:
                    if u.key and not u.key.startswith("_"):
                        out["summary"][u.key] = json.loads(u.value_json)
    return out
