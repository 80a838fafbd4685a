"""mode=eval (`llm-streamline-eval`): any saved model (dense, pruned, a baseline's) on the same suites, with the
same record (`record`, kind "eval"), summary, perplexity, speed and W&B summary keys as a main run. Under torchrun
each rank holds the model on its own card and scores its share of the items and of the perplexity's batches; the
first rank measures the speed and writes the records."""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

from llm_streamline import __version__, faults, preflight, record, report, stages
from llm_streamline.config import RunConfig, infer_batch_size
from llm_streamline.evaluate.harness import run_lm_eval, save_samples_jsonl, write_lm_eval_files
from llm_streamline.evaluate.tasks import check_fewshot, check_tasks, task_dir_line
from llm_streamline.models.checkpoints import load_pruned, load_tokenizer
from llm_streamline.models.layers import count_params
from llm_streamline.models.loading import load_model
from llm_streamline.precision import torch_dtype
from llm_streamline.recipes.common import Timings, data_parallel_accelerator, eval_meta, log_record, peak_memory
from llm_streamline.tracking import Tracker, run_name

log = logging.getLogger("llm_streamline")


def run(cfg: RunConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    preflight.check_device(cfg.model)
    check_tasks(list(cfg.eval.tasks), cfg.eval.offline, cfg.eval.include_path)
    check_fewshot(dict(cfg.eval.num_fewshot), list(cfg.eval.tasks))
    log.info(task_dir_line(cfg.eval.offline)[1])
    stages.check_writable(out_dir, "the output directory")
    timings = Timings()
    acc = data_parallel_accelerator(cfg)  # None in one process
    model, tok, name = _load(cfg, acc, timings)
    with timings.stage("eval"):
        res = run_lm_eval(model, tok, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size,
                          offline=cfg.eval.offline, scorer=cfg.eval.scorer, task_limits=dict(cfg.eval.task_limits),
                          num_fewshot=dict(cfg.eval.num_fewshot), include_path=cfg.eval.include_path,
                          accelerator=acc)
    if res is not None:  # the first rank (or one process): every item
        faults.check_loglikelihoods(res.samples, "eval", model, None)
    ppl, ppl_text = _perplexity(cfg, model, tok, acc, timings)
    if res is None:  # another data-parallel rank: its share is scored, the first rank records
        return {"rank": acc.process_index}
    speed = None
    if cfg.eval.speed:
        with timings.stage("speed"):
            speed = {"model": _speed(model, cfg.eval.speed_tokens)}
    save_samples_jsonl(res.samples, out_dir / "samples.jsonl")
    write_lm_eval_files(res.lm_eval, out_dir / "lm_eval", Path(name).name)
    results = _results(cfg, model, name, res, (ppl, ppl_text), speed, timings)
    rec = record.write(out_dir / "results.json", results)
    tracker = Tracker(cfg.wandb, out_dir, config=asdict(cfg), job_type="eval", name=run_name(cfg),
                      tags=[f"checkpoint={Path(name).name}"[:64], f"eval={cfg.eval.name}", f"seed={cfg.seed}"])
    try:
        log_record(tracker, rec, cfg.objective)
    finally:
        tracker.finish()
    log.info("results: %s", out_dir / "results.json")
    log.info("summary\n%s", report.summary(rec))
    return results


def _load(cfg: RunConfig, acc, timings: Timings):
    """(model, tokenizer, the name it is recorded under): the checkpoint if one is given, else the model preset."""
    m = cfg.model
    if acc is not None and m.device != "cpu":  # each data-parallel rank on its own card
        m = replace(m, device=str(acc.device))
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such directory")
        with timings.stage("load_model"):
            # the model preset's dtype and placement apply to a checkpoint too
            model = load_pruned(cfg.checkpoint, dtype=torch_dtype(m.dtype, m.device), device=m.device,
                                device_map=m.device_map)
            tok = load_tokenizer(cfg.checkpoint)
        return model, tok, cfg.checkpoint
    with timings.stage("load_model"):
        model, tok = load_model(m, seed=cfg.seed)
    return model, tok, cfg.model.name


def _perplexity(cfg: RunConfig, model, tok, acc, timings: Timings) -> tuple[float | None, str | None]:
    """(perplexity, the text it is on), or (None, None) without eval.perplexity."""
    if not cfg.eval.perplexity:
        return None, None
    from llm_streamline.data import perplexity_text
    from llm_streamline.evaluate.perplexity import perplexity

    with timings.stage("perplexity"):
        text = perplexity_text(cfg.eval.perplexity_text, tok, cfg.eval.perplexity_seq_len or cfg.data.seq_len,
                               cfg.eval.perplexity_blocks, cfg.data.name)
        return perplexity(model, text.blocks, infer_batch_size(cfg), "perplexity", accelerator=acc), text.describe()


def _results(cfg: RunConfig, model, name: str, res, perplexity: tuple, speed: dict | None, timings: Timings) -> dict:
    """The eval command's results.json (`record.SCHEMA`, kind eval)."""
    ppl, ppl_text = perplexity
    first = next(model.parameters())
    dense_like = {"versions": res.versions, "n_samples": res.n_samples, "groups": res.groups}
    return {"schema": record.SCHEMA, "kind": "eval", "version": __version__, "seed": cfg.seed,
            "model": {"name": name, "dtype": str(first.dtype).removeprefix("torch."),
                      "device": str(first.device), "device_map": cfg.model.device_map},
            "method": "eval", "checkpoint": cfg.checkpoint,
            "eval": {t: {"model": m} for t, m in res.metrics.items()},
            "eval_meta": eval_meta(cfg, dense_like),
            "eval_settings": {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit,
                              "batch_size": cfg.eval.batch_size, "scorer": cfg.eval.scorer},
            # the intervals a run records for its dense model (same bootstrap, same seed)
            "intervals": {"tasks": record.task_intervals(res.samples, res.groups),
                          "average": {record.PAPER: record.paper_average(res.samples, groups=res.groups)}},
            "perplexity": {"model": ppl, "text": ppl_text},
            "speed": speed,
            "params": {"total": count_params(model)}, "timings": dict(timings), "peak_memory": peak_memory(timings)}


def _speed(model, seq: int) -> dict:
    """Prefill and decode tokens/s (median of 3 rounds) and FLOPs per token of the one model evaluated."""
    from llm_streamline.evaluate.speed import flops_per_token, measure_throughput

    rounds = [measure_throughput(model, batch_size=1, prompt_len=seq, decode_tokens=32, repeats=1) for _ in range(3)]
    out = {k: statistics.median(r[k] for r in rounds) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return {**out, "flops_per_token": flops_per_token(model, seq), "threads": torch.get_num_threads()}
