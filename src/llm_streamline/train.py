"""Training: one loop and one bookkeeping for every way this project trains (`fit`).

loss=mse  hidden-state regression f(x^(l*)) ~ x^(l*+n). Teacher pairs are produced once, batch by batch,
          running only layers 0..l*+n-1 of the dense model, and written to disk shards; training streams the
          shards back, so memory does not grow with the number of training tokens (the authors' code holds
          every pair in RAM). The replacement is called with the keyword arguments the model's own forward
          passes to layer l* (causal mask, rotary embeddings, position ids, layer type), captured per batch
          by a pre-hook: the same arguments it receives at inference.
          `mse_target=relative`: per-token ||f(x) - y||^2 / ||y||^2, so that the few tokens with massive
          activations (not only position 0) do not dominate training and selection.
loss=lm   next-token cross-entropy through the frozen pruned model; only the replacement is trainable.
          The frozen prefix needs no autograd graph (nothing in it requires grad), so the backward pass
          only runs from the slot onwards.
loss=distill  KL(dense next-token distribution || pruned) through the frozen pruned model, at
          `distill_temperature`, plus `distill_alpha` x the hidden-state MSE at the slot's output; the
          dense model's final hidden states are computed per batch (no stored vocabulary-sized tensors).
loss=lora LoRA healing of a pruned model (peft): adapters (rank, alpha; dropout 0, no bias) on every nn.Linear
          inside the decoder layers (attention and MLP projections, found from the model, no family names);
          embeddings, norms and the LM head stay frozen; next-token LM loss; validated once per epoch; the
          adapters kept are merged (`merge_and_unload`), so the model stays its own class and saves as a stock
          checkpoint.
LM and KD losses run the LM head in chunks of positions (`losses`).
All: AdamW at `lr` with `weight_decay`, linear warmup over `warmup_ratio` of the steps then cosine to `min_lr`
(transformers' scheduler), gradient clipping at `grad_clip`, `epochs` passes capped by `max_steps` optimizer steps
of `grad_accum` micro-batches each (the effective batch: batch_size x grad_accum; lm, distill and lora can
recompute the frozen layers' activations in the backward, `grad_checkpointing`), a
validation loss before training and `evals_per_epoch` times per epoch; `select=best` keeps the weights with
the lowest validation loss (by copy; the initial ones if training never helped), `select=final` the last ones
(as the paper does); seeded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from llm_streamline import faults, stages
from llm_streamline.config import ConfigError, TrainConfig
from llm_streamline.losses import final_hidden, head_of, kl_sum, lm_loss
from llm_streamline.models.devices import input_device, is_sharded, module_device, to_device
from llm_streamline.models.layers import find_decoder_stack, layer_view, run_layers
from llm_streamline.parallel import ranks, shares, sum_over_ranks
from llm_streamline.precision import MasterWeights, autocast, compute_dtype


class NonFiniteLossError(faults.NumericalFault):
    """A training or validation loss that is NaN/inf: the run stops at that step, naming the cause."""


# ---------------------------------------------------------------------------------------------- teacher pairs
# Where x^(l*), x^(l*+n) come from (train.teacher): `online` runs the frozen dense model's layers 0..l*+n-1 per
# batch while training (no grad, no disk, the prefix recomputed every epoch); `cached` writes them once to disk
# shards and streams them back each epoch. Both cut the token blocks into the same batches (`teacher_batches`),
# so with the same seed they train the same replacement (a test checks it to 1e-5 in fp32).
TEACHER_HASH_SAMPLE = 2        # shards rehashed on each reuse of a cached entry (all sizes checked: see below)
TEACHER_DISK_FRACTION = 0.5    # auto's disk budget when train.teacher_disk_gb is null: this share of the free space


def teacher_batches(rows: int, batch_size: int) -> list[list[int]]:
    """The token blocks' rows cut into consecutive batches: one shard (cached) or one forward (online) each."""
    return [list(range(i, min(i + batch_size, rows))) for i in range(0, rows, batch_size)]


def teacher_bytes(model: PreTrainedModel, rows: int, seq_len: int) -> int:
    """Disk size of the pairs of `rows` blocks: rows x seq_len x hidden x bytes per element x 2 (in and out)."""
    hidden = find_decoder_stack(model).config.hidden_size
    return 2 * rows * seq_len * hidden * torch.empty(0, dtype=compute_dtype(model)).element_size()


@dataclass
class TeacherShards:
    """Disk shards of (x_in, x_out) pairs; shard i holds the rows `index[i]` of the token blocks."""
    directory: Path
    files: list[str]
    index: list[list[int]]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        t = load_file(str(self.directory / self.files[i]))
        return t["x_in"], t["x_out"], self.index[i]


