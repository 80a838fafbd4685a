"""Training the replacement.

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
LM and KD losses run the LM head in chunks of positions (`losses`).
All: AdamW, linear warmup then cosine to `min_lr` (transformers' scheduler), gradient clipping, a
validation loss at each epoch end (and a few times within); `select=best` keeps the weights with the
lowest validation loss (by copy), `select=final` the last ones (as the paper does); seeded.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from llm_streamline import faults, stages
from llm_streamline.config import TrainConfig
from llm_streamline.losses import final_hidden, head_of, kl_sum, lm_loss
from llm_streamline.models.layers import find_decoder_stack, run_layers


class NonFiniteLossError(faults.NumericalFault):
    """A training or validation loss that is NaN/inf: the run stops at that step, naming the cause."""


# ---------------------------------------------------------------------------------------------- teacher pairs
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


def write_teacher_shards(model: PreTrainedModel, blocks: torch.Tensor, start: int, n: int, directory: Path,
                         batch_size: int, desc: str = "teacher pairs") -> TeacherShards:
    """Run layers 0..start+n-1 only (no LM head) and write x^(start), x^(start+n) per batch to `directory`.

    Written into a temporary directory renamed into place at the end: a killed run leaves nothing that a
    rerun would trust.
    """
    directory = Path(directory)
    key = f"{directory.parent.name}/{directory.name}"  # the manifest's key: <teacher stage key>/<split>
    if stages.sealed(directory, key):  # a damaged entry (a truncated shard, a changed index) is moved aside
        meta = json.loads((directory / "index.json").read_text())
        return TeacherShards(directory, meta["files"], meta["index"])
    stack = find_decoder_stack(model)
    device = next(model.parameters()).device
    files, index = [], []
    with stages.atomic_dir(directory) as tmp:  # a full disk or an interrupt leaves nothing behind
        for b, i in enumerate(tqdm(range(0, blocks.shape[0], batch_size), desc=desc, unit="batch")):
            rows = list(range(i, min(i + batch_size, blocks.shape[0])))
            cap = run_layers(model, blocks[rows].to(device), inputs_at=(start,), outputs_at=(start + n - 1,),
                             stack=stack)
            name = f"shard-{b:05d}.safetensors"
            save_file({"x_in": cap.inputs[start].contiguous().cpu(),
                       "x_out": cap.outputs[start + n - 1].contiguous().cpu()}, str(tmp / name))
            files.append(name)
            index.append(rows)
        (tmp / "index.json").write_text(json.dumps({"files": files, "index": index}))
        stages.seal(tmp, key)  # written last: the marker
    return TeacherShards(directory, files, index)


# ------------------------------------------------------------------------------------------------ training
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


def _slot_call(modules: list[nn.Module], x: torch.Tensor, kwargs: list[dict]) -> torch.Tensor:
    """Call slot module j with the arguments the model passes to the layer at position start+j."""
    for m, kw in zip(modules, kwargs):
        out = m(x, **kw)
        x = out[0] if isinstance(out, tuple) else out
    return x


def _mse(pred: torch.Tensor, target: torch.Tensor, first_token: str, mse_target: str = "absolute") -> torch.Tensor:
    if first_token == "exclude":  # the attention-sink position carries huge activations that dominate MSE
        pred, target = pred[:, 1:], target[:, 1:]
    pred, target = pred.float(), target.float()
    if mse_target == "relative":  # each token's error relative to its own size: massive tokens weigh as others
        err = (pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
        return err.mean()
    return torch.nn.functional.mse_loss(pred, target)


def _needs_layer_kwargs(modules: list[nn.Module]) -> bool:
    from llm_streamline.replace import FFNReplacement, MLPReplacement
    return not all(isinstance(m, (FFNReplacement, MLPReplacement)) for m in modules)


def _optimizer(params, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, max(total_steps, 1), min_lr=cfg.min_lr)
    return opt, sched


def _check_finite(loss: torch.Tensor, stage: str, step: int, slot: list[nn.Module],
                  batch: tuple[torch.Tensor, ...] = ()) -> None:
    if torch.isfinite(loss):
        return
    bad_weights = faults.nonfinite_parameters(slot)
    if bad_weights:
        cause = f"the replacement's weights became non-finite ({', '.join(bad_weights)}): lr too high?"
    elif any(t.is_floating_point() and not torch.isfinite(t).all() for t in batch):
        cause = "the teacher pairs hold NaN/inf (the dense model overflows on this batch: try dtype=float32)"
    else:
        cause = "the loss overflowed on finite inputs and weights (lr too high, or no gradient clipping?)"
    raise NonFiniteLossError(stage, f"step {step}", f"loss is {loss.item()}", cause)


class _Bookkeeping:
    """What both losses do around a step: records, progress, periodic validation, best weights by copy."""

    def __init__(self, slot: list[nn.Module], log: TrainLog, validate, total: int, eval_every: int, on_step,
                 stage: str, desc: str, disable: bool = False, select: str = "best"):
        self.slot, self.log, self.validate, self.total, self.select = slot, log, validate, total, select
        self.eval_every, self.on_step, self.stage = eval_every, on_step, stage
        self.best_state = [copy.deepcopy(m.state_dict()) for m in slot]
        log.initial_val_loss = log.best_val_loss = validate()
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
            v = self.validate()
            _check_finite(torch.tensor(v), f"validation ({self.stage})", step, self.slot)
            log.val_loss.append((step, v))
            if self.on_step:
                self.on_step(step, {"val/loss": v})
            if v < log.best_val_loss:
                log.best_val_loss, log.best_step = v, step
                if self.select == "best":
                    self.best_state = [copy.deepcopy(m.state_dict()) for m in self.slot]

    def finish(self, steps: int) -> TrainLog:
        self.bar.close()
        if self.select == "best":
            for m, state in zip(self.slot, self.best_state):
                m.load_state_dict(state)
        for m in self.slot:
            m.eval()
        self.log.steps = steps
        self.log.selected_step = self.log.best_step if self.select == "best" else steps
        return self.log


def train_mse(model: PreTrainedModel, slot: list[nn.Module], start: int, blocks: torch.Tensor,
              train_shards: TeacherShards, val_shards: TeacherShards, cfg: TrainConfig, seed: int,
              evals_per_epoch: int = 4, on_step=None) -> TrainLog:
    """Fit the slot modules to the teacher pairs. `model` is the DENSE model (used only to capture the
    call arguments of layer `start`, once per batch shape)."""
    torch.manual_seed(seed)
    params = [p for m in slot for p in m.parameters() if p.requires_grad]
    steps_per_epoch = len(train_shards)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    opt, sched = _optimizer(params, cfg, total)
    log = TrainLog(trainable_params=sum(p.numel() for p in params))
    need_kwargs = _needs_layer_kwargs(slot)
    stack = find_decoder_stack(model)
    device = next(model.parameters()).device

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
            cap = run_layers(model, blocks[rows].to(device), kwargs_at=where, stack=stack)
            kwargs_by_shape[shape] = [cap.call_kwargs[i] for i in where]
        return kwargs_by_shape[shape]

    @torch.no_grad()
    def validate() -> float:
        for m in slot:
            m.eval()
        tot, cnt = 0.0, 0
        for i in range(len(val_shards)):
            x, y, rows = val_shards.load(i)
            pred = _slot_call(slot, x.to(device), layer_kwargs(rows))
            tot += _mse(pred, y.to(device), cfg.first_token, cfg.mse_target).item() * x.shape[0]
            cnt += x.shape[0]
        for m in slot:
            m.train()
        return tot / max(cnt, 1)

    book = _Bookkeeping(slot, log, validate, total, max(1, math.ceil(steps_per_epoch / evals_per_epoch)),
                        on_step, "mse", f"train {type(slot[0]).__name__} (mse)", select=cfg.select)
    gen = torch.Generator().manual_seed(seed)
    for m in slot:
        m.train()
    step = 0
    while step < total:
        for i in torch.randperm(steps_per_epoch, generator=gen).tolist():
            if step >= total:
                break
            x, y, rows = train_shards.load(i)
            x, y = x.to(device), y.to(device)
            loss = _mse(_slot_call(slot, x, layer_kwargs(rows)), y, cfg.first_token, cfg.mse_target)
            _check_finite(loss, "train (mse)", step, slot, (x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            book.after_step(step, loss.item(), x.shape[0] * x.shape[1], sched.get_last_lr()[0])
    return book.finish(step)


def train_lm(pruned: PreTrainedModel, slot: list[nn.Module], train_blocks: torch.Tensor, val_blocks: torch.Tensor,
             cfg: TrainConfig, seed: int, evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Language-modelling loss through the frozen pruned model; only `slot` trains."""
    return _train_through_tail(pruned, slot, train_blocks, val_blocks, cfg, seed, lambda ids: lm_loss(pruned, ids),
                               "lm", evals_per_epoch, on_step, accelerator)


