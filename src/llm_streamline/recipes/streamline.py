"""One LLM-Streamline run, top to bottom like the paper's method section.

  1. load the model and seeded, disjoint calibration / train / validation token blocks
  2. layer pruning: score every contiguous block by cos(x^(l), x^(l+n)); pick l*; n given or from a target
  3. dense reference: lm-eval accuracy, per-sample log-likelihoods, perplexity (cached per model and suite)
  4. layer replacement: build the lightweight network and train it (MSE on teacher pairs, LM loss or
     distillation); `train=lora` instead heals the plainly pruned model with LoRA (the paper's comparison)
  5. prune: the block out, the trained network in its slot; the speed of both side by side, the dense model's
     last use: it is freed (the removed block with it) before LoRA healing and the pruned model's evaluation
  6. evaluate the pruned model: accuracy, stability against the dense model's rows, perplexity
  7. save the model, results.json, per-sample files, plots; log to W&B

Each expensive stage's output is stored under a key of the config that produced it (see `stages`), so a
killed run resumes after its last finished stage and a sweep computes shared stages once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llm_streamline import linear_map, stages
from llm_streamline.config import ConfigError, RunConfig, infer_batch_size, trained_with
from llm_streamline.importance import PPL_IMPORTANCE_BLOCKS, SimilarityProfile, block_perplexities, choose_block
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.checkpoints import save_checkpoint
from llm_streamline.models.layers import find_decoder_stack, remove_block, run_layers, share_weights
from llm_streamline.models.loading import source_dir
from llm_streamline.precision import compute_dtype
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
    load_weights_stage,
    main_rank_looks,
    results_record,
    save_model,
    save_weights_stage,
    shared_cached_json,
    similarity,
    start_run,
    train_identity,
    write_records,
)
from llm_streamline.replace import build_replacement, needs_anatomy, slot_checkpoint
from llm_streamline.train import (
    OnlineTeacher,
    choose_teacher,
    teacher_bytes,
    train_distill,
    train_lm,
    train_mse,
    write_teacher_shards,
)

log = logging.getLogger("llm_streamline")


def run(cfg: RunConfig, out_dir: Path) -> dict:
    check_before_loading(cfg, out_dir)
    ctx = start_run(cfg, out_dir)
    try:
        # 1. model and data
        with ctx.timings.stage("load_model"):
            load_dense_model(ctx)
            n = resolve_block_size(cfg, ctx.model, ctx.stack)
            size_target = equal_size_target(cfg.replacement, n, ctx.model)
        load_data(ctx)

        # 2. layer pruning: the similarity profile and the chosen block
        with ctx.timings.stage("importance"):
            profile = similarity(ctx)
            start, block_ppl = choose(ctx, profile, n)

        # 3. dense reference
        dense = evaluate_dense(ctx)

        # 4. layer replacement: build and train; 5. prune
        compressed = replace_block(ctx, start, n)
        # the dense model's last use (speed side by side), then it is freed, the removed block with it
        speed = dense_speed_then_release(ctx, compressed.model)
        if cfg.method.heal == "lora":  # train=lora: plain pruning healed with LoRA (the paper's comparison)
            compressed.model, compressed.train_log = heal(ctx, compressed.model,
                                                          stages.stage_key("lora", train=compressed.key))

        # 6. evaluate the pruned model
        compressed.model.eval()
        ev = evaluate_compressed(ctx, dense, compressed, speed)
        # 7. save (sharded weights: every rank gathers each tensor in turn, the main one writes) and record
        checkpoint = save_model(ctx, lambda dest: save_checkpoint(
            compressed.model, ctx.tok, dest, checkpoint_record(ctx, compressed),
            *slot_checkpoint(cfg.replacement, compressed.model, start), max_shard_size=cfg.save_shard_size,
            terms_from=source_dir(ctx.model_id))) if ctx.is_main or ctx.sharded else None
        if not ctx.is_main:  # a data-parallel rank: its share of the training and the evaluations is done
            return {"rank": ctx.accelerator.process_index, "layers": {"removed": [start, start + n]}}

        write_records(ctx, dense, ev)
        results = results_record(ctx, profile, block_ppl, size_target, dense, compressed, ev, checkpoint)
        draw_profile(ctx, profile, chosen=(start, n))
        return finish(ctx, results)
    finally:
        ctx.tracker.finish()


def choose(ctx: Run, profile: SimilarityProfile, n: int) -> tuple[int, list[float] | None]:
    """The first layer l* of the block to remove (`sparsity.start`, or the most redundant block by
    `sparsity.importance`), and the block perplexities when they chose it."""
    cfg, L = ctx.cfg, ctx.stack.num_layers
    block_ppl = None
    if cfg.sparsity.importance == "perplexity" and cfg.sparsity.start is None:
        key = stages.stage_key("block_ppl", model=ctx.model_id, data=ctx.calib_key, n=n)
        block_ppl, _ = shared_cached_json(ctx, key, lambda: block_perplexities(
            ctx.model, ctx.blocks.calib[:PPL_IMPORTANCE_BLOCKS], n, infer_batch_size(cfg), progress=ctx.is_main,
            accelerator=ctx.accelerator))
        start = min(range(len(block_ppl)), key=lambda i: block_ppl[i])
    else:
        # BI of a contiguous block is 1 - cos(x^l, x^(l+n)): it orders blocks as cosine does
        metric = cfg.sparsity.importance if cfg.sparsity.importance != "bi" else "cosine"
        start = cfg.sparsity.start if cfg.sparsity.start is not None else choose_block(profile, n, metric)
    if not 0 <= start <= L - n:
        raise ConfigError(f"sparsity.start={start}: a block of {n} layers must start in [0, {L - n}]")
    log.info("removing layers [%d, %d) of %d; mean cos(x^%d, x^%d) = %.4f", start, start + n, L,
             start, start + n, profile.mean_cos[n][start])
    return start, block_ppl


def replace_block(ctx: Run, start: int, n: int) -> Compressed:
    """The dense model with layers [start, start+n) replaced by the trained network (or only removed, `train=lora`:
    healed by the caller), as a second model over the dense one's weights (`share_weights`: one copy of the
    weights; the dense model, the removed block included, stays intact for the fit, the teacher, distillation and
    the speed comparison). Under torchrun every rank gets the pruned model: the ranks train, heal and evaluate it
    together."""
    cfg, model = ctx.cfg, ctx.model
    probe = run_layers(model, ctx.blocks.calib[:1], outputs_at=(start,), stack=ctx.stack)
    anatomy = anatomy_of(model, start, ctx.blocks.calib[:1]) if needs_anatomy(cfg.replacement) else None
    # sharded weights: the dense model itself, its block removed once the replacement is trained (the MSE's online
    # teacher and distillation's teacher read it until then); the slot is replicated,
    # built from the block's layers read whole from the checkpoint (a shard cannot be deep-copied)
    pruned = model if ctx.sharded else share_weights(model)
    pstack = find_decoder_stack(pruned)
    block_layers = list(pstack.layers[start:start + n])
    if ctx.sharded and cfg.replacement.type != "none":
        from llm_streamline.models.sharded import load_layers

        block_layers = load_layers(ctx.cfg.model, compute_dtype(model), ctx.accelerator.device,
                                   list(range(start, start + n)))
    # seeded here, not earlier: a cached or skipped stage before this point must not change the init
    torch.manual_seed(cfg.seed)
    slot = build_replacement(cfg.replacement, block_layers, pstack.config, probe.output_is_tuple, anatomy)
    train_log, block = None, None  # `block` is set once the block is out of `pruned`
    train_key = stages.stage_key("train", model=ctx.model_id, data=ctx.data_key, start=start, n=n,
                                 replacement=asdict(cfg.replacement), train=train_identity(trained_with(cfg)),
                                 seed=cfg.seed)
    # (the main rank's look under torchrun: the fit's sums over the ranks run on all or none)
    trained_before = trains_after_fit(cfg.replacement) and main_rank_looks(ctx, lambda: stages.sealed(
        stages.stage_dir(train_key), train_key, move_aside=False) or None)[0]
    fit_log = None if trained_before else fit_linear(ctx, pruned, slot, start, n)
    if fit_log is not None and not trains_after_fit(cfg.replacement):  # training-free: the fit is the result
        train_log, slot_trained = fit_log, False
    else:
        slot_trained = bool(slot)
    if slot_trained:
        # parallel jobs of a sweep train one block once (data-parallel ranks train it together: no lock)
        with stages.stage_lock(train_key) if ctx.accelerator is None else contextlib.nullcontext():
            train_log, block = load_or_train(ctx, slot, train_key, pruned, start, n)
        log.info("replacement %s: val loss %.5g -> %.5g (best at step %s)", cfg.replacement.type,
                 train_log["initial_val_loss"], train_log["best_val_loss"], train_log["best_step"])
        if fit_log is not None:
            train_log = {**train_log, **fit_log}
    if cfg.method.heal == "lora":  # train=lora: plain pruning, healed after the dense model's release
        block = remove_block(pruned, start, n, [])
    if block is None:
        block = remove_block(pruned, start, n, slot)
    return Compressed(pruned, train_key, start, list(range(start, start + n)), block.as_dict(), slot, train_log)


def trains_after_fit(r) -> bool:
    """Whether a replacement fitted by `linear_map` is trained afterwards (ffn / layer started from the linear
    fit, or a distilled LinearPatch) rather than used as fitted."""
    return r.type in ("ffn", "layer") or (r.type == "linear_patch" and r.finetune)


def fit_linear(ctx: Run, pruned, slot: list, start: int, n: int) -> dict | None:
    """The training-free fits (`linear_map`), on the calibration blocks, in place on `pruned` / `slot`: ReplaceMe's
    map fused into layer start-1 of `pruned`, LinearPatch's matrix into its slot, or the linear initialisation of
    an ffn / layer. None when the replacement has none. The fit log carries its wall time. Under torchrun the
    ranks share the calibration batches of the least-squares fits and of LinearPatch's scales."""
    r, model, bs, acc = ctx.cfg.replacement, ctx.model, infer_batch_size(ctx.cfg), ctx.accelerator
    calib = ctx.blocks.calib
    if not (r.type in ("linear", "linear_patch") or r.init == "linear"):
        return None
    t0 = time.perf_counter()
    with ctx.timings.stage("fit"):
        if r.type == "linear":
            t, fit_log = linear_map.replaceme_map(model, calib, start, n, r, bs, ctx.cfg.seed, acc)
            linear_map.fuse_into_mlp_output(pruned, start - 1, t)
        elif r.type == "linear_patch":
            p, fit_log = linear_map.linear_patch_matrix(model, calib, start, n, bs, acc)
            with torch.no_grad():
                slot[0].weight.copy_(p.to(slot[0].weight.dtype))
        elif r.type == "ffn":
            fit_log = linear_map.init_ffn_linear(slot[0], model, calib, start, n, bs, r.ridge, acc)
        else:
            fit_log = linear_map.init_layer_linear(slot[0], model, calib, start, n, bs, r.ridge, acc)
    fit_log = {"fit": fit_log, "fit_seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s fit on %d calibration blocks: %s", r.type, len(calib), fit_log)
    return fit_log


