"""mode=eval: any saved model (dense, pruned, a baseline's) on the same suites, logged as a W&B "eval" job."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from llm_streamline import faults, preflight, stages
from llm_streamline.config import RunConfig
from llm_streamline.evaluate.harness import run_lm_eval, save_samples_jsonl, write_lm_eval_files
from llm_streamline.evaluate.tasks import check_tasks
from llm_streamline.models.checkpoints import load_pruned, load_tokenizer
from llm_streamline.models.layers import count_params
from llm_streamline.models.loading import DTYPES, load_model
from llm_streamline.recipes.common import Timings, peak_memory
from llm_streamline.tracking import Tracker, sweep_objective


def run(cfg: RunConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    preflight.check_device(cfg.model)
    check_tasks(list(cfg.eval.tasks), cfg.eval.offline)
    stages.check_writable(out_dir, "the output directory")
    timings = Timings()
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such directory")
        with timings.stage("load_model"):
            m = cfg.model  # the model preset's dtype and placement apply to a checkpoint too
            model = load_pruned(cfg.checkpoint, dtype=DTYPES[m.dtype], device=m.device, device_map=m.device_map)
            tok = load_tokenizer(cfg.checkpoint)
        name = cfg.checkpoint
    else:
        with timings.stage("load_model"):
            model, tok = load_model(cfg.model, seed=cfg.seed)
        name = cfg.model.name
    with timings.stage("eval"):
        res = run_lm_eval(model, tok, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size,
                          offline=cfg.eval.offline, scorer=cfg.eval.scorer, task_limits=dict(cfg.eval.task_limits))
    faults.check_loglikelihoods(res.samples, "eval", model, None)
    save_samples_jsonl(res.samples, out_dir / "samples.jsonl")
    write_lm_eval_files(res.lm_eval, out_dir / "lm_eval", Path(name).name)
    first = next(model.parameters())
    results = {"model": {"name": name, "dtype": str(first.dtype).removeprefix("torch."),
                         "device": str(first.device), "device_map": cfg.model.device_map},
               "method": "eval", "eval": res.metrics,
               "eval_settings": {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit,
                                 "batch_size": cfg.eval.batch_size, "scorer": cfg.eval.scorer},
               "params": {"total": count_params(model)}, "timings": dict(timings), "peak_memory": peak_memory()}
    stages.write_json_atomic(out_dir / "results.json", results)
    _log_eval(cfg, out_dir, name, results)
    return results


def _log_eval(cfg: RunConfig, out_dir: Path, name: str, results: dict) -> None:
    """Per-task metrics as a table and in the summary, job_type "eval"."""
    tracker = Tracker(cfg.wandb, out_dir, config=asdict(cfg), job_type="eval", name=f"eval-{Path(name).name}",
                      tags=[f"checkpoint={Path(name).name}"[:64], f"seed={cfg.seed}"])
    try:
        metrics = ("acc", "acc_norm")
        tracker.table("eval/per_task", ["task", *metrics],
                      [[task, *(row.get(k) for k in metrics)] for task, row in results["eval"].items()])
        tracker.summary({**{f"eval/{task}/{k}": row[k] for task, row in results["eval"].items()
                            for k in metrics if k in row},
                         "params/total": results["params"]["total"],
                         f"objective/{cfg.objective}": sweep_objective(results, cfg.objective)})
    finally:
        tracker.finish()
