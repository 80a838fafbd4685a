"""`llm-streamline-export run=<run dir>`: a saved run's model made shareable.

  - a stock checkpoint where one exists: `none`/`layer`/`layers` are stock already; a `swiglu` slot on a
    pre-norm layer becomes an exactly equivalent stock decoder layer (`replace.export_stock`). Models that
    no stock class can hold (an `ffn` slot, LLM-Pruner's per-layer widths) are copied in this package's
    format, which `llm_streamline.load_pruned` reads;
  - a model card (README.md): method, block removed, parameters, the eval table from results.json, the
    command that made the run and the one that exported it;
  - optionally `push_to_hub=<repo id>` (off by default) and, when W&B is on, the checkpoint as an artifact
    of the run that made it (the same W&B run id, see `tracking.run_id`);
  - `format=gguf` (llama.cpp / Ollama) for stock layouts: see `gguf_export`.

Arguments are `key=value` (as the other commands), typed by `ExportConfig`.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_streamline import stages
from llm_streamline.config import WandbConfig
from llm_streamline.gguf_export import GGUFExportError

log = logging.getLogger("llm_streamline")
FORMATS = ("safetensors", "gguf")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportConfig:
    run: str = MISSING                     # a run directory (holding model/ and results.json) or a model dir
    out: Optional[str] = None              # a new or empty directory; default: <run>/export (or export-gguf)
    format: str = "safetensors"            # safetensors | gguf (stock layouts only)
    dtype: str = "float32"                 # float32 | float16 (| bfloat16 for safetensors)
    push_to_hub: Optional[str] = None      # a hub repo id; nothing is uploaded unless given
    hub_private: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ExportError(ValueError):
    """An export that cannot work: one line naming what and why."""


def parse_args(argv: list[str]) -> ExportConfig:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(argv))
        export_cfg: ExportConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ExportError(str(e).splitlines()[0]) from e
    if export_cfg.format not in FORMATS:
        raise ExportError(f"format={export_cfg.format!r}: one of {FORMATS}")
    allowed = ("float32", "float16") if export_cfg.format == "gguf" else tuple(EXPORT_DTYPES)
    if export_cfg.dtype not in allowed:
        raise ExportError(f"dtype={export_cfg.dtype!r}: one of {allowed} for format={export_cfg.format}")
    return export_cfg


@dataclass
class SavedRun:
    """Where a saved model and the records of the run that made it are."""
    run_dir: Path
    model_dir: Path
    results: dict | None
    meta: dict                             # model/llm_streamline.json: format and the run's record

    @classmethod
    def find(cls, path: str | Path) -> SavedRun:
        path = Path(path)
        model_dir = path / "model" if (path / "model").is_dir() else path
        if not (model_dir / "llm_streamline.json").exists():
            raise ExportError(f"run={path}: no model saved by llm-streamline there "
                              "(expected <run dir>/model/llm_streamline.json; was the run made with save=false?)")
        run_dir = model_dir.parent if model_dir != path else path
        results = stages.read_json(run_dir / "results.json")
        return cls(run_dir, model_dir, results, stages.read_json(model_dir / "llm_streamline.json"))


# ------------------------------------------------------------------------------------------ stock model
def to_stock(saved: SavedRun, dtype: torch.dtype):
    """(model, True) in a layout stock transformers loads, or (model, False) when none holds it exactly."""
    from llm_streamline.models.checkpoints import STREAMLINE_CONFIG, load_pruned
    from llm_streamline.models.layers import find_decoder_stack
    from llm_streamline.replace import export_stock

    model = load_pruned(saved.model_dir)  # fp32: the export to a stock layer is exact before any cast
    fmt = saved.meta.get("format")
    if fmt == "stock":
        return model.to(dtype), True
    if fmt == "streamline":
        spec = stages.read_json(saved.model_dir / STREAMLINE_CONFIG)
        if spec["replacement"]["type"] == "swiglu":
            start = spec["slot_start"]
            stack = find_decoder_stack(model)
            # any other decoder layer serves as the template (its attention is silenced, its MLP replaced)
            reference = stack.layers[start - 1 if start > 0 else start + 1]
            try:
                return export_stock(model, start, reference).to(dtype), True
            except ValueError as e:
                log.info("no stock layer for this slot: %s", e)
    return model.to(dtype), False


def _write_model(saved: SavedRun, dest: Path, dtype: torch.dtype) -> tuple[bool, int]:
    """The checkpoint into `dest` (not yet the card). Returns (stock?, parameter count)."""
    from llm_streamline.models.checkpoints import load_tokenizer

    model, stock = to_stock(saved, dtype)
    if stock:
        model.save_pretrained(dest, safe_serialization=True)
        load_tokenizer(saved.model_dir).save_pretrained(dest)
    else:  # this package's format, as saved (dtype as trained)
        shutil.copytree(saved.model_dir, dest, dirs_exist_ok=True)
    stages.write_json_atomic(dest / "llm_streamline.json",
                            {**saved.meta, "format": "stock" if stock else saved.meta.get("format"),
                             "exported_from": str(saved.model_dir.resolve())})
    return stock, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ model card
def _original_command(run_dir: Path) -> str | None:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        return None
    args = OmegaConf.to_container(OmegaConf.load(overrides))
    return shlex.join(["llm-streamline", *map(str, args)])


def _eval_table(results: dict) -> list[str]:
    rows = ["| task | dense acc | pruned acc | dense acc_norm | pruned acc_norm |", "|---|---|---|---|---|"]

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "–"

    for task, row in (results.get("eval") or {}).items():
        d, p = row.get("dense", {}), row.get("pruned", row)
        rows.append(f"| {task} | {fmt(d.get('acc'))} | {fmt(p.get('acc'))} | {fmt(d.get('acc_norm'))} "
                    f"| {fmt(p.get('acc_norm'))} |")
    return rows if len(rows) > 2 else []


def _load_snippet(stock: bool, gguf_file: str | None) -> list[str]:
    if gguf_file:
        return ["```python", "from transformers import AutoModelForCausalLM",
                f'model = AutoModelForCausalLM.from_pretrained(PATH, gguf_file="{gguf_file}")', "```", "",
                f"llama.cpp: `llama-cli -m {gguf_file}`"]
    if stock:
        return ["```python", "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(PATH)", "```"]
    return ["```python", "import llm_streamline  # pip install llm-streamline",
            "model = llm_streamline.load_pruned(PATH)", "```"]


def model_card(saved: SavedRun, stock: bool, params: int, export_command: str, gguf_file: str | None = None) -> str:
    meta, res = saved.meta, saved.results or {}
    block = meta.get("block") or {}
    lines = ["---", "library_name: transformers" if stock else "library_name: llm-streamline",
             "tags: [llm-streamline, pruning, layer-pruning]", "---", "",
             f"# {res.get('model', {}).get('name', 'model')} pruned with llm-streamline", "",
             f"- method: `{meta.get('method')}`, replacement: `{meta.get('replacement')}`"]
    if block:
        lines.append(f"- block removed: layers [{block.get('start')}, {block.get('end')}) of "
                     f"{block.get('original')} ({block.get('removed')} removed, {block.get('replacement_slots')} "
                     "replacement slot(s))")
    p = res.get("params") or {}
    if p:
        lines.append(f"- parameters: {p['dense']:,} dense -> {p['pruned']:,} pruned "
                     f"(sparsity {p['sparsity']:.2%})")
    lines.append(f"- parameters in this checkpoint: {params:,}"
                 + ("" if stock else " (this package's format: the slot has no stock class)"))
    ppl = res.get("perplexity") or {}
    if (ppl.get("dense") or {}).get("ppl") and (ppl.get("pruned") or {}).get("ppl"):
        lines.append(f"- perplexity (validation blocks): {ppl['dense']['ppl']:.3f} -> {ppl['pruned']['ppl']:.3f}")
    stab = ((res.get("stability") or {}).get("average") or {}).get("stability")
    if stab is not None:
        lines.append(f"- stability against the dense model: {stab:.4f}")
    table = _eval_table(res)
    if table:
        lines += ["", "## Evaluation (lm-eval; from results.json)", "", *table]
    lines += ["", "## Load", "", *_load_snippet(stock, gguf_file), "", "## Made with", "", "```bash"]
    original = _original_command(saved.run_dir)
    lines += ([original] if original else []) + [export_command, "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the command
def push(out: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="llm-streamline export")
    return repo_id


def log_artifact(cfg: ExportConfig, saved: SavedRun, out: Path, record: dict) -> None:
    """The export as a model artifact of the run that made it (same run id; see tracking.run_id)."""
    from llm_streamline.tracking import Tracker

    tracker = Tracker(cfg.wandb, saved.run_dir, config={}, name=f"export-{saved.run_dir.name}", job_type="export")
    try:
        tracker.artifact(out, name=f"model-{saved.run_dir.name}", kind="model", metadata=record)
    finally:
        tracker.finish()


def default_out(saved: SavedRun, fmt: str) -> Path:
    """<run>/export (or export-gguf); beside a bare model directory, never inside it."""
    name = "export" if fmt == "safetensors" else "export-gguf"
    if saved.model_dir == saved.run_dir:
        return saved.model_dir.with_name(f"{saved.model_dir.name}-{name}")
    return saved.run_dir / name


def check_new_out(out: Path, saved: SavedRun) -> None:
    """An export goes into a new (or empty) directory only: it never deletes or overwrites what is there (a
    run's records, another export, the user's files); the model directory it reads cannot hold it either."""
    if out.is_symlink() and not out.exists():
        raise ExportError(f"out={out} is a dangling symlink; give a new directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={out} is a file; give a new directory (nothing is overwritten)")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"out={out} is not empty; give a new directory (an export deletes or overwrites nothing)")
    model_dir = saved.model_dir.resolve()
    if out.resolve() == model_dir or model_dir in out.resolve().parents:
        raise ExportError(f"out={out} is inside the model directory {saved.model_dir}; give a directory outside it")


def export(cfg: ExportConfig, command: str = "") -> Path:
    saved = SavedRun.find(cfg.run)
    out = Path(cfg.out) if cfg.out else default_out(saved, cfg.format)
    check_new_out(out, saved)
    dtype = EXPORT_DTYPES[cfg.dtype]
    with stages.atomic_dir(out, new_only=True) as tmp:  # files 0644 under the usual umask
        if cfg.format == "gguf":
            model, stock = to_stock(saved, dtype)
            if not stock:
                raise ExportError(f"format=gguf needs a stock layout; {saved.model_dir} "
                                  f"({saved.meta.get('replacement')}) has none (export it as safetensors)")
            from llm_streamline.gguf_export import write_gguf

            gguf_file = write_gguf(model, saved.model_dir, tmp / f"{saved.run_dir.name}-{cfg.dtype}.gguf").name
            params = sum(p.numel() for p in model.parameters())
        else:
            (stock, params), gguf_file = _write_model(saved, tmp, dtype), None
        stages.write_text_atomic(tmp / "README.md", model_card(saved, stock, params, command, gguf_file))
    log.info("exported %s (%s, %s) to %s", saved.model_dir, "stock" if stock else "llm-streamline format",
             cfg.format, out)
    record = {"format": cfg.format, "stock": stock, "dtype": cfg.dtype, "params": params}
    if cfg.push_to_hub:
        log.info("pushed to the hub: %s", push(out, cfg.push_to_hub, cfg.hub_private))
    log_artifact(cfg, saved, out, record)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(parse_args(argv), command=shlex.join(["llm-streamline-export", *argv]))
    except (ExportError, GGUFExportError) as e:
        print(f"llm-streamline-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)
