"""A baseline in the same harness as LLM-Streamline: compress -> speed, dense model freed -> optional LoRA healing
-> evaluate -> record.

Same model, data, similarity profile, evaluation, records and saving as the streamline recipe; the size is
that of the LLM-Streamline row with `method.match_replacement` (null: plain removal of n layers). Baselines
put no network in place of what they remove (`replacement` is recorded as none); with `replacement=linear`, a
layer-removal baseline gets ReplaceMe's map fused after each removed run of layers (no parameter added).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from llm_streamline import linear_map, stages
from llm_streamline.baselines import BaselineResult, apply_method
from llm_streamline.config import (
    LEGACY_METHOD_KEY,
    LLMPrunerConfig,
    MethodConfig,
    ReplacementConfig,
    RunConfig,
    infer_batch_size,
)
from llm_streamline.importance import SimilarityProfile
from llm_streamline.models.checkpoints import save_checkpoint
from llm_streamline.models.layers import share_weights
from llm_streamline.models.loading import source_dir
from llm_streamline.preflight import resolve_block_size
from llm_streamline.recipes.common import (
    Compressed,
    Run,
    check_before_loading,
    checkpoint_record,
    dense_speed_then_release,
    draw_profile,
    equal_size_target,
    evaluate_compressed,
    evaluate_dense,
    finish,
    heal,
    leave_rank_record,
    load_data,
    load_dense_model,
    main_rank_looks,
    results_record,
    save_model,
    similarity,
    start_run,
    train_identity,
    write_records,
)

log = logging.getLogger("llm_streamline")
LAYER_CHOOSERS = ("shortgpt", "gromov", "sleb")  # baselines whose choice of layers is cached on its own


def run(cfg: RunConfig, out_dir: Path) -> dict:
    check_before_loading(cfg, out_dir)
    size_replacement = ReplacementConfig(type=cfg.method.match_replacement or "none")
    # replacement=linear: ReplaceMe's map for every removed run of layers, fused (no parameter added); any
    # other replacement is not a baseline's and is recorded as none
    linear = cfg.replacement if cfg.replacement.type == "linear" else None
    cfg = replace(cfg, replacement=ReplacementConfig(type="none"))
    ctx = start_run(cfg, out_dir)
    try:
        with ctx.timings.stage("load_model"):
            load_dense_model(ctx)
            n = resolve_block_size(replace(cfg, replacement=size_replacement), ctx.model, ctx.stack)
            size_target = equal_size_target(size_replacement, n, ctx.model)
        load_data(ctx)
        with ctx.timings.stage("importance"):
            profile = similarity(ctx)
        dense = evaluate_dense(ctx)

        with ctx.timings.stage("compress"):
            compressed, bres = compress(ctx, profile, n, size_target["target_net_removed"])
        if linear is not None:
            fuse_linear_maps(ctx, compressed, linear)
        # the dense model's last use (speed side by side), then it is freed: what only it held (removed layers,
        # replaced matrices) goes, and LoRA merges in place
        speed = dense_speed_then_release(ctx, compressed.model)
        if cfg.method.heal == "lora":
            compressed.model, compressed.train_log = heal(ctx, compressed.model,
                                                          stages.stage_key("lora", baseline=compressed.key))
        compressed.model.eval()
        ev = evaluate_compressed(ctx, dense, compressed, speed)
        # sharded weights: every rank gathers each tensor in turn, the main one writes
        checkpoint = save_model(ctx, lambda dest: save(ctx, compressed, bres, dest)) \
            if ctx.is_main or ctx.sharded else None
        if not ctx.is_main:  # a data-parallel rank: its share of the search, the healing and the evaluations is done
            return {"rank": ctx.accelerator.process_index, "removed": compressed.removed}

        write_records(ctx, dense, ev)
        results = results_record(ctx, profile, None, size_target, dense, compressed, ev, checkpoint)
        draw_profile(ctx, profile, chosen=[(i, 1) for i in compressed.removed])
        return finish(ctx, results)
    finally:
        ctx.tracker.finish()


def method_key(method: MethodConfig) -> dict:
    """The method options a baseline's stage key holds: its own, over every option the single method schema had
    (`config.LEGACY_METHOD_KEY`), so stage entries cached before each method had its own schema stay valid.
    attention_unit (added with per-head LLM-Pruner) is left out where it changes nothing (other methods) and at
    kv-group, what llm_pruner did before it existed."""
    key = {**LEGACY_METHOD_KEY, **asdict(method)}
    if not isinstance(method, LLMPrunerConfig) or method.attention_unit == "kv-group":
        del key["attention_unit"]
    return key


def compress(ctx: Run, profile: SimilarityProfile, n: int, target_removed: int) -> tuple[Compressed, BaselineResult]:
    """The baseline method on a second model over the dense one's weights (`share_weights`: one copy of the
    weights; a baseline replaces what it changes and never writes into a shared tensor, see `baselines`)."""
    cfg = ctx.cfg
    healing = train_identity(cfg.train) if cfg.method.heal == "lora" else None  # healing uses train.*
    key = stages.stage_key("baseline", model=ctx.model_id, data=ctx.data_key, method=method_key(cfg.method),
                           sparsity=asdict(cfg.sparsity), n=n, seed=cfg.seed, train=healing)
    # which layers a layer-removal baseline drops (SLEB: a long greedy search) does not depend on healing
    choice_key = stages.stage_key("choice", model=ctx.model_id, data=ctx.data_key, n=n, seed=cfg.seed,
                                  method=cfg.method.name)
    choice_path = stages.stage_dir(choice_key).with_suffix(".json")
    chooser = cfg.method.name in LAYER_CHOOSERS
    # the main rank's look decides for all: search together, or remove its layers
    _, chosen = main_rank_looks(ctx, lambda: stages.read_sealed_json(choice_path, choice_key) if chooser else None)
    torch.manual_seed(cfg.seed)
    # sharded weights: the dense model itself (a shard cannot be shared by a copy; nothing reads the dense model
    # after this: check_sharded refuses the speed comparison)
    model = ctx.model if ctx.sharded else share_weights(ctx.model)
    bres = apply_method(cfg, model, ctx.blocks.calib, profile, n, chosen=chosen,
                        target_removed=target_removed, accelerator=ctx.accelerator)
    if chooser and chosen is None and ctx.is_main:
        stages.write_sealed_json(choice_path, choice_key, bres.record)
    leave_rank_record(ctx, "choice", {"removed": bres.removed_layers, "record": bres.record})
    log.info("%s: removed layers %s %s", cfg.method.name, bres.removed_layers, bres.record)
    removed = bres.removed_layers
    start = min(removed) if removed else 0
    end = max(removed) + 1 if removed else 0
    L = ctx.stack.num_layers
    # the span from the first to the last removed layer (for a model saved by a baseline, as for a block)
    block = {"start": start, "end": end, "removed": end - start, "original": L, "replacement_slots": 0,
             "kept": L - (end - start)}
    return Compressed(bres.model.eval(), key, start, removed, block, baseline=bres.record), bres


def fuse_linear_maps(ctx: Run, c: Compressed, r: ReplacementConfig) -> None:
    """In place on `c`: for every maximal run [s, e) of removed layers, ReplaceMe's map (`linear_map`), estimated
    on the dense model's calibration activations, fused into the MLP output map of layer s-1 (at its index in the
    compressed model). The evaluation key and the record name the maps."""
    removed = sorted(c.removed)
    runs: list[list[int]] = []
    for i in removed:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    fits = []
    t0 = time.perf_counter()
    with ctx.timings.stage("fit"):
        maps = linear_map.replaceme_maps(ctx.model, ctx.blocks.calib, [(s, e - s) for s, e in runs], r,
                                         infer_batch_size(ctx.cfg), ctx.cfg.seed, ctx.accelerator)
        for (start, end), (t, fit) in zip(runs, maps):
            linear_map.fuse_into_mlp_output(c.model, start - 1 - sum(i < start - 1 for i in removed), t)
            fits.append({"block": [start, end], **fit})
    c.key = stages.stage_key("baseline_linear", baseline=c.key, linear=asdict(r))
    c.baseline = {**(c.baseline or {}), "label": f"{ctx.cfg.method.name} + ReplaceMe({r.objective})",
                  "linear_maps": fits, "fit_seconds": round(time.perf_counter() - t0, 2)}
    log.info("ReplaceMe maps fused after %d removed runs: %s", len(runs), fits)


def save(ctx: Run, c: Compressed, bres: BaselineResult, dest: Path) -> str:
    """In the format the baseline names (stock unless, e.g., per-layer widths need its own); a format of its
    own also keeps the baseline's record."""
    fmt, fields = bres.checkpoint
    record = checkpoint_record(ctx, c)
    return save_checkpoint(c.model, ctx.tok, dest, record if fmt == "stock" else {**record, **bres.record}, fmt, fields,
                           max_shard_size=ctx.cfg.save_shard_size, terms_from=source_dir(ctx.model_id))