def _teacher_pairs(ctx: Run, start: int, n: int):
    """The MSE's targets, the block's (input, output) pairs: (the teacher chosen, train pairs, validation pairs),
    computed batch by batch while training (online) or written once as shards (cached)."""
    cfg, dense_model, blocks = ctx.cfg, ctx.model, ctx.blocks
    tkey = stages.stage_key("teacher", model=ctx.model_id, data=ctx.data_key, start=start, n=n,
                            batch=cfg.train.batch_size)
    tdir = stages.stage_dir(tkey)
    rows = blocks.train.shape[0] + blocks.val.shape[0]
    # online or cached (train.teacher), decided before anything is written; cached pairs that do not
    # fit the free disk are refused here in one line
    teacher = choose_teacher(cfg.train, teacher_bytes(dense_model, rows, blocks.train.shape[1]), tdir,
                             data_parallel=ctx.accelerator is not None)
    log.info("teacher pairs: %s (%s; %.2f GB on disk if cached, %.1f GB free)", teacher.mode, teacher.why,
             teacher.bytes / 1e9, teacher.free / 1e9)
    bs = cfg.train.batch_size
    if teacher.mode == "online":  # computed batch by batch while training: nothing written
        train_sh = OnlineTeacher(dense_model, blocks.train, start, n, bs)
        val_sh = OnlineTeacher(dense_model, blocks.val, start, n, bs)
    else:
        with stages.stage_lock(tkey):  # shared by the replacement types of one block
            # shards are training batches (train.batch_size); a forward pass may fill several
            fwd = infer_batch_size(cfg)
            train_sh = write_teacher_shards(dense_model, blocks.train, start, n, tdir / "train", bs,
                                            "teacher pairs (train)", forward_batch=fwd)
            val_sh = write_teacher_shards(dense_model, blocks.val, start, n, tdir / "val", bs,
                                          "teacher pairs (val)", forward_batch=fwd)
    return teacher, train_sh, val_sh


