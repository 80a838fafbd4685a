"""Layer redundancy: how much a block of n contiguous layers changes the hidden state.

x^(0) is the embedding output and x^(l) the output of layer l-1 (the input of layer l). A block of n
layers starting at l maps x^(l) to x^(l+n). Scores, per token, averaged over tokens and samples:
  cosine   cos(x^(l), x^(l+n))                          (LLM-Streamline; higher = more redundant)
  angular  arccos(cos(x^(l), x^(l+n))) / pi, mean over ALL tokens   (sparsity.importance=angular for LLM-Streamline;
           lower = more redundant)
  angular_last  the same distance on the LAST token of each sample only, averaged over samples: Gromov et al.'s
           rule (arXiv 2403.17887, §3.2: the angular distance between the final token's representations x_T^(l)
           and x_T^(l+n)); `method=gromov` uses it.
  bi       Block Influence 1 - cos(x^(l), x^(l+1)), per layer (ShortGPT; lower = more redundant). For a
           contiguous block, BI = 1 - cos(x^(l), x^(l+n)) orders blocks exactly as `cosine` does.
  perplexity  calibration perplexity of the model with the block skipped (lower = more redundant): a
           functional score, one forward of the calibration subset per candidate start (`block_perplexities`)
x^(L) is the un-normed output of the last layer, captured by a hook: `output_hidden_states` would give the
final-norm output instead. The final norm and the LM head are never run. Calibration blocks have no
padding, so every token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llm_streamline.losses import nll_batches
from llm_streamline.models.devices import input_device, is_sharded
from llm_streamline.models.layers import find_decoder_stack, run_layers, skipping
from llm_streamline.parallel import mine, shares, sum_over_ranks

PPL_IMPORTANCE_BLOCKS = 8  # calibration blocks per candidate for sparsity.importance=perplexity (as SLEB's 8)


@dataclass
class SimilarityProfile:
    """mean_cos[n][l] = mean cos(x^(l), x^(l+n)); mean_angular likewise (angular distance, all tokens);
    last_angular[n][l]: the angular distance at the last token of each sample, averaged over samples (Gromov)."""
    num_layers: int
    mean_cos: dict[int, list[float]]
    mean_angular: dict[int, list[float]]
    tokens: int
    last_angular: dict[int, list[float]] = field(default_factory=dict)

    def block_scores(self, n: int, metric: str) -> list[float]:
        """Higher = more redundant, for every start l in [0, L-n]."""
        if metric == "cosine":
            return self.mean_cos[n]
        if metric == "angular":
            return [-a for a in self.mean_angular[n]]
        if metric == "angular_last":
            if n not in self.last_angular:
                raise ValueError("this similarity profile has no last-token angular distances (an older cache entry)")
            return [-a for a in self.last_angular[n]]
        raise ValueError(f"metric {metric!r} scores blocks; use cosine, angular or angular_last")

    def best_start(self, n: int, metric: str = "cosine") -> int:
        scores = self.block_scores(n, metric)
        return max(range(len(scores)), key=lambda i: scores[i])

    def block_influence(self) -> list[float]:
        return [1.0 - c for c in self.mean_cos[1]]

    def as_dict(self) -> dict:
        return {"num_layers": self.num_layers, "tokens": self.tokens,
                "cosine": {str(n): v for n, v in self.mean_cos.items()},
                "angular": {str(n): v for n, v in self.mean_angular.items()},
                "angular_last": {str(n): v for n, v in self.last_angular.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SimilarityProfile":
        def by_n(key):
            return {int(k): v for k, v in (d.get(key) or {}).items()}

        return cls(num_layers=d["num_layers"], tokens=d["tokens"], mean_cos=by_n("cosine"),
                   mean_angular=by_n("angular"), last_angular=by_n("angular_last"))


def _normalise(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _BlockSums:
    """Running sums over samples of the per-block scores (cos, angular over all tokens, angular at the last token).

    The sums are float64 on the CPU; each batch's per-block sums are computed where the states are (x^(l) and
    x^(l+n) on the card of layer l when a device_map splits the layers) and brought to the CPU together, one
    transfer per block size and score."""

    def __init__(self, ns: list[int], max_layer: int):
        self.ns, self.max_layer = ns, max_layer
        self.cos = {n: torch.zeros(max_layer - n + 1, dtype=torch.float64) for n in ns}
        self.ang = {n: torch.zeros(max_layer - n + 1, dtype=torch.float64) for n in ns}
        self.ang_last = {n: torch.zeros(max_layer - n + 1, dtype=torch.float64) for n in ns}
        self.tokens = self.samples = 0

    def add(self, states: list[torch.Tensor]) -> None:
        """states[j] = x^(j) for j = 0..max_layer, each [B, T, H] (normalised here)."""
        states = [_normalise(h) for h in states]
        moved: dict[tuple[int, torch.device], torch.Tensor] = {}

        def on(j: int, device: torch.device) -> torch.Tensor:
            """x^(j) on `device`: a copy made once per batch when layer j's card is another one."""
            if states[j].device == device:
                return states[j]
            if (j, device) not in moved:
                moved[(j, device)] = states[j].to(device)
            return moved[(j, device)]

        def to_cpu(sums: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([s.to(states[0].device) for s in sums]).double().cpu()

        for n in self.ns:
            cos_s, ang_s, last_s = [], [], []
            for start in range(self.max_layer - n + 1):
                cos = (states[start] * on(start + n, states[start].device)).sum(-1).clamp(-1.0, 1.0)   # [B, T]
                ang = torch.arccos(cos) / torch.pi
                cos_s.append(cos.sum())
                ang_s.append(ang.sum())
                last_s.append(ang[:, -1].sum())   # Gromov et al. §3.2: the final token
            self.cos[n] += to_cpu(cos_s)
            self.ang[n] += to_cpu(ang_s)
            self.ang_last[n] += to_cpu(last_s)
        self.tokens += states[0].shape[0] * states[0].shape[1]
        self.samples += states[0].shape[0]

    def reduce(self, summed) -> None:
        """Every rank's sums added up (`parallel.sum_over_ranks`): the sums of all the ranks' batches."""
        parts = [self.cos[n] for n in self.ns] + [self.ang[n] for n in self.ns] + [self.ang_last[n] for n in self.ns]
        flat = summed(torch.cat([*parts, torch.tensor([self.tokens, self.samples], dtype=torch.float64)]))
        i = 0
        for d in (self.cos, self.ang, self.ang_last):
            for n in self.ns:
                d[n] = flat[i:i + d[n].numel()].clone()
                i += d[n].numel()
        self.tokens, self.samples = int(flat[i].item()), int(flat[i + 1].item())

    def profile(self, num_layers: int) -> SimilarityProfile:
        return SimilarityProfile(num_layers=num_layers, tokens=self.tokens,
                                 mean_cos={n: (v / self.tokens).tolist() for n, v in self.cos.items()},
                                 mean_angular={n: (v / self.tokens).tolist() for n, v in self.ang.items()},
                                 last_angular={n: (v / self.samples).tolist() for n, v in self.ang_last.items()})


def profile_from_states(batches: list[list[torch.Tensor]], ns: list[int]) -> SimilarityProfile:
    """A profile from given hidden states: batches[b][j] = x^(j) [B, T, H] for j = 0..L (L + 1 tensors)."""
    L = len(batches[0]) - 1
    sums = _BlockSums(sorted(set(ns)), L)
    for states in batches:
        sums.add(states)
    return sums.profile(L)


@torch.no_grad()
def similarity_profile(model: PreTrainedModel, blocks: torch.Tensor, ns: list[int], batch_size: int = 8,
                       max_layer: int | None = None, progress: bool = True, accelerator=None) -> SimilarityProfile:
    """Score every block of every size in `ns` on calibration `blocks` [N, T].

    Only layers 0..max_layer-1 run (default: all, needed to score blocks ending at the last layer).
    Hidden states are reduced to per-token cosines batch by batch, so memory does not grow with N.
    With an `accelerate.Accelerator` (torchrun), batch k runs on rank k mod P only and the float64 sums are
    added up over the ranks: every rank gets the one-process profile (up to the order of the additions). A sharded
    model (`model.shard=fsdp`) runs as many forwards on every rank (`parallel.shares`).
    """
    stack = find_decoder_stack(model)
    L = stack.num_layers
    max_layer = L if max_layer is None else max_layer
    ns = sorted({n for n in ns if 1 <= n <= max_layer})
    if not ns:
        raise ValueError(f"no block size in {ns} fits a model with {L} layers")
    device = input_device(model)
    sums = _BlockSums(ns, max_layer)
    count = -(-blocks.shape[0] // batch_size)
    for k, counted in tqdm(shares(count, accelerator, lockstep=is_sharded(model)), desc="similarity profile",
                           disable=not progress, unit="batch"):
        ids = blocks[k * batch_size:(k + 1) * batch_size].to(device)
        cap = run_layers(model, ids, inputs_at=(0,), outputs_at=tuple(range(max_layer)), stack=stack)
        if counted:  # a sharded model's lockstep filler (a repeated batch) is run, not counted
            sums.add([cap.inputs[0]] + [cap.outputs[j] for j in range(max_layer)])
        del cap
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        sums.reduce(summed)
    return sums.profile(L)


@torch.no_grad()
def block_perplexities(model: PreTrainedModel, blocks: torch.Tensor, n: int, batch_size: int = 8,
                       progress: bool = True, accelerator=None) -> list[float]:
    """Calibration perplexity of `model` with layers [l, l+n) skipped (each returns its input), for every
    start l in [0, L-n]. Token-weighted over `blocks` [N, T] (no padding). Under torchrun (`accelerator`) the
    candidates are shared, start l on rank l mod P (the calibration subset is a batch or two: its batches would
    leave most ranks idle), each scored whole by its rank; the float64 (NLL, tokens) of every candidate, zero
    where another rank scored it, are summed over the ranks, so every rank gets the one-process values exactly.
    A sharded model (every forward a collective: all ranks must skip the same layers) shares each candidate's
    batches instead."""
    L = find_decoder_stack(model).num_layers
    starts = range(L - n + 1)
    sums = torch.zeros(len(starts), 2, dtype=torch.float64)
    sharded = is_sharded(model)
    here = list(starts) if sharded else [start for start in starts if mine(start, accelerator)]
    for start in tqdm(here, desc=f"block perplexity (n={n})", disable=not progress, unit="block"):
        with skipping(model, range(start, start + n)):
            nll, count = 0.0, 0
            # the head in chunks of positions
            for _, _, s, c in nll_batches(model, blocks, batch_size, accelerator if sharded else None):
                nll, count = nll + float(s), count + c
        sums[start] = torch.tensor([nll, count], dtype=torch.float64)
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        sums = summed(sums)
    return [math.exp(nll / count) for nll, count in sums.tolist()]


def choose_block(profile: SimilarityProfile, n: int, metric: str) -> int:
    """The start of the n-layer block to remove under `metric` (cosine/angular: contiguous argmax)."""
    return profile.best_start(n, metric)


def lowest_bi_layers(profile: SimilarityProfile, n: int) -> list[int]:
    """ShortGPT: the n layers with the lowest Block Influence (not necessarily contiguous), sorted."""
    bi = profile.block_influence()
    return sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:n])
