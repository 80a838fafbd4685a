"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse", EMNLP Findings).

Sources: the paper's §3 (RDSC layer merge, Algorithm 1) and the official notebooks, github.com/yangyifei729/LaCo,
`laco_llama-13b.ipynb` / `laco-baic-13B.ipynb` (cells `merge_layers_return_model`, `cal_last_hidden_sim` and the
`while lay >= LOWEST_LAY` loop).

RDSC merge (Reserving-Differences-while-Seeking-Common). A collapse of C consecutive layers l..l+C-1 keeps layer l
with, for every Linear weight of its attention and MLP (q, k, v, o, gate, up, down; fused q/k/v and the other
families' equivalents),
    theta_l <- theta_l + sum_{k=1}^{C-1} (theta_{l+k} - theta_l)
and deletes layers l+1..l+C-1. Only those Linear weights are merged, as in the notebooks (which name q/k/v/o and
gate/up/down, or Baichuan's W_pack): the norms, the Linear biases and everything outside the layers stay those of
layer l. The Linears are found generically: every nn.Linear inside the decoder layer (attention and MLP are the
only modules of a decoder layer that hold Linears).
  Note: the notebooks accumulate into the copy and subtract the copy's *running* weight
  (`copy.w.add_(orig[l+k].w - copy.w)`), so their merged weight ends up equal to theta_{l+C-1}, not the paper's
  formula. We implement the paper's formula (the issue's definition of the method); record key "merge_rule".

Layer selection (the notebooks' loop; C = method.laco_merge, T = LACO_THRESHOLD, I = LACO_INTERVAL):
  lay starts at HIGHEST - C with HIGHEST = L - 1 (so the last layer is never merged, as in the notebooks);
  while lay >= LOWEST: collapse layers lay..lay+C-1 of the current model into a candidate (the count clipped to
  the layers left above lay); similarity s = mean over calibration samples of the cosine between the FLATTENED
  [tokens x hidden] final hidden states (`output_hidden_states[-1]`, after the final norm) of the candidate and of
  the ORIGINAL dense model; if s > T: keep it and lay -= I (and if lay is now beyond the shrunken model,
  lay = len - 1 - C); else lay -= 1.
Additions to remove exactly n layers (the notebooks remove however many the pass accepts):
  * a collapse never removes more than the layers still to remove (its C is clipped to remaining + 1), and the
    pass stops once n layers are gone;
  * if the pass ends short, each further collapse is the best-scoring candidate among all positions of the
    current model (recorded with "fallback": true) until n are removed.
Calibration: the first LACO_BLOCKS calibration blocks (the notebooks: 2-5 short Wikipedia sentences). Under
torchrun block j is run by rank j mod P and the float64 sums of the per-block cosines are added up over the ranks:
every rank gets the same similarities (one process's up to the order of the additions) and collapses the same
layers.
T, I: the values the paper reports for Llama2-7B (C=4, I=2, T=0.65; the notebooks use C=7, I=1, T=0.45 for
Llama-13B and C=3, I=1, T=0.6 for Baichuan-13B).
Removed indices are the original indices of the layers merged away (l+1..l+C-1 of each collapse).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_streamline.config import ConfigError, RunConfig
from llm_streamline.models.devices import input_device
from llm_streamline.models.layers import find_decoder_stack, layer_view, remove_block
from llm_streamline.parallel import mine, sum_over_ranks

LACO_THRESHOLD = 0.65   # the paper's T
LACO_INTERVAL = 2       # the paper's I: how far lay moves down after an accepted collapse
LACO_LOWEST = 0         # the notebooks' LOWEST_LAY
LACO_BLOCKS = 4         # calibration blocks for the similarity check (the notebooks: a few sentences)
MERGE_RULE = "paper: theta_l + sum_k (theta_{l+k} - theta_l), Linear weights only"


def merged_weight_names(layer: nn.Module) -> list[str]:
    """Parameter names (within the decoder layer) of the Linear weights RDSC merges."""
    return [f"{name}.weight" if name else "weight" for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def rdsc_merge(layers: list[nn.Module]) -> nn.Module:
    """A new layer: a copy of layers[0] whose Linear weights are theta_0 + sum_k (theta_k - theta_0)."""
    base = copy.deepcopy(layers[0])
    for name in merged_weight_names(base):
        w0 = layers[0].get_parameter(name)
        p = base.get_parameter(name)
        for other in layers[1:]:
            theirs = other.get_parameter(name)
            if theirs.shape != p.shape:
                raise ValueError(f"LaCo merges layers of one structure only ({name}: {tuple(theirs.shape)} vs "
                                 f"{tuple(p.shape)})")
            # under a device_map the merged layers may sit on different cards: the sum is formed on layer l's
            p.add_(theirs.to(p.device, p.dtype) - w0.to(p.device, p.dtype))
    return base


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor | None:
    """[N, T*H] final hidden states (after the final norm), one flattened row per calibration sample (None for
    no sample: a rank with none of the calibration blocks)."""
    if ids.shape[0] == 0:
        return None
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1].float().flatten(1)


def _mean_cos(h: torch.Tensor | None, ref: torch.Tensor | None, summed=None) -> float:
    """The mean over samples of cos(h, ref), summed in float64 (over the ranks' samples with `summed`)."""
    total = torch.zeros(2, dtype=torch.float64)
    if h is not None:
        cos = torch.nn.functional.cosine_similarity(h, ref.to(h.device), dim=-1)
        total = torch.stack([cos.double().sum().cpu(), torch.tensor(float(cos.numel()), dtype=torch.float64)])
    if summed is not None:
        total = summed(total)
    return float(total[0] / total[1])


@torch.no_grad()
def _similarity(model, ids, ref: torch.Tensor | None, start: int, c: int, summed=None) -> float:
    """Similarity to the dense model of the current model with layers start..start+c-1 collapsed."""
    if ids.shape[0] == 0:  # no calibration block on this rank: its zero sums still join the others'
        return _mean_cos(None, None, summed)
    layers = list(find_decoder_stack(model).layers)
    merged = rdsc_merge(layers[start:start + c])
    rows = list(range(start + 1)) + list(range(start + c, len(layers)))
    with layer_view(model, layers[:start] + [merged] + layers[start + c:], rows):
        return _mean_cos(_final_hidden(model, ids), ref, summed)


def collapse(model: PreTrainedModel, start: int, c: int) -> None:
    """In place: layers start..start+c-1 become one RDSC-merged layer at `start`."""
    stack = find_decoder_stack(model)
    merged = rdsc_merge(list(stack.layers[start:start + c]))
    # the merged layer takes the slot as a new module: loading it into layer `start` would write into weights
    # the pruned model shares with the dense one (`models.layers.share_weights`)
    remove_block(model, start, c, [merged])


class _Collapser:
    """The state of one LaCo run: the model being collapsed, original indices of its layers, the records."""

    def __init__(self, model, ids, ref, n: int, merge: int, bar, summed=None):
        self.model, self.ids, self.ref, self.n, self.merge, self.bar = model, ids, ref, n, merge, bar
        self.summed = summed  # `parallel.sum_over_ranks` under torchrun
        self.alive = list(range(find_decoder_stack(model).num_layers))
        self.removed: list[int] = []
        self.merges: list[dict] = []

    @property
    def layers(self) -> int:
        return len(self.alive)

    def size_at(self, lay: int) -> int:
        """C for a collapse at `lay`: the notebooks' clip to the layers above it, and to what is left to remove."""
        return min(self.merge, self.layers - lay, self.n - len(self.removed) + 1)

    def score(self, lay: int) -> float:
        return _similarity(self.model, self.ids, self.ref, lay, self.size_at(lay), self.summed)

    def accept(self, lay: int, s: float, fallback: bool, candidates: list) -> None:
        c = self.size_at(lay)
        gone = self.alive[lay + 1:lay + c]
        collapse(self.model, lay, c)
        del self.alive[lay + 1:lay + c]
        self.removed.extend(gone)
        self.merges.append({"into": self.alive[lay], "merged": gone, "similarity": s, "fallback": fallback,
                            "candidates": candidates})
        self.bar.update(len(gone))
        self.bar.set_postfix(into=self.alive[lay], sim=f"{s:.3f}", fallback=fallback)

    @property
    def done(self) -> bool:
        return len(self.removed) >= self.n


def _notebook_pass(st: _Collapser) -> None:
    """The notebooks' downward pass, stopped once n layers are removed."""
    highest = st.layers - 1
    lay = highest - st.merge
    tried = []
    while lay >= LACO_LOWEST and not st.done:
        if st.size_at(lay) < 2:   # nothing above lay to merge into it
            lay -= 1
            continue
        s = st.score(lay)
        tried.append((st.alive[lay], round(s, 6)))
        if s > LACO_THRESHOLD:
            st.accept(lay, s, False, tried)
            tried = []
            lay -= LACO_INTERVAL
            if lay >= st.layers:
                lay = st.layers - 1 - st.merge
        else:
            lay -= 1


def _fallback_collapse(st: _Collapser) -> None:
    """One collapse at the best-scoring position of the current model (the pass ended short of n)."""
    positions = [lay for lay in range(LACO_LOWEST, st.layers - 1) if st.size_at(lay) >= 2]
    if not positions:
        raise ConfigError(f"laco: no collapse position left with {st.layers} layers")
    tried = [(lay, st.score(lay)) for lay in positions]
    lay, s = max(tried, key=lambda t: t[1])
    st.accept(lay, s, True, [(st.alive[p], round(v, 6)) for p, v in tried])


@torch.no_grad()
def laco(model: PreTrainedModel, calib: torch.Tensor, n: int, merge: int, progress: bool = True, accelerator=None):
    """Collapse until exactly n layers are removed. Returns (removed original indices, per-merge records).
    accelerator: under torchrun the calibration blocks are shared by the ranks (module docstring)."""
    if merge < 2:
        raise ConfigError(f"method.laco_merge={merge}: a collapse needs at least 2 layers")
    L0 = find_decoder_stack(model).num_layers
    if not 1 <= n <= L0 - 1 - LACO_LOWEST:
        raise ConfigError(f"laco: cannot remove {n} of {L0} layers")
    ids = calib[:LACO_BLOCKS]
    ids = ids[[j for j in range(ids.shape[0]) if mine(j, accelerator)]].to(input_device(model))
    was_training = model.training
    model.eval()
    ref = _final_hidden(model, ids)
    with tqdm(total=n, desc="laco", unit="layer", disable=not progress) as bar:
        st = _Collapser(model, ids, ref, n, merge, bar, sum_over_ranks(accelerator))
        _notebook_pass(st)
        while not st.done:
            _fallback_collapse(st)
    model.train(was_training)
    return sorted(st.removed), st.merges


def apply(model: PreTrainedModel, calib: torch.Tensor, n: int, cfg: RunConfig, accelerator=None):
    from llm_streamline.baselines import BaselineResult

    main = accelerator is None or accelerator.is_main_process
    removed, merges = laco(model, calib, n, cfg.method.laco_merge, progress=main, accelerator=accelerator)
    record = {"merge": cfg.method.laco_merge, "threshold": LACO_THRESHOLD, "interval": LACO_INTERVAL,
              "lowest": LACO_LOWEST, "calib_blocks": min(LACO_BLOCKS, calib.shape[0]), "merge_rule": MERGE_RULE,
              "fallbacks": sum(m["fallback"] for m in merges), "merges": merges, "removed": removed}
    return BaselineResult(model=model, removed_layers=removed, record=record)
