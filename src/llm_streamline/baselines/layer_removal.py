"""Depth-pruning baselines that delete whole decoder layers (no replacement network).

  shortgpt  ShortGPT (Men et al. 2024): Block Influence BI_l = 1 - mean cos(x^(l), x^(l+1)) from the similarity
            profile (calibration data); the n layers with the lowest BI are removed (not necessarily
            contiguous). No training.
  gromov    Gromov et al. 2024 (arXiv 2403.17887 §3.2): the contiguous block [l, l+n) with the smallest angular
            distance arccos(cos(x_T^(l), x_T^(l+n))) / pi between the LAST token's representations, averaged over
            the calibration samples (`importance` metric "angular_last"; the all-token mean "angular" is
            LLM-Streamline's sparsity.importance=angular, recorded beside it); healing (LoRA) is applied afterwards
            by `baselines.heal` when `method.heal=lora` (the `gromov` preset sets it).
  sleb      SLEB (Song et al. 2024): greedy, n steps; at each step every remaining layer is tried out and the
            one whose removal gives the lowest calibration perplexity (LM loss on the first SLEB_BLOCKS
            calibration blocks) is removed. Efficient but exact: the hidden state entering every layer of the
            current model is captured once per step; a candidate i is then scored by running only layers
            i+1.. (plus the final norm and head) from the cached x^(i) (the model's own forward on a view of the
            layer list whose first layer's input is swapped for x^(i)). The last layer is scored by a full
            forward with a hook that makes it return its input.

Removal keeps config.num_hidden_layers, per-layer config arrays (layer_types, ...) and every layer_idx
consistent (`remove_layers`, built on `prune.remove_block`), so the result is a stock checkpoint.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_streamline.config import RunConfig
from llm_streamline.importance import SimilarityProfile, lowest_bi_layers, skip_layer_hook
from llm_streamline.models.layers import find_decoder_stack, per_layer_config_keys, run_layers
from llm_streamline.prune import remove_block

GROMOV_METRIC = "angular_last"   # Gromov et al. §3.2: the final token's representation
SLEB_BLOCKS = 4   # calibration blocks scored per SLEB candidate (cost: ~n * L^2 / 2 layer forwards each)


def remove_layers(model: PreTrainedModel, indices) -> list[int]:
    """In place: drop the layers at `indices` (current indices, any order, not necessarily contiguous).

    Calls `prune.remove_block` from the highest index down, so lower indices stay valid and config
    (num_hidden_layers, per-layer arrays) and layer_idx are kept consistent. Returns the sorted indices."""
    idx = sorted(set(int(i) for i in indices))
    total = find_decoder_stack(model).num_layers
    if not idx or idx[0] < 0 or idx[-1] >= total:
        raise ValueError(f"layer indices {idx} are outside the model's {total} layers")
    if len(idx) >= total:
        raise ValueError(f"cannot remove all {total} layers")
    for i in reversed(idx):
        remove_block(model, i, 1, [])
    return idx


# ------------------------------------------------------------------------------------------------ helpers
def _set_per_layer(model, stack, keep: list[int], saved: dict) -> None:
    cfg = stack.config
    for key in per_layer_config_keys(cfg):
        arr = getattr(cfg, key)
        saved[key] = arr
        setattr(cfg, key, type(arr)(arr[j] for j in keep) if isinstance(arr, tuple) else [arr[j] for j in keep])
    saved["__n__"] = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(keep)
    if cfg is not model.config and hasattr(model.config, "num_hidden_layers"):
        saved["__top_n__"] = model.config.num_hidden_layers
        model.config.num_hidden_layers = len(keep)


@contextlib.contextmanager
def layer_view(model: PreTrainedModel, layers: list[nn.Module], config_rows: list[int]):
    """Temporarily run `model` with the decoder list `layers`; per-layer config rows taken from `config_rows`
    (indices into the current arrays). No KV cache may be used inside (layer_idx is not renumbered)."""
    stack = find_decoder_stack(model)
    original = stack.layers
    saved: dict = {}
    view = nn.ModuleList(layers)
    view._llm_streamline_stack = True
    setattr(stack.parent, stack.attr, view)
    try:
        _set_per_layer(model, stack, config_rows, saved)
        yield
    finally:
        setattr(stack.parent, stack.attr, original)
        cfg = stack.config
        for key, val in saved.items():
            if not key.startswith("__"):
                setattr(cfg, key, val)
        if "__n__" in saved:
            cfg.num_hidden_layers = saved["__n__"]
        if "__top_n__" in saved:
            model.config.num_hidden_layers = saved["__top_n__"]


@contextlib.contextmanager
def skipping(model: PreTrainedModel, indices):
    """Layers at `indices` return their input (forward hooks); the reference for 'model without them'."""
    stack = find_decoder_stack(model)
    handles = [stack.layers[i].register_forward_hook(skip_layer_hook, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _lm_loss_sum(model, ids: torch.Tensor) -> tuple[float, int]:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    tgt = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    return float(nll), tgt.numel()


@torch.no_grad()
def sleb_candidate_losses(model: PreTrainedModel, ids: torch.Tensor) -> list[float]:
    """Mean LM loss (nats/token) of the model without layer i, for every current layer i."""
    stack = find_decoder_stack(model)
    L = stack.num_layers
    cap = run_layers(model, ids, inputs_at=tuple(range(L)), stack=stack)
    layers = list(stack.layers)
    out = []
    for i in range(L):
        if i == L - 1:
            with skipping(model, [i]):
                s, t = _lm_loss_sum(model, ids)
            out.append(s / t)
            continue
        x = cap.inputs[i]

        def inject(module, args, kwargs, x=x):
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        h = layers[i + 1].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with layer_view(model, layers[i + 1:], list(range(i + 1, L))):
                s, t = _lm_loss_sum(model, ids)
        finally:
            h.remove()
        out.append(s / t)
    return out


def sleb(model: PreTrainedModel, calib: torch.Tensor, n: int, blocks: int = SLEB_BLOCKS,
         progress: bool = True) -> tuple[list[int], list[dict]]:
    """Greedy SLEB in place; returns the removed ORIGINAL indices (in removal order) and per-step records."""
    ids = calib[:blocks].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    alive = list(range(find_decoder_stack(model).num_layers))   # original index of each current layer
    removed, steps = [], []
    bar = tqdm(range(n), desc="sleb", unit="layer", disable=not progress)
    for step in bar:
        losses = sleb_candidate_losses(model, ids)
        j = min(range(len(losses)), key=lambda i: losses[i])
        orig = alive.pop(j)
        remove_layers(model, [j])
        removed.append(orig)
        steps.append({"step": step, "layer": orig, "ppl": math.exp(losses[j]),
                      "candidates_ppl": {str(alive_i): math.exp(v) for alive_i, v in
                                         zip(alive[:j] + [orig] + alive[j:], losses)}})
        bar.set_postfix(layer=orig, ppl=f"{math.exp(losses[j]):.3g}")
    model.train(was_training)
    return removed, steps


# ------------------------------------------------------------------------------------------------ entry point
def apply(name: str, model: PreTrainedModel, calib: torch.Tensor, profile: SimilarityProfile, n: int,
          cfg: RunConfig, chosen: dict | None = None):
    """chosen: the record of an earlier identical run (its `removed` layers): removed again, no search."""
    from llm_streamline.baselines import BaselineResult

    L = find_decoder_stack(model).num_layers
    if not 1 <= n < L:
        raise ValueError(f"{name}: cannot remove {n} of {L} layers")
    if chosen is not None:
        remove_layers(model, chosen["removed"])
        return BaselineResult(model=model, removed_layers=list(chosen["removed"]), record=chosen)
    if name == "shortgpt":
        removed = lowest_bi_layers(profile, n)
        remove_layers(model, removed)
        record = {"bi": profile.block_influence(), "removed": removed}
    elif name == "gromov":
        start = profile.best_start(n, GROMOV_METRIC)
        removed = list(range(start, start + n))
        remove_layers(model, removed)
        record = {"metric": GROMOV_METRIC, "start": start, "angular_distance": profile.last_angular[n][start],
                  "angular_last_token": profile.last_angular[n], "angular_all_tokens": profile.mean_angular[n],
                  "removed": removed}
    elif name == "sleb":
        order, steps = sleb(model, calib, n)
        removed = sorted(order)
        record = {"removal_order": order, "steps": steps, "calib_blocks": min(SLEB_BLOCKS, calib.shape[0]),
                  "removed": removed}
    else:
        raise ValueError(f"layer_removal: unknown method {name!r}")
    return BaselineResult(model=model, removed_layers=removed, record=record)
