"""LoRA healing after a baseline's pruning (peft), merged back into a plain transformers model.

Adapters (r = method.lora_rank, alpha = method.lora_alpha, dropout 0, no bias) go on every nn.Linear inside
the decoder layers (attention and MLP projections, found from the model, no family names); embeddings,
norms and the LM head stay frozen. Loss: next-token LM loss on the training blocks; AdamW at method.lora_lr
(no weight decay), 5% linear warm-up then cosine decay to 10%, batch train.batch_size, gradient clipping at
train.grad_clip, method.lora_epochs passes (capped by train.max_steps if set), seeded batch order.
Validation loss before training and after each epoch; the adapters with the best validation loss are kept
(the initial state, i.e. no healing, if training never helped). The adapters are then merged
(`merge_and_unload`) so the returned model is the same class as the input and saves as a stock checkpoint.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from llm_streamline.config import RunConfig
from llm_streamline.faults import NumericalFault, nonfinite_parameters
from llm_streamline.losses import lm_loss
from llm_streamline.models.layers import find_decoder_stack


def lora_targets(model: PreTrainedModel) -> list[str]:
    """Full module names of every nn.Linear inside the decoder layers."""
    stack = find_decoder_stack(model)
    inside = {id(m) for layer in stack.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in inside]


@torch.no_grad()
def _val_loss(model, blocks: torch.Tensor, bs: int, device) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, blocks.shape[0], bs):
        ids = blocks[i:i + bs].to(device)
        tot += lm_loss(model, ids).item() * ids.shape[0]
        cnt += ids.shape[0]
    return tot / cnt


def lora_heal(model: PreTrainedModel, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
              cfg: RunConfig, progress: bool = True, cached: tuple[dict, dict] | None = None,
              on_trained=None) -> tuple[PreTrainedModel, dict]:
    """Returns (the merged plain model, training log). The input object is modified (peft injects adapters
    in place and merge_and_unload gives back the same base model object).

    cached: (adapter weights, log) of an earlier identical run: loaded and merged, no training.
    on_trained(adapter weights, log): called after training (the pipeline keeps them in its stage cache)."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    m, t = cfg.method, cfg.train
    torch.manual_seed(cfg.seed)
    cls = type(model)
    device = next(model.parameters()).device
    targets = lora_targets(model)
    lcfg = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    if cached is not None:
        adapters, log = cached
        missing = [k for k in adapters if k not in peft_model.state_dict()]
        if missing:
            raise ValueError(f"cached LoRA adapters do not fit this model (e.g. {missing[0]})")
        peft_model.load_state_dict(adapters, strict=False)
        return _merge(peft_model, cls), log
    params = [p for p in peft_model.parameters() if p.requires_grad]
    bs = t.batch_size
    steps_per_epoch = max(1, train_blocks.shape[0] // bs)
    total = steps_per_epoch * m.lora_epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    opt = torch.optim.AdamW(params, lr=m.lora_lr, weight_decay=0.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, int(round(0.05 * total)), total,
                                                       min_lr=0.1 * m.lora_lr)
    log = {"method": "lora", "rank": m.lora_rank, "alpha": m.lora_alpha, "lr": m.lora_lr, "epochs": m.lora_epochs,
           "batch_size": bs, "targets": len(targets), "trainable_params": sum(p.numel() for p in params),
           "train_loss": [], "val_loss": []}
    init = _val_loss(peft_model, val_blocks, bs, device)
    log["initial_val_loss"] = init
    best, best_step = init, 0
    best_state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    gen = torch.Generator().manual_seed(cfg.seed)
    step, tokens = 0, 0
    bar = tqdm(total=total, desc="lora heal", unit="step", disable=not progress)
    while step < total:
        order = torch.randperm(train_blocks.shape[0], generator=gen)
        for s in range(steps_per_epoch):
            if step >= total:
                break
            ids = train_blocks[order[s * bs:(s + 1) * bs]].to(device)
            peft_model.train()
            loss = lm_loss(peft_model, ids)  # the head in chunks of positions, recomputed in backward
            if not torch.isfinite(loss):
                bad = nonfinite_parameters(peft_model)
                raise NumericalFault("lora heal", f"step {step}", f"loss is {loss.item()}",
                                     f"non-finite weights in {', '.join(bad)}" if bad else
                                     "the loss overflowed on finite weights (method.lora_lr too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tokens += ids.numel()
            log["train_loss"].append((step, loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
        v = _val_loss(peft_model, val_blocks, bs, device)
        log["val_loss"].append((step, v))
        if v < best:
            best, best_step = v, step
            best_state = {k: v_.detach().clone() for k, v_ in peft_model.state_dict().items() if "lora_" in k}
    bar.close()
    final = log["val_loss"][-1][1] if log["val_loss"] else init
    peft_model.load_state_dict(best_state, strict=False)
    log["train_loss"] = [list(p) for p in log["train_loss"]]  # as JSON reads them back
    log["val_loss"] = [list(p) for p in log["val_loss"]]
    log.update(final_val_loss=final, best_val_loss=best, best_step=best_step, steps=step, tokens=tokens,
               seconds=round(time.perf_counter() - t0, 3),
               val_ppl={"initial": math.exp(init), "best": math.exp(best)})
    if on_trained is not None:
        on_trained({k: v.contiguous().cpu() for k, v in best_state.items()}, log)
    return _merge(peft_model, cls), log


def _merge(peft_model, cls) -> PreTrainedModel:
    merged = peft_model.merge_and_unload()
    merged.eval()
    if type(merged) is not cls:
        raise TypeError(f"LoRA merge returned {type(merged).__name__}, expected {cls.__name__}")
    merged.requires_grad_(True)
    return merged