class OnlineTeacher:
    """The pairs of batch i computed when asked, from the frozen dense model: layers 0..start+n-1 only (the
    forward stops after the block's last layer), without autograd, nothing written. Same interface as
    `TeacherShards`. The dense model's block must stay in place while training reads it: the recipe trains
    the replacement before it removes the block (a check below names the fault instead of a wrong target)."""

    def __init__(self, model: PreTrainedModel, blocks: torch.Tensor, start: int, n: int, batch_size: int):
        self.model, self.blocks, self.start, self.n = model, blocks, start, n
        self.layers = list(find_decoder_stack(model).layers[start:start + n])
        self.index = teacher_batches(blocks.shape[0], batch_size)
        self.device = input_device(model)  # the first layer's card under device_map

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        return self.pairs(self.index[i])

    def pairs(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        stack = find_decoder_stack(self.model)  # afresh: surgery may have swapped the layer list
        layers = stack.layers
        if any(j >= len(layers) or layers[j] is not m for j, m in enumerate(self.layers, self.start)):
            raise RuntimeError(f"online teacher: the dense model's layers [{self.start}, {self.start + self.n}) "
                               "were removed or replaced while the replacement trains on them")
        cap = run_layers(self.model, self.blocks[rows].to(self.device), inputs_at=(self.start,),
                         outputs_at=(self.start + self.n - 1,), stack=stack)  # grad=False: no graph
        return cap.inputs[self.start], cap.outputs[self.start + self.n - 1], rows


def write_teacher_shards(model: PreTrainedModel, blocks: torch.Tensor, start: int, n: int, directory: Path,
                         batch_size: int, desc: str = "teacher pairs",
                         forward_batch: int | None = None) -> TeacherShards:
    """Run layers 0..start+n-1 only (no LM head) and write x^(start), x^(start+n) per batch to `directory`.

    Written into a temporary directory renamed into place at the end: a killed run leaves nothing that a
    rerun would trust. Reuse checks the manifest, every shard's size and TEACHER_HASH_SAMPLE shards' sha256
    (drawn afresh each time): rehashing every shard would read the whole entry (a terabyte for the paper's
    data) on every reuse, while a truncated or missing shard, the usual damage, shows in its size.
    A shard is one training batch (`batch_size` rows, as the online teacher's); one forward pass computes as
    many whole shards as fit in `forward_batch` rows (`model.infer_batch_size`; at least one).
    """
    directory = Path(directory)
    key = f"{directory.parent.name}/{directory.name}"  # the manifest's key: <teacher stage key>/<split>
    if stages.sealed(directory, key, hash_sample=TEACHER_HASH_SAMPLE):  # a damaged entry is moved aside
        meta = json.loads((directory / "index.json").read_text())
        return TeacherShards(directory, meta["files"], meta["index"])
    source = OnlineTeacher(model, blocks, start, n, batch_size)
    files = []
    with stages.atomic_dir(directory) as tmp:  # a full disk or an interrupt leaves nothing behind
        per_forward = max(1, (forward_batch or batch_size) // batch_size)
        for g in tqdm(range(0, len(source), per_forward), desc=desc, unit="forward"):
            group = source.index[g:g + per_forward]
            x_in, x_out, _ = source.pairs([r for rows in group for r in rows])
            sizes = [len(rows) for rows in group]
            for b, xi, xo in zip(range(g, g + len(group)), x_in.split(sizes), x_out.split(sizes)):
                name = f"shard-{b:05d}.safetensors"
                save_file({"x_in": xi.contiguous().cpu(), "x_out": xo.contiguous().cpu()}, str(tmp / name))
                files.append(name)
        (tmp / "index.json").write_text(json.dumps({"files": files, "index": source.index}))
        stages.seal(tmp, key)  # written last: the marker
    return TeacherShards(directory, files, source.index)


class TeacherSpaceError(ConfigError):
    """The cached teacher pairs would not fit on the disk: refused before the stage starts."""


@dataclass
class TeacherChoice:
    """How a run gets its teacher pairs, and why (recorded in results.json under train.teacher)."""
    mode: str              # online | cached
    requested: str         # online | cached | auto
    bytes: int             # the pairs' size on disk (train + validation)
    free: int              # free bytes where the stage cache lives
    why: str

    def as_dict(self) -> dict:
        """The record: no free-space figure, so that identical runs keep identical records (it is logged)."""
        return {"mode": self.mode, "requested": self.requested, "bytes": self.bytes, "why": self.why}


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (a stage entry's directory is made only when written)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def teacher_mode(cfg: TrainConfig, need: int, free: int, present: bool = False,
                 data_parallel: bool = False) -> tuple[str, str]:
    """(online | cached, why) for pairs of `need` bytes with `free` bytes free, per `cfg.teacher` (the plan prices
    a run with the same rule). auto: online under torchrun (`data_parallel`: each rank computes its own batches'
    pairs; cached shards are one process's); else cached if they are on disk already (`present`), or fit the
    budget (`teacher_disk_gb`, else half the free space) and are read more than once (epochs > 1); else online."""
    if cfg.teacher != "auto":
        return cfg.teacher, "asked"
    if data_parallel:
        return "online", "data-parallel: each process computes its own batches' pairs"
    if present:
        return "cached", "on disk already"
    if cfg.epochs <= 1:
        return "online", "read once (epochs=1): writing them saves nothing"
    budget = int(cfg.teacher_disk_gb * 1e9) if cfg.teacher_disk_gb is not None else int(TEACHER_DISK_FRACTION * free)
    named = "train.teacher_disk_gb" if cfg.teacher_disk_gb is not None else "half the free space"
    if need > min(budget, free):
        return "online", f"over the disk budget ({named})"
    return "cached", f"within the disk budget ({named}), read {cfg.epochs} times"


def choose_teacher(cfg: TrainConfig, need: int, directory: Path, data_parallel: bool = False) -> TeacherChoice:
    """`teacher_mode` for cached shards in `directory` (train/ and val/ under it) on this machine's disk. Cached
    pairs that do not fit the free space are refused here, in one line, before anything is written
    (`train.teacher_space_check=false` overrides)."""
    free = shutil.disk_usage(_existing(directory)).free
    present = all((Path(directory) / split / "index.json").exists() for split in ("train", "val"))
    mode, why = teacher_mode(cfg, need, free, present, data_parallel)
    if mode == "cached" and not present and cfg.teacher_space_check and need > free:
        gib = 2**30
        raise TeacherSpaceError(
            f"train.teacher=cached needs {need} bytes ({need / gib:.1f} GiB) for the teacher pairs, {free} "
            f"bytes ({free / gib:.1f} GiB) free under {_existing(directory)}: use train.teacher=online, free "
            "space, or train.teacher_space_check=false")
    return TeacherChoice(mode, cfg.teacher, need, free, why)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainLog:
    steps: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)   # (step, loss)
    val_loss: list[tuple[int, float]] = field(default_factory=list)     # (step, loss)
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    selected_step: int | None = None  # whose weights were kept: best_step (select=best) or the last step
    tokens: int = 0
    trainable_params: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "trainable_params": self.trainable_params,
                "initial_val_loss": self.initial_val_loss, "best_val_loss": self.best_val_loss,
                "best_step": self.best_step, "selected_step": self.selected_step,
                # (step, loss) pairs as lists: equal to what JSON reads back
                "train_loss": [list(p) for p in self.train_loss], "val_loss": [list(p) for p in self.val_loss]}


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]   # on the device; checked for NaN/inf when the loss is not finite
    rows: int                          # sequences: the weight of the batch's loss in the validation mean
    tokens: int                        # tokens trained on (all data-parallel ranks)
    index: list[int] = field(default_factory=list)  # the rows' indices in the token blocks (teacher pairs)