class DistillLoss:
    """KL(dense || pruned) over next-token distributions (+ alpha x hidden-state MSE at the slot's output).

    The teacher's final hidden states come from the dense model per batch, without gradients; its logits are
    formed chunk by chunk inside `kl_sum`, never for the whole batch. For the MSE term, forward hooks catch
    the dense model's x^(start+n) and the slot's output in the same forward passes."""

    def __init__(self, dense: PreTrainedModel, pruned: PreTrainedModel, slot: list[nn.Module], start: int, n: int,
                 cfg: TrainConfig):
        self.dense, self.pruned, self.cfg = dense, pruned, cfg
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
        student = final_hidden(self.pruned, ids)
        kl, positions = kl_sum(student, teacher, self.student_head, self.teacher_head, self.cfg.distill_temperature)
        loss = kl / positions
        if self.cfg.distill_alpha > 0:
            loss = loss + self.cfg.distill_alpha * _mse(self.caught.pop("student"), self.caught.pop("teacher"),
                                                        self.cfg.first_token, self.cfg.mse_target)
        return loss

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def train_distill(dense: PreTrainedModel, pruned: PreTrainedModel, slot: list[nn.Module], start: int, n: int,
                  train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TrainConfig, seed: int,
                  evals_per_epoch: int = 4, on_step=None, accelerator=None) -> TrainLog:
    """Knowledge distillation from the dense model through the frozen pruned model; only `slot` trains.
    `pruned` already holds `slot` in place of the dense model's layers [start, start+n)."""
    dense.eval().requires_grad_(False)
    loss = DistillLoss(dense, pruned, slot, start, n, cfg)
    try:
        return _train_through_tail(pruned, slot, train_blocks, val_blocks, cfg, seed, loss, "distill",
                                   evals_per_epoch, on_step, accelerator)
    finally:
        loss.close()


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
    bs = cfg.batch_size
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    steps_per_epoch = train_blocks.shape[0] // (bs * world)
    if steps_per_epoch < 1:
        raise ValueError(f"train.loss={cfg.loss} needs at least {bs * world} training blocks, "
                         f"got {train_blocks.shape[0]}")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    opt, sched = _optimizer(params, cfg, total)
    log = TrainLog(trainable_params=sum(p.numel() for p in params))
    device = next(pruned.parameters()).device

    @torch.no_grad()
    def validate() -> float:
        pruned.eval()
        tot = 0.0
        for i in range(0, val_blocks.shape[0], bs):
            ids = val_blocks[i:i + bs].to(device)
            tot += batch_loss(ids).item() * ids.shape[0]
        return tot / val_blocks.shape[0]

    book = _Bookkeeping(slot, log, validate, total, max(1, math.ceil(steps_per_epoch / evals_per_epoch)),
                        on_step, stage, f"train slot ({stage})", disable=rank != 0, select=cfg.select)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < total:
        order = torch.randperm(train_blocks.shape[0], generator=gen)  # same order on every rank (same seed)
        for s in range(steps_per_epoch):
            if step >= total:
                break
            batch = order[(s * world + rank) * bs:(s * world + rank + 1) * bs]
            ids = train_blocks[batch].to(device)
            for m in slot:
                m.train()
            loss = batch_loss(ids)
            _check_finite(loss, f"train ({stage})", step, slot)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if accelerator is not None and world > 1:
                for p in params:  # all-reduce the mean gradient: identical updates on every rank
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            book.after_step(step, loss.item(), ids.numel() * world, sched.get_last_lr()[0])
    return book.finish(step)
