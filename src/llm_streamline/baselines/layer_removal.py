"""Depth-pruning baselines that delete whole decoder layers (no replacement network).

  shortgpt  ShortGPT (Men et al. 2024): Block Influence BI_l = 1 - mean cos(x^(l), x^(l+1)) from the similarity
            profile (calibration data); the n layers with the lowest BI are removed (not necessarily
            contiguous). No training.
  gromov    Gromov et al. 2024 (arXiv 2403.17887 §3.2): the contiguous block [l, l+n) with the smallest angular
            distance arccos(cos(x_T^(l), x_T^(l+n))) / pi between the LAST token's representations, averaged over
            the calibration samples (`importance` metric "angular_last"; the all-token mean "angular" is
            LLM-Streamline's sparsity.importance=angular, recorded beside it); healing (LoRA) is applied afterwards
            by the recipe (`train.train_lora`) when `method.heal=lora` (the `gromov` preset sets it).
  sleb      SLEB (Song et al. 2024; github.com/jiwonsong-dev/SLEB `sleb.py`): greedy, n steps; at each step every
            remaining layer but the first and the last (sleb.py's early_barrier = latter_barrier = 1) is tried
            out and the one whose removal gives the lowest summed NLL on the calibration windows (sleb.py's
            `nlls`; the same order as perplexity) is removed. Calibration: method.sleb_samples windows of
            method.sleb_seq_len tokens cut from the concatenated calibration blocks (the paper and sleb.py: 128
            x 2048, the `sleb_gpu` preset; the CPU preset `sleb`: 4 x data.seq_len). Efficient but exact:
            the hidden state entering every layer of the
            current model is captured once per step; a candidate i is then scored by running only layers
            i+1.. (plus the final norm and head) from the cached x^(i) (the model's own forward on a view of the
            layer list whose first layer's input is swapped for x^(i)). The last layer is scored by a full
            forward with a hook that makes it return its input.

Removal keeps config.num_hidden_layers, per-layer config arrays (layer_types, ...) and every layer_idx
consistent (`models.layers.remove_layers`), so the result is a stock checkpoint.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_streamline.config import ConfigError, RunConfig, infer_batch_size
from llm_streamline.importance import SimilarityProfile, lowest_bi_layers
from llm_streamline.losses import nll_sum
from llm_streamline.models.devices import input_device, is_sharded
from llm_streamline.models.layers import find_decoder_stack, layer_view, remove_layers, run_layers, skipping
from llm_streamline.parallel import shares, sum_over_ranks

GROMOV_METRIC = "angular_last"   # Gromov et al. §3.2: the final token's representation
SLEB_BLOCKS = 4   # calibration samples scored per SLEB candidate when none is given (cost: ~n * L^2 / 2 layer forwards)
SLEB_BARRIERS = (1, 1)   # SLEB's sleb.py: early_barrier = latter_barrier = 1 (first and last layer never removed)


# ------------------------------------------------------------------------------------------------ helpers
def _lm_loss_sum(model, ids: torch.Tensor) -> tuple[float, int]:
    nll, count = nll_sum(model, ids)  # the head in chunks of positions
    return float(nll), count


@torch.no_grad()
def _candidate_loss_sums(model: PreTrainedModel, ids: torch.Tensor, candidates: list[int]) -> tuple[list[float], int]:
    """Summed LM loss (nats) on `ids` of the model without layer i, for each i in `candidates`; and the token count."""
    stack = find_decoder_stack(model)
    L = stack.num_layers
    cap = run_layers(model, ids, inputs_at=tuple(candidates), stack=stack)
    layers = list(stack.layers)
    out, tokens = [], 0
    for i in candidates:
        if i == L - 1:
            with skipping(model, [i]):
                s, tokens = _lm_loss_sum(model, ids)
            out.append(s)
            continue
        x = cap.inputs[i]

        def inject(module, args, kwargs, x=x):
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        h = layers[i + 1].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with layer_view(model, layers[i + 1:], list(range(i + 1, L))):
                s, tokens = _lm_loss_sum(model, ids)
        finally:
            h.remove()
        out.append(s)
    return out, tokens


def sleb_candidate_losses(model: PreTrainedModel, ids: torch.Tensor, candidates: list[int] | None = None,
                          batch_size: int | None = None, accelerator=None) -> list[float]:
    """Mean LM loss (nats/token) over `ids` of the model without layer i, for each candidate i (default: every
    current layer), `batch_size` samples at a time. With an `accelerate.Accelerator` (torchrun), batch k is scored
    by rank k mod world only and the float64 sums of NLL and tokens are summed over ranks (`accelerator.reduce`):
    every rank gets the same losses, equal to one process's up to the order of the float64 additions. A sharded
    model (`model.shard=fsdp`) runs the same candidates, layers and number of batches on every rank
    (`parallel.shares`), so FSDP's all-gathers pair up."""
    L = find_decoder_stack(model).num_layers
    candidates = list(range(L)) if candidates is None else list(candidates)
    step = batch_size or ids.shape[0]
    sums, tokens = [0.0] * len(candidates), 0
    for k, counted in shares(-(-ids.shape[0] // step), accelerator, lockstep=is_sharded(model)):
        part, t = _candidate_loss_sums(model, ids[k * step:(k + 1) * step], candidates)
        if counted:  # a sharded model's lockstep filler (a repeated batch) is run, not counted
            sums = [a + p for a, p in zip(sums, part)]
            tokens += t
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        total = summed(torch.tensor([*sums, tokens], dtype=torch.float64))
        sums, tokens = total[:-1].tolist(), total[-1].item()
    return [v / tokens for v in sums]


def sleb_tokens(calib: torch.Tensor, samples: int | None, seq_len: int | None) -> torch.Tensor:
    """SLEB's calibration windows: the calibration blocks concatenated and cut into `samples` windows of `seq_len`
    tokens (SLEB's `nlls` cuts its concatenated calibration text into model.seqlen windows the same way);
    null = the blocks as they are (all of them / their own length)."""
    if seq_len is None:
        return calib if samples is None else calib[:samples]
    flat = calib.reshape(-1)
    count = flat.numel() // seq_len if samples is None else samples
    if count < 1 or count * seq_len > flat.numel():
        raise ConfigError(f"method.sleb_samples={samples} x method.sleb_seq_len={seq_len} needs {count * seq_len} "
                          f"calibration tokens; the data gives {flat.numel()}")
    return flat[:count * seq_len].view(count, seq_len)


def sleb(model: PreTrainedModel, calib: torch.Tensor, n: int, blocks: int | None = SLEB_BLOCKS,
         progress: bool = True, seq_len: int | None = None, batch_size: int | None = None,
         barriers: tuple[int, int] = SLEB_BARRIERS, accelerator=None) -> tuple[list[int], list[dict]]:
    """Greedy SLEB in place; returns the removed ORIGINAL indices (in removal order) and per-step records.
    The first barriers[0] and last barriers[1] current layers are never candidates (sleb.py's early_barrier /
    latter_barrier, both 1 by default). With an `accelerate.Accelerator` (torchrun) the calibration windows are
    scored data-parallel (`sleb_candidate_losses`): every rank removes the same layers."""
    ids = sleb_tokens(calib, blocks, seq_len).to(input_device(model))
    was_training = model.training
    model.eval()
    alive = list(range(find_decoder_stack(model).num_layers))   # original index of each current layer
    if len(alive) - sum(barriers) < n:
        raise ConfigError(f"sleb: cannot remove {n} of {len(alive)} layers with the first {barriers[0]} and last "
                          f"{barriers[1]} kept")
    removed, steps = [], []
    bar = tqdm(range(n), desc="sleb", unit="layer", disable=not progress)
    for step in bar:
        candidates = list(range(barriers[0], len(alive) - barriers[1]))
        losses = sleb_candidate_losses(model, ids, candidates, batch_size, accelerator)
        k = min(range(len(losses)), key=lambda i: losses[i])
        j = candidates[k]
        steps.append({"step": step, "layer": alive[j], "ppl": math.exp(losses[k]),
                      "candidates_ppl": {str(alive[c]): math.exp(v) for c, v in zip(candidates, losses)}})
        removed.append(alive.pop(j))
        remove_layers(model, [j])
        bar.set_postfix(layer=removed[-1], ppl=f"{math.exp(losses[k]):.3g}")
    model.train(was_training)
    return removed, steps


# ------------------------------------------------------------------------------------------------ entry point
def apply(name: str, model: PreTrainedModel, calib: torch.Tensor, profile: SimilarityProfile, n: int,
          cfg: RunConfig, chosen: dict | None = None, accelerator=None):
    """chosen: the record of an earlier identical run (its `removed` layers): removed again, no search.
    accelerator: SLEB's search shared by data-parallel ranks (the other methods ignore it)."""
    from llm_streamline.baselines import BaselineResult

    L = find_decoder_stack(model).num_layers
    if not 1 <= n < L:
        raise ConfigError(f"{name}: cannot remove {n} of {L} layers")
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
        mc = cfg.method
        main = accelerator is None or accelerator.is_main_process
        order, steps = sleb(model, calib, n, blocks=mc.sleb_samples, seq_len=mc.sleb_seq_len,
                            batch_size=infer_batch_size(cfg), progress=main, accelerator=accelerator)
        removed = sorted(order)
        ids = sleb_tokens(calib, mc.sleb_samples, mc.sleb_seq_len)
        record = {"removal_order": order, "steps": steps, "calib_samples": int(ids.shape[0]),
                  "calib_seq_len": int(ids.shape[1]), "barriers": list(SLEB_BARRIERS), "removed": removed}
    else:
        raise ValueError(f"layer_removal: unknown method {name!r}")
    return BaselineResult(model=model, removed_layers=removed, record=record)
