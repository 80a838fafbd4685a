"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse").

Reserving-Differences-while-Seeking-Common (RDSC) layer merge: a collapse of c consecutive layers l..l+c-1
keeps one layer with parameters
    theta_l <- theta_l + sum_{k=1}^{c-1} (theta_{l+k} - theta_l)
(every parameter of the layer, norms included) and deletes layers l+1..l+c-1 (c-1 layers removed).

Exact rule implemented (the paper's Algorithm 1, with a fixed removal count):
  c = method.laco_merge (the paper's C: layers per collapse, so one merge removes c-1 layers); the last merge
      uses c = remaining + 1 when fewer than c-1 layers are still to be removed, so exactly n are removed.
  Merge range: layers [LACO_LOWEST, L) (the first layer is never merged into, as in the paper's ranges).
  l starts at L - c (the top collapse) and moves downward. For a candidate l the collapsed model M_tmp is
  scored by s = mean over calibration tokens of cos(h_L(M_tmp), h_L(M)) where h_L is the last decoder layer's
  (un-normed) output and M the DENSE model (the paper compares with the original model), on the first
  LACO_BLOCKS calibration blocks. If s > LACO_THRESHOLD the collapse is kept and l <- l - LACO_INTERVAL
  (minimum interval between merges, the paper's I), clipped to the top of the shrunken model; else l <- l - 1.
Simplifications / additions (documented deviations):
  * the paper stops when l falls below the range; to remove exactly n layers we instead, when a downward
    scan finds no candidate above the threshold, accept the best-scoring candidate of that scan (equivalent
    to lowering T just enough for this merge), and restart from the top when l leaves the range;
  * similarity uses the un-normed last-layer hidden state on a few calibration blocks (paper: final
    hidden representation on a few sentences); T, I and the block count are module constants.
Removed indices are the original indices of the layers merged away (l+1..l+c-1 of each collapse).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_streamline.config import RunConfig
from llm_streamline.models.layers import find_decoder_stack, run_layers

LACO_THRESHOLD = 0.65   # the paper's T
LACO_INTERVAL = 2       # the paper's I: minimum distance between successive collapses
LACO_LOWEST = 1         # lowest layer a collapse may start at
LACO_BLOCKS = 4         # calibration blocks for the similarity check (the paper: a few sentences)


@torch.no_grad()
def rdsc_merge(layers: list[nn.Module]) -> nn.Module:
    """A new layer: theta_0 + sum_k (theta_k - theta_0) over the given same-class layers."""
    base = copy.deepcopy(layers[0])
    params = dict(base.named_parameters())
    for other in layers[1:]:
        theirs = dict(other.named_parameters())
        if set(theirs) != set(params):
            raise ValueError("LaCo merges layers of one structure only")
        for k, p in params.items():
            p.add_(theirs[k].to(p.dtype) - layers[0].get_parameter(k).to(p.dtype))
    return base


def _last_hidden(model, ids, stack) -> torch.Tensor:
    cap = run_layers(model, ids, outputs_at=(stack.num_layers - 1,), stack=stack)
    h = cap.outputs[stack.num_layers - 1].float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _similarity(model, ids, ref: torch.Tensor, start: int, c: int) -> float:
    """cos of the last hidden state of the model with layers l..l+c-1 collapsed, vs the dense reference."""
    from llm_streamline.baselines.layer_removal import layer_view

    stack = find_decoder_stack(model)
    layers = list(stack.layers)
    merged = rdsc_merge(layers[start:start + c])
    L = len(layers)
    rows = list(range(start + 1)) + list(range(start + c, L))
    with layer_view(model, layers[:start] + [merged] + layers[start + c:], rows):
        h = _last_hidden(model, ids, find_decoder_stack(model))
    return float((h * ref).sum(-1).mean())


def collapse(model: PreTrainedModel, start: int, c: int) -> None:
    """In place: layers l..l+c-1 become one RDSC-merged layer at l."""
    from llm_streamline.prune import remove_block

    stack = find_decoder_stack(model)
    merged = rdsc_merge(list(stack.layers[start:start + c]))
    stack.layers[start].load_state_dict(merged.state_dict())
    remove_block(model, start + 1, c - 1, [])


def laco(model: PreTrainedModel, calib: torch.Tensor, n: int, merge: int, progress: bool = True):
    """Collapse until exactly n layers are removed. Returns (removed original indices, per-merge records)."""
    if merge < 2:
        raise ValueError(f"method.laco_merge={merge}: a collapse needs at least 2 layers")
    ids = calib[:LACO_BLOCKS].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    stack = find_decoder_stack(model)
    L0 = stack.num_layers
    if not 1 <= n <= L0 - 1 - LACO_LOWEST:
        raise ValueError(f"laco: cannot remove {n} of {L0} layers with merges starting at layer {LACO_LOWEST}")
    ref = _last_hidden(model, ids, stack)
    alive = list(range(L0))
    removed, merges = [], []
    bar = tqdm(total=n, desc="laco", unit="layer", disable=not progress)
    pos_hi = None
    while len(removed) < n:
        c = min(merge, n - len(removed) + 1)
        L = find_decoder_stack(model).num_layers
        top = L - c
        if pos_hi is None or pos_hi > top or pos_hi < LACO_LOWEST:
            pos_hi = top
        best, fallback, tried = [-2.0, None], False, []
        scan = functools.partial(_scan, model, ids, ref, alive, c, best, tried)
        chosen = scan(range(pos_hi, LACO_LOWEST - 1, -1))
        if chosen is None and pos_hi != top:
            # the paper's scan would continue from the top of the range on the next pass
            chosen = scan(range(top, pos_hi, -1))
        if chosen is None:
            # no candidate passed T: take the scan's best (see the docstring)
            chosen, fallback = best[1], True
        s = next(v for i, v in tried if i == alive[chosen])
        gone = alive[chosen + 1:chosen + c]
        collapse(model, chosen, c)
        del alive[chosen + 1:chosen + c]
        removed.extend(gone)
        merges.append({"into": alive[chosen], "merged": gone, "similarity": s, "fallback": fallback,
                       "candidates": tried})
        bar.update(len(gone))
        bar.set_postfix(into=alive[chosen], sim=f"{s:.3f}")
        pos_hi = chosen - LACO_INTERVAL
    bar.close()
    model.train(was_training)
    return sorted(removed), merges


def _scan(model, ids, ref, alive, c, best: list, tried: list, positions) -> int | None:
    """First position (downwards) whose c-layer merge keeps the similarity above T; records every
    candidate in `tried` and the best seen in `best` ([similarity, position])."""
    for pos in positions:
        s = _similarity(model, ids, ref, pos, c)
        tried.append((alive[pos], round(s, 6)))
        if s > best[0]:
            best[:] = [s, pos]
        if s > LACO_THRESHOLD:
            return pos
    return None


def apply(model: PreTrainedModel, calib: torch.Tensor, n: int, cfg: RunConfig):
    from llm_streamline.baselines import BaselineResult

    removed, merges = laco(model, calib, n, cfg.method.laco_merge)
    record = {"merge": cfg.method.laco_merge, "threshold": LACO_THRESHOLD, "interval": LACO_INTERVAL,
              "lowest": LACO_LOWEST, "calib_blocks": min(LACO_BLOCKS, calib.shape[0]), "merges": merges,
              "removed": removed}
    return BaselineResult(model=model, removed_layers=removed, record=record)