@dataclass
class Job:
    """One training run, whatever its loss: what trains, the batches of an epoch and the loss of a batch."""
    stage: str                                 # mse | lm | distill | lora: in progress bars and errors
    trains: str                                # what trains, for error messages ("the replacement")
    modules: list[nn.Module]                   # put in train mode for each step; their weights are selected
    params: list[nn.Parameter]
    steps_per_epoch: int
    order: Callable[[torch.Generator], list]   # one epoch's batches (keys for `load`), in a seeded order
    load: Callable[[Any], Batch]
    val_batches: Callable[[], Iterable[Batch]]
    loss: Callable[[Batch], torch.Tensor]
    evaluated: list[nn.Module]                 # put in eval mode for validation
    keep: Callable[[], Any] | None = None      # the weights selection keeps (default: the modules' state dicts)
    restore: Callable[[Any], None] | None = None
    compute_dtype: torch.dtype = torch.float32  # the run's dtype: bf16/fp16 train mixed (`precision`)
    # data parallel: each rank validates its share of the batches (`val_batches`) and this sums the float64
    # (loss x rows, rows) over the ranks, so all get the same validation loss (`sum_over_ranks`)
    val_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def amp(self):
        """Autocast to the run's dtype around a loss (forward and, through autograd, backward)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        return autocast(device, self.compute_dtype)

    def kept(self) -> Any:
        return self.keep() if self.keep else [copy.deepcopy(m.state_dict()) for m in self.modules]

    def put_back(self, state: Any) -> None:
        if self.restore:
            self.restore(state)
        else:
            for m, s in zip(self.modules, state):
                m.load_state_dict(s)

    @torch.no_grad()
    def validate(self) -> float:
        """The training loss averaged over the validation batches (weighted by their sequences)."""
        for m in self.evaluated:
            m.eval()
        tot, cnt = 0.0, 0
        for b in self.val_batches():
            with self.amp():
                loss = self.loss(b)
            tot += loss.item() * b.rows
            cnt += b.rows
        if self.val_reduce is not None:
            tot, cnt = self.val_reduce(torch.tensor([tot, cnt], dtype=torch.float64)).tolist()
        return tot / max(cnt, 1)


def _optimizer(params, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, max(total_steps, 1), min_lr=cfg.min_lr)
    return opt, sched


def _check_finite(loss: torch.Tensor, stage: str, step: int, modules: list[nn.Module], trains: str,
                  batch: tuple[torch.Tensor, ...] = ()) -> None:
    if torch.isfinite(loss):
        return
    bad_weights = faults.nonfinite_parameters(modules)
    if bad_weights:
        cause = f"{trains}'s weights became non-finite ({', '.join(bad_weights)}): lr too high?"
    elif any(t.is_floating_point() and not torch.isfinite(t).all() for t in batch):
        cause = "the teacher pairs hold NaN/inf (the dense model overflows on this batch: try dtype=float32)"
    else:
        cause = "the loss overflowed on finite inputs and weights (lr too high, or no gradient clipping?)"
    raise NonFiniteLossError(stage, f"step {step}", f"loss is {loss.item()}", cause)


class _Bookkeeping:
    """What every training does around a step: records, progress, periodic validation, the kept weights."""

    def __init__(self, job: Job, log: TrainLog, total: int, eval_every: int, on_step, desc: str,
                 disable: bool = False, select: str = "best"):
        self.job, self.log, self.total, self.select = job, log, total, select
        self.eval_every, self.on_step = eval_every, on_step
        self.best_state = job.kept()
        log.initial_val_loss = log.best_val_loss = job.validate()
        log.best_step = 0
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=disable)

    def after_step(self, step: int, loss: float, tokens: int, lr: float) -> None:
        log = self.log
        log.tokens += tokens
        log.train_loss.append((step, loss))
        faults.kill_point(f"train:step:{step}")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}")
        if self.on_step:
            self.on_step(step, {"train/loss": loss, "train/lr": lr})
        if step % self.eval_every == 0 or step == self.total:
            v = self.job.validate()
            _check_finite(torch.tensor(v), f"validation ({self.job.stage})", step, self.job.modules, self.job.trains)
            log.val_loss.append((step, v))
            if self.on_step:
                self.on_step(step, {"val/loss": v})
            if v < log.best_val_loss:
                log.best_val_loss, log.best_step = v, step
                if self.select == "best":
                    self.best_state = self.job.kept()

    def finish(self, steps: int, master: MasterWeights) -> TrainLog:
        self.bar.close()
        if self.select == "best":
            self.job.put_back(self.best_state)
        master.release()  # the kept weights back in the run's dtype: what is saved and evaluated
        for m in self.job.modules:
            m.eval()
        self.log.steps = steps
        self.log.selected_step = self.log.best_step if self.select == "best" else steps
        return self.log


def fit(job: Job, cfg: TrainConfig, seed: int, evals_per_epoch: int = 4, on_step=None, desc: str | None = None,
        progress: bool = True, all_reduce: Callable[[list[nn.Parameter]], None] | None = None,
        mean_loss: Callable[[float], float] | None = None) -> TrainLog:
    """Train `job` with `cfg`'s optimizer, schedule and budget; returns the log. `seed` orders the batches
    (the caller seeds torch before building what trains); `all_reduce` averages gradients over ranks and
    `mean_loss` a step's loss (what is logged: every rank's batches)."""
    accum = cfg.grad_accum  # micro-batches per optimizer step; an epoch's leftover micro-batches are not used
    steps_per_epoch = job.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"train.grad_accum={accum} is more than the {job.steps_per_epoch} batches of an epoch")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(cfg.max_steps, total)
    # fp32 master weights (and so fp32 AdamW moments) for every trainable part, whatever the run's dtype;
    # the forward and backward run in the run's dtype under autocast (`precision`)
    master = MasterWeights(job.params)
    opt, sched = _optimizer(job.params, cfg, total)
    device = job.params[0].device if job.params else torch.device("cpu")
    scaler = torch.amp.GradScaler(device.type, enabled=job.compute_dtype == torch.float16)  # fp16 underflows
    log = TrainLog(trainable_params=sum(p.numel() for p in job.params))
    book = _Bookkeeping(job, log, total, max(1, math.ceil(steps_per_epoch / evals_per_epoch)), on_step,
                        desc or f"train ({job.stage})", disable=not progress, select=cfg.select)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < total:
        keys = list(job.order(gen))
        for first in range(0, steps_per_epoch * accum, accum):
            if step >= total:
                break
            for m in job.modules:
                m.train()
            opt.zero_grad(set_to_none=True)
            losses, tokens = [], 0
            for key in keys[first:first + accum]:  # gradients of the mean loss over the micro-batches
                batch = job.load(key)
                with job.amp():  # the batch was loaded outside: teacher pairs in the run's own dtype
                    loss = job.loss(batch)
                _check_finite(loss, f"train ({job.stage})", step, job.modules, job.trains, batch.inputs)
                scaler.scale(loss / accum if accum > 1 else loss).backward()
                losses.append(loss.item())
                tokens += batch.tokens
                del loss, batch  # one micro-batch's activations at a time
            if all_reduce is not None:
                all_reduce(job.params)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(job.params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            step_loss = sum(losses) / len(losses)
            book.after_step(step, mean_loss(step_loss) if mean_loss else step_loss, tokens, sched.get_last_lr()[0])
    return book.finish(step, master)


# ------------------------------------------------------------------------------------------------ mse
def _slot_call(modules: list[nn.Module], x: torch.Tensor, kwargs: list[dict]) -> torch.Tensor:
    """Call slot module j with the arguments the model passes to the layer at position start+j."""
    for m, kw in zip(modules, kwargs):
        out = m(x, **kw)
        x = out[0] if isinstance(out, tuple) else out
    return x


def _mse(pred: torch.Tensor, target: torch.Tensor, first_token: str, mse_target: str = "absolute") -> torch.Tensor:
    if first_token == "exclude":  # the attention-sink position carries huge activations that dominate MSE
        pred, target = pred[:, 1:], target[:, 1:]
    pred, target = pred.float(), target.float().to(pred.device)  # the teacher's layer may sit on another card
    if mse_target == "relative":  # each token's error relative to its own size: massive tokens weigh as others
        err = (pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
        return err.mean()
    return torch.nn.functional.mse_loss(pred, target)


def _needs_layer_kwargs(modules: list[nn.Module]) -> bool:
    from llm_streamline.replace import FFNReplacement, MLPReplacement
    return not all(isinstance(m, (FFNReplacement, MLPReplacement)) for m in modules)


def train_mse(model: PreTrainedModel, slot: list[nn.Module], start: int, blocks: torch.Tensor,
              train_shards: TeacherShards | OnlineTeacher, val_shards: TeacherShards | OnlineTeacher,
              cfg: TrainConfig, seed: int, evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Fit the slot modules to the teacher pairs (cached shards or an online teacher: the same batches). `model`
    is the DENSE model (used to capture the call arguments of layer `start`, once per batch shape). With an
    `accelerate.Accelerator` (torchrun, online pairs), each step's batches are sharded over the ranks, each rank
    computing its own batches' pairs, and gradients all-reduced: every rank ends with the same weights. A sharded
    dense model (`model.shard=fsdp`; the slot replicated) runs in lockstep: the layer arguments of every batch shape
    captured up front by all ranks, the validation batches padded with a filler that weighs nothing."""
    torch.manual_seed(seed)
    need_kwargs = _needs_layer_kwargs(slot)
    stack = find_decoder_stack(model)
    device = module_device(slot[0])  # the pairs and the layer arguments go to the card holding the slot
    kwargs_by_shape: dict[tuple[int, int], list[dict]] = {}

    def layer_kwargs(rows) -> list[dict]:
        """The arguments the model passes to layers start.. (causal mask, rotary cos/sin, position ids) depend
        on the batch's shape, not on its tokens: the blocks are unpadded sequences of one length (a test
        checks this per family). Capturing them runs layers 0..start-1, so it is done once per shape."""
        if not need_kwargs:
            return [{}] * len(slot)
        shape = (len(rows), blocks.shape[1])
        if shape not in kwargs_by_shape:
            where = tuple(range(start, start + len(slot)))
            cap = run_layers(model, blocks[rows], kwargs_at=where, stack=stack)
            kwargs_by_shape[shape] = [to_device(cap.call_kwargs[i], device) for i in where]
        return kwargs_by_shape[shape]

    world, rank = ranks(accelerator)
    sharded = is_sharded(model)
    if sharded:  # every capture is a forward of the sharded dense model: all ranks capture every shape, in one order
        for n in sorted({len(rows) for rows in [*train_shards.index, *val_shards.index]}):
            layer_kwargs(list(range(n)))
    steps_per_epoch = len(train_shards) // world
    if steps_per_epoch < 1:
        raise ConfigError(f"train.loss=mse with {world} processes needs at least {world} training batches of "
                          f"train.batch_size={cfg.batch_size}, got {len(train_shards)}")

    def order(gen: torch.Generator) -> list[int]:
        perm = torch.randperm(len(train_shards), generator=gen).tolist()  # same order on every rank (same seed)
        return [perm[s * world + rank] for s in range(steps_per_epoch)]

    def load(shards: TeacherShards, i: int, ranks: int = 1, counted: bool = True) -> Batch:
        x, y, rows = shards.load(i)
        # a lockstep filler (sharded dense model) weighs nothing in the validation mean: rows 0
        return Batch((x.to(device), y.to(device)), x.shape[0] if counted else 0, x.shape[0] * x.shape[1] * ranks,
                     rows)

    def loss(b: Batch) -> torch.Tensor:
        x, y = b.inputs
        return _mse(_slot_call(slot, x, layer_kwargs(b.index)), y, cfg.first_token, cfg.mse_target)

    job = Job("mse", "the replacement", slot, [p for m in slot for p in m.parameters() if p.requires_grad],
              steps_per_epoch, order, lambda i: load(train_shards, i, world),
              lambda: (load(val_shards, i, counted=counted)  # this rank's share
                       for i, counted in shares(len(val_shards), accelerator, lockstep=sharded)),
              loss, evaluated=slot, compute_dtype=compute_dtype(model), val_reduce=sum_over_ranks(accelerator))
    return fit(job, cfg, seed, evals_per_epoch, on_step, desc=f"train {type(slot[0]).__name__} (mse)",
               **_data_parallel(accelerator))