def load_or_train(ctx: Run, slot: list, train_key: str, pruned, start: int, n: int):
    """The trained replacement from the stage cache, or trained now and stored there (by the main rank under
    torchrun). Returns (train log, the block if training already removed it from `pruned`)."""
    cfg, timings, dense_model, blocks = ctx.cfg, ctx.timings, ctx.model, ctx.blocks
    ckpt = stages.stage_dir(train_key)
    # a damaged entry is moved aside and trained again; under torchrun the main rank's look decides for all and
    # sends the weights (`main_rank_looks`): all train together, or all load the same
    _, cached = main_rank_looks(ctx, lambda: load_weights_stage(ckpt, "slot.safetensors"))
    if cached is not None:
        state, train_log = cached
        for j, m in enumerate(slot):
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{j}.")})
        log.info("trained replacement reused from %s", ckpt)
        return train_log, None

    def on_step(step, metrics):
        ctx.tracker.log(metrics, step=step)

    block = None
    if cfg.train.loss == "mse":
        with timings.stage("teacher_pairs"):
            teacher, train_sh, val_sh = _teacher_pairs(ctx, start, n)
        with timings.stage("train"):
            tl = train_mse(dense_model, slot, start, blocks.train, train_sh, val_sh, cfg.train, cfg.seed,
                           on_step=on_step, accelerator=ctx.accelerator)
    elif cfg.train.loss == "distill":  # the dense model is the teacher, batch by batch
        with timings.stage("train"):
            # sharded weights: `pruned` is the dense model, the slot put in for the student's forwards only; the
            # block comes out once trained (replace_block)
            block = None if pruned is dense_model else remove_block(pruned, start, n, slot)
            tl = train_distill(dense_model, pruned, slot, start, n, blocks.train, blocks.val, cfg.train, cfg.seed,
                               on_step=on_step, accelerator=ctx.accelerator)
    else:
        with timings.stage("train"):
            block = remove_block(pruned, start, n, slot)
            tl = train_lm(pruned, slot, blocks.train, blocks.val, cfg.train, cfg.seed, on_step=on_step,
                          accelerator=ctx.accelerator)
    train_log = tl.as_dict()
    if cfg.train.loss == "mse":
        train_log["teacher"] = teacher.as_dict()
    weights = {f"{j}.{k}": v.detach().contiguous().cpu() for j, m in enumerate(slot) for k, v in m.state_dict().items()}
    leave_rank_record(ctx, "slot", {"start": start, "n": n, "train": train_log}, weights)
    if ctx.is_main:
        save_weights_stage(ckpt, "slot.safetensors", weights, train_log)
    return train_log, block