# ------------------------------------------------------------------------------------------------ lm, distill
def _block_job(stage: str, trains: str, modules: list[nn.Module], params: list[nn.Parameter], model: nn.Module,
               train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TrainConfig, batch_loss,
               accelerator=None) -> Job:
    """Batches of `cfg.batch_size` token blocks through `model`, the loss `batch_loss(ids)` on each (validation:
    the same loss). With an `accelerate.Accelerator`, each step's blocks are sharded over processes (the same
    seeded order on every rank)."""
    bs = cfg.batch_size
    world, rank = ranks(accelerator)
    steps_per_epoch = train_blocks.shape[0] // (bs * world)
    if steps_per_epoch < 1:
        raise ConfigError(f"train.loss={cfg.loss} needs at least {bs * world} training blocks, "
                          f"got {train_blocks.shape[0]}")
    device = input_device(model)

    def order(gen: torch.Generator) -> list[torch.Tensor]:
        perm = torch.randperm(train_blocks.shape[0], generator=gen)  # same order on every rank (same seed)
        return [perm[(s * world + rank) * bs:(s * world + rank + 1) * bs] for s in range(steps_per_epoch)]

    def load(rows: torch.Tensor) -> Batch:
        ids = train_blocks[rows].to(device)
        return Batch((ids,), ids.shape[0], ids.numel() * world)

    def val_batches() -> Iterable[Batch]:
        # this rank's share of the batches; a sharded model's lockstep filler weighs nothing (rows 0)
        for k, counted in shares(-(-val_blocks.shape[0] // bs), accelerator, lockstep=is_sharded(model)):
            ids = val_blocks[k * bs:(k + 1) * bs].to(device)
            yield Batch((ids,), ids.shape[0] if counted else 0, ids.numel())

    return Job(stage, trains, modules, params, steps_per_epoch, order, load, val_batches,
               lambda b: batch_loss(b.inputs[0]), evaluated=[model], val_reduce=sum_over_ranks(accelerator))


@contextlib.contextmanager
def activation_checkpointing(model: PreTrainedModel, on: bool | None):
    """While training: the model's decoder layers keep only their inputs and recompute their activations in the
    backward pass (torch.utils.checkpoint with use_reentrant=False, transformers' own per-layer switch; only in
    train mode, validation runs as usual), and the embeddings' output requires grad, which peft needs when only
    adapters inside the layers train. `on` None: on CUDA only (on a CPU the memory is rarely short and the
    recomputation costs about a third more time). Results are unchanged: the same forward is recomputed."""
    if on is None:
        on = input_device(model).type == "cuda"
    if not on:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.grad_checkpointing=true: {type(model).__name__} does not support activation "
                          "checkpointing; set train.grad_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    try:
        yield
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        model.disable_input_require_grads()


def _all_reduce_mean(world: int):
    def all_reduce(params: list[nn.Parameter]) -> None:
        for p in params:  # the mean gradient: identical updates on every rank
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= world
    return all_reduce


def _data_parallel(accelerator) -> dict:
    """`fit`'s arguments for a data-parallel job: a progress bar on the first rank only, gradients averaged
    over the ranks after each step's backward passes (the same update everywhere, as DDP's all-reduce; done
    here, in the one loop every loss shares, rather than by wrapping each trained module in DDP), and the
    logged loss averaged over the ranks' batches (the same log everywhere)."""
    world, rank = ranks(accelerator)
    if world == 1:
        return {"progress": True, "all_reduce": None, "mean_loss": None}
    summed = sum_over_ranks(accelerator)

    def mean_loss(x: float) -> float:
        return summed(torch.tensor([x])).item() / world

    return {"progress": rank == 0, "all_reduce": _all_reduce_mean(world), "mean_loss": mean_loss}


def _train_through_tail(pruned: PreTrainedModel, slot: list[nn.Module], train_blocks: torch.Tensor,
                        val_blocks: torch.Tensor, cfg: TrainConfig, seed: int, batch_loss, stage: str,
                        evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Train `slot` on `batch_loss(ids)` computed through the frozen pruned model (validation: the same loss).

    With an `accelerate.Accelerator`, batches are sharded over processes and gradients all-reduced, so every
    rank ends with the same weights (the block was chosen before, from the same seeded data, on every rank).
    """
    torch.manual_seed(seed)
    pruned.requires_grad_(False)
    for m in slot:
        m.requires_grad_(True)
    params = [p for m in slot for p in m.parameters()]
    job = _block_job(stage, "the replacement", slot, params, pruned, train_blocks, val_blocks, cfg, batch_loss,
                     accelerator)
    job.compute_dtype = compute_dtype(pruned)  # the frozen model's dtype (the slot may already be fp32)
    with activation_checkpointing(pruned, cfg.grad_checkpointing):
        return fit(job, cfg, seed, evals_per_epoch, on_step, desc=f"train slot ({stage})",
                   **_data_parallel(accelerator))


def train_lm(pruned: PreTrainedModel, slot: list[nn.Module], train_blocks: torch.Tensor, val_blocks: torch.Tensor,
             cfg: TrainConfig, seed: int, evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Language-modelling loss through the frozen pruned model; only `slot` trains."""
    return _train_through_tail(pruned, slot, train_blocks, val_blocks, cfg, seed, lambda ids: lm_loss(pruned, ids),
                               "lm", evals_per_epoch, on_step, accelerator)


class DistillLoss:
    """KL(dense || pruned) over next-token distributions (+ alpha x hidden-state MSE at the slot's output).

    The teacher's final hidden states come from the dense model per batch, without gradients; its logits are
    formed chunk by chunk inside `kl_sum`, never for the whole batch. For the MSE term, forward hooks catch
    the dense model's x^(start+n) and the slot's output in the same forward passes.

    `pruned` may be `dense` itself (sharded weights, `model.shard=fsdp`: no second model over the shards): the
    teacher runs the dense layers, the student the same model with `slot` in place of [start, start+n) for its
    forward only (`layer_view`); every rank runs both forwards in lockstep, the FSDP layers gathered in turn."""

    def __init__(self, dense: PreTrainedModel, pruned: PreTrainedModel, slot: list[nn.Module], start: int, n: int,
                 cfg: TrainConfig):
        self.dense, self.pruned, self.cfg = dense, pruned, cfg
        self.student_view = contextlib.nullcontext
        if pruned is dense:
            layers, total = list(find_decoder_stack(dense).layers), find_decoder_stack(dense).num_layers
            rows = [*range(start), *range(start, start + len(slot)), *range(start + n, total)]
            self.student_view = lambda: layer_view(dense, [*layers[:start], *slot, *layers[start + n:]], rows)
        self.teacher_head, self.student_head = head_of(dense), head_of(pruned)
        self.caught: dict[str, torch.Tensor] = {}
        self.hooks = []
        if cfg.distill_alpha > 0:
            self._catch(find_decoder_stack(dense).layers[start + n - 1], "teacher")
            self._catch(slot[-1], "student")

    def _catch(self, module: nn.Module, name: str) -> None:
        def hook(mod, args, output):
            self.caught[name] = output[0] if isinstance(output, tuple) else output
        self.hooks.append(module.register_forward_hook(hook))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = final_hidden(self.dense, ids)
        with self.student_view():  # the backward needs no view: autograd kept the student's graph
            student = final_hidden(self.pruned, ids)
        kl, positions = kl_sum(student, teacher, self.student_head, self.teacher_head, self.cfg.distill_temperature)
        loss = kl / positions
        if self.cfg.distill_alpha > 0:
            mse = _mse(self.caught.pop("student"), self.caught.pop("teacher"), self.cfg.first_token,
                       self.cfg.mse_target)
            loss = loss + self.cfg.distill_alpha * mse.to(loss.device)  # the slot's card, the head's card
        return loss

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def train_distill(dense: PreTrainedModel, pruned: PreTrainedModel, slot: list[nn.Module], start: int, n: int,
                  train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TrainConfig, seed: int,
                  evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Knowledge distillation from the dense model through the frozen pruned model; only `slot` trains.
    `pruned` already holds `slot` in place of the dense model's layers [start, start+n), or is `dense` itself
    (sharded weights: the slot is put in for the student's forwards only, `DistillLoss`)."""
    dense.eval().requires_grad_(False)
    loss = DistillLoss(dense, pruned, slot, start, n, cfg)
    try:
        return _train_through_tail(pruned, slot, train_blocks, val_blocks, cfg, seed, loss, "distill",
                                   evals_per_epoch, on_step, accelerator)
    finally:
        loss.close()


# ------------------------------------------------------------------------------------------------ lora
def lora_targets(model: PreTrainedModel) -> list[str]:
    """Full module names of every nn.Linear inside the decoder layers."""
    stack = find_decoder_stack(model)
    inside = {id(m) for layer in stack.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in inside]


def _adapters(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def train_lora(model: PreTrainedModel, train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TrainConfig,
               rank: int, alpha: int, seed: int, progress: bool = True, on_step=None,
               cached: tuple[dict, dict] | None = None, on_trained=None,
               accelerator=None, merge_in_place: bool = False) -> tuple[PreTrainedModel, dict]:
    """LoRA healing of `model` with `cfg`'s budget (validated once per epoch). Returns (the merged plain model,
    the log). The input object is modified (peft injects adapters in place and merge_and_unload gives back the
    same base model object).

    cached: (adapter weights, log) of an earlier identical run: loaded and merged, no training.
    on_trained(adapter weights, log): called after training (the pipeline keeps them in its stage cache).
    accelerator: an `accelerate.Accelerator` under torchrun: batches sharded over the ranks, the adapters'
    gradients all-reduced, so every rank ends with the same adapters.
    merge_in_place: each adapted weight is updated in place (no second copy of it, module by module); only when
    nothing else holds the base weights (the recipes release the dense model first). Otherwise each merged weight
    is a new tensor and the base weights stay as they were."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the adapters' initialisation
    cls = type(model)
    run_dtype = compute_dtype(model)  # before peft adds its (float32) adapters
    targets = lora_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                  target_modules=targets, task_type="CAUSAL_LM"))
    if cached is not None:
        adapters, log = cached
        missing = [k for k in adapters if k not in peft_model.state_dict()]
        if missing:
            raise ValueError(f"cached LoRA adapters do not fit this model (e.g. {missing[0]})")
        peft_model.load_state_dict(adapters, strict=False)
        return _merge(peft_model, cls, merge_in_place), log
    params = [p for p in peft_model.parameters() if p.requires_grad]
    job = _block_job("lora", "the LoRA adapters", [peft_model], params, peft_model, train_blocks, val_blocks, cfg,
                     lambda ids: lm_loss(peft_model, ids),  # the head in chunks of positions, recomputed in backward
                     accelerator)
    job.keep, job.restore = (lambda: _adapters(peft_model)), (lambda s: peft_model.load_state_dict(s, strict=False))
    job.compute_dtype = run_dtype
    with activation_checkpointing(model, cfg.grad_checkpointing):  # `model` is the base inside peft_model
        dp = _data_parallel(accelerator)
        tl = fit(job, cfg, seed, evals_per_epoch=1, on_step=on_step, desc="lora heal",
                 **{**dp, "progress": progress and dp["progress"]})
    final = tl.val_loss[-1][1] if tl.val_loss else tl.initial_val_loss
    log = {"method": "lora", "rank": rank, "alpha": alpha, "lr": cfg.lr, "epochs": cfg.epochs,
           "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
           "processes": ranks(accelerator)[0],
           "effective_batch_size": cfg.batch_size * cfg.grad_accum * ranks(accelerator)[0], "targets": len(targets),
           **tl.as_dict(),
           "final_val_loss": final,
           "seconds": round(time.perf_counter() - t0, 3),
           "val_ppl": {"initial": math.exp(tl.initial_val_loss), "best": math.exp(tl.best_val_loss)}}
    if on_trained is not None:
        on_trained({k: v.contiguous().cpu() for k, v in _adapters(peft_model).items()}, log)
    return _merge(peft_model, cls, merge_in_place), log


def _merge_sharded(peft_model) -> None:
    """Each adapter's product B A x scale added into this rank's rows of its sharded base weight (`model.shard=fsdp`;
    peft's merge would add a whole tensor to a DTensor shard). The adapters are replicated (identical on every rank:
    their gradients are all-reduced), so each rank's product is the same and every rank's shard gets its own rows
    of it: the gathered weights are what one process's merge gives."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor

    from llm_streamline.models.sharded import shard_rows

    for m in peft_model.modules():
        if not isinstance(m, LoraLayer):
            continue
        w = m.get_base_layer().weight
        for name in m.active_adapters:
            delta = m.get_delta_weight(name)  # [out, in], every rank alike
            if isinstance(w, DTensor):
                a, b = shard_rows(w.shape[0], w.device_mesh.size(), w.device_mesh.get_local_rank())
                local = w.to_local()
                local.add_(delta[a:b].to(local.device, local.dtype))
            else:
                w.data.add_(delta.to(w.device, w.dtype))


def _merge(peft_model, cls, in_place: bool) -> PreTrainedModel:
    """The adapters merged and removed. Not in place (peft's safe merge): each merged weight is a new tensor and the
    base weight is left as it was, as it must while a dense model shares it (`models.layers.share_weights`); the
    adapted weights are then held twice. In place: peft adds each adapter's product into its base weight, one
    module at a time; its safe merge's check for non-finite values is made on the adapters first. A sharded model
    (FSDP2) is merged in place, each rank into its own rows (`_merge_sharded`)."""
    from llm_streamline.models.devices import is_sharded

    sharded = is_sharded(peft_model)
    if in_place or sharded:
        bad = [k for k, v in peft_model.state_dict().items() if "lora_" in k and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"LoRA adapters with non-finite values (e.g. {bad[0]}): not merged")
    if sharded:
        with torch.no_grad():
            _merge_sharded(peft_model)
        merged = peft_model.unload()
    else:
        merged = peft_model.merge_and_unload(safe_merge=not in_place)
    merged.eval()
    if type(merged) is not cls:
        raise TypeError(f"LoRA merge returned {type(merged).__name__}, expected {cls.__name__}")
    merged.requires_grad_(True)
    return merged
