"""LLM-Pruner (Ma et al., NeurIPS 2023): width pruning of coupled structures by first-order Taylor importance.

Why not torch-pruning: torch-pruning 1.6.1 (LLM-Pruner's engine) does not work with transformers 5.23. Its
tracer fails on the model output ("'tuple' object has no attribute 'grad_fn'"), and with
`output_transform=lambda o: o.logits` building the dependency graph of a 4-layer, 64-wide Llama did not
finish in 10 minutes. The coupling LLM-Pruner needs inside one decoder layer is small and known, so we
write it down directly, found from the modules each layer holds (no model names).

What is pruned (coupled structures; the residual width `hidden_size` is never changed)
  attention  method.attention_unit picks the unit (default `head`):
             head      one attention head, the paper's unit. Without GQA: its q, k and v rows and its input
                       columns of the output projection (LLaMA-1/2 in the authors' hf_prune.py). Under GQA (several
                       q heads share one k/v head) a q head's k/v rows serve the other heads of its group too, so
                       the head is its q rows (and q bias) and its o columns; k/v stay whole. Every KV group of a
                       layer loses the same number of q heads (the least important of each group), so the layer
                       keeps a uniform q-heads-per-KV-head ratio and the family's attention code runs with its
                       `num_key_value_groups` lowered. With a single KV head (MQA) q heads are pruned the same way.
             kv-group  one KV group = the k and v rows of one key/value head, the rows of the q heads that share
                       it and the matching o columns (what the authors' llama3.py prunes under GQA). With few
                       groups this is coarse (SmolLM2-135M: 3 groups of 3 q heads per layer); with one KV head
                       (MQA) the attention is left whole. Without GQA a group is one head, as `head`.
             Layouts: separate q/k/v + o/out projections (Llama, Mistral, Qwen2/3, Gemma2/3, OPT);
             GPT-NeoX's fused query_key_value (per head [q, k, v]) + dense (no GQA: a head is a group).
  MLP        one channel = a row of gate_proj and of up_proj and a column of down_proj (Llama-like);
             OPT fc1 row + fc2 column; GPT-NeoX dense_h_to_4h row + dense_4h_to_h column; Phi-3's fused
             gate_up_proj (row c and row I + c) + down_proj column c.
  Phi-3's attention slices its fused qkv with `config.num_attention_heads` (one config shared by all
  layers), so per-layer head counts cannot work there: such a layer raises an error, as does any layer
  whose attention or MLP is not one of the layouts above.

Importance (Taylor, LLM-Pruner's §3.2 and its code: github.com/horseee/LLM-Pruner
`LLMPruner/pruner/hf_llama_pruner.py` TaylorImportance, `llama3.py`). Gradients g of the LM loss (mean next-token
cross entropy) on `grad_samples` calibration sequences of `grad_seq_len` tokens (the first ones of `calib`,
truncated; the original: 10 bookcorpus samples of 64 tokens), one backward per sequence; g = mean of the
per-sequence gradients (the gradient of the batch loss, as the original computes it) and F = mean of the squared
per-sequence gradients (the original's `acc_grad`, for the second-order variants). Only the Linear WEIGHTS count
(TaylorImportance reads `layer.weight` only; biases are pruned with their rows but not scored). Per matrix the
salience s = w*g (element-wise) or a variant, reduced per row of the structure (a row: one output row of a
row-pruned matrix, one input column of a column-pruned one), then summed over the structure's rows and matrices
(the original's group_reduction="sum"):
  vector    sum_rows |sum_{entries of the row} w g|      (`vectorize`: salience.sum(1).abs() per matrix)
  element1  sum |w g|                                     (`param_first`, the original's scripts' choice)
  element2  sum |w^2 F|                                   (`param_second`: the second-order term alone)
  mix       sum |w g - 1/2 w^2 F|                         (`param_mix`: first- and second-order terms together;
                                                           the default of hf_prune.py's --taylor)
(Before issue 14, `vector` took one absolute value over the whole structure and `mix` was a normalised sum of
element1 and vector, which the original does not have; `element2` then meant what is now `mix`.)
The original's llama3.py folds q-channel importances onto the KV heads with `view(rep, n_kv*hd).sum(0)`, i.e. q
head h onto KV head h mod n_kv, while attention pairs q head h with KV head h // rep; we add each q head to the
KV head it attends with.
Structures are ranked within a layer and kind (q heads: within their KV group); the lowest are removed (ties:
the lower index is kept). A q head's score sums its q rows and o columns only (k/v are not removed with it).

How much: one ratio r for every pruned layer (layers first_layer .. L - last_layers_kept - 1; the first
and last ones are kept, as in LLM-Pruner): each layer loses round(r * G) of its G attention units (heads, or
KV groups; under GQA with unit `head`, round(r * R) of the R q heads of every KV group) and round(r * I) of its I
channels (at least one of each is kept, per KV group for q heads). r = method.width_ratio, or (null) the r
whose removed parameter count is closest to that of `n` whole decoder layers (the LLM-Streamline n-of-L
size). The record gives the achieved counts and per-layer sizes.

After pruning every Linear has its new in/out features, the attention modules' head counts
(`num_heads`, `num_key_value_heads`, `num_key_value_groups`, ... when they hold them) and MLP
`intermediate_size` are updated; `head_dim` and the config are unchanged (the config keeps the dense sizes;
the per-layer sizes, kv_groups, heads_per_kv_group and channels, live in the modules and in the saved
`llm_pruner_config.json`). The KV cache is created per layer from the tensors it is given, so generation with
a cache works with per-layer head counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from llm_streamline.config import ConfigError
from llm_streamline.models.checkpoints import register_builder
from llm_streamline.models.devices import input_device
from llm_streamline.models.layers import count_params, find_decoder_stack
from llm_streamline.parallel import mine, ranks

log = logging.getLogger(__name__)

IMPORTANCE = ("element1", "element2", "vector", "mix")
ATTENTION_UNITS = ("head", "kv-group")
ATTN_KINDS = ("attn", "q_heads")
ORIGINAL_NAME = {"vector": "vectorize", "element1": "param_first", "element2": "param_second", "mix": "param_mix"}
NEEDS_FISHER = ("element2", "mix")


class UnsupportedLayerError(ConfigError):
    """The model has a layer LLM-Pruner cannot prune exactly: bad input for method=llm_pruner (exit 2)."""


# ------------------------------------------------------------------------------------------- structures
@dataclass
class Member:
    """One matrix of a coupled structure: unit u owns, along `axis`, indices off + u*size + [0, size)."""
    linear: nn.Linear
    axis: int              # 0: output rows (and bias entries); 1: input columns
    size: int
    offsets: tuple[int, ...] = (0,)

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Weight indices (along `axis`) of `units`, in unit order: shape [len(units), len(offsets)*size]."""
        base = torch.arange(self.size)
        per_off = [off + units[:, None] * self.size + base[None, :] for off in self.offsets]
        return torch.cat(per_off, dim=1)

    def flat_indices(self, units: torch.Tensor) -> torch.Tensor:
        """The same indices in the matrix's own order (offset-major: e.g. all kept gate rows, then up rows)."""
        return torch.cat([off + units[:, None] * self.size + torch.arange(self.size)[None, :]
                          for off in self.offsets]).reshape(-1)


@dataclass
class Structure:
    kind: str                  # "attn" (KV groups, or heads with their k/v) | "q_heads" (GQA: q heads) | "mlp"
    layer: int
    module: nn.Module          # the attention or MLP module whose size attributes follow the pruning
    n_units: int
    members: list[Member] = field(default_factory=list)
    heads_per_unit: int = 1    # attn: q heads per KV group
    kv_per_unit: int = 1
    n_groups: int = 1          # the units form n_groups equal runs (q_heads: one per KV group, in the order
                               # repeat_kv pairs them: q head h attends KV head h // (n_units / n_groups)); each
                               # run loses the same number of units

    @property
    def per_group(self) -> int:
        return self.n_units // self.n_groups

    @property
    def unit_params(self) -> int:
        total = 0
        for m in self.members:
            lin = m.linear
            other = lin.in_features if m.axis == 0 else lin.out_features
            k = m.size * len(m.offsets)
            total += k * other + (k if m.axis == 0 and lin.bias is not None else 0)
        return total


def _linear(module, name):
    lin = getattr(module, name, None)
    return lin if isinstance(lin, nn.Linear) else None


def _attention_structure(layer: nn.Module, idx: int, cfg, unit: str) -> Structure:
    for _, mod in layer.named_modules():
        q, k, v = _linear(mod, "q_proj"), _linear(mod, "k_proj"), _linear(mod, "v_proj")
        o = _linear(mod, "o_proj") or _linear(mod, "out_proj")
        if q and k and v and o:
            hd = getattr(mod, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            n_q, n_kv = q.out_features // hd, k.out_features // hd
            if (q.out_features % hd or k.out_features % hd or v.out_features != k.out_features
                    or o.in_features != q.out_features or n_q % n_kv):
                raise UnsupportedLayerError(f"layer {idx} ({type(mod).__name__}): q/k/v/o sizes {q.out_features}, "
                                            f"{k.out_features}, {v.out_features}, {o.in_features} do not split "
                                            f"into heads of {hd}")
            rep = n_q // n_kv
            if unit == "head" and rep > 1:
                return Structure("q_heads", idx, mod, n_q, [Member(q, 0, hd), Member(o, 1, hd)], heads_per_unit=1,
                                 kv_per_unit=0, n_groups=n_kv)
            return Structure("attn", idx, mod, n_kv, [Member(q, 0, rep * hd), Member(k, 0, hd), Member(v, 0, hd),
                                                      Member(o, 1, rep * hd)], heads_per_unit=rep, kv_per_unit=1)
        qkv, dense = _linear(mod, "query_key_value"), _linear(mod, "dense")
        if qkv and dense:  # GPT-NeoX: per head [q, k, v] rows, no GQA
            hd = getattr(mod, "head_size", None) or cfg.hidden_size // cfg.num_attention_heads
            if qkv.out_features != 3 * dense.in_features or dense.in_features % hd:
                raise UnsupportedLayerError(f"layer {idx} ({type(mod).__name__}): fused qkv of unexpected size")
            return Structure("attn", idx, mod, dense.in_features // hd, [Member(qkv, 0, 3 * hd), Member(dense, 1, hd)])
        if _linear(mod, "qkv_proj") is not None:
            raise UnsupportedLayerError(
                f"layer {idx} ({type(mod).__name__}): its forward slices the fused qkv_proj with the shared "
                "config.num_attention_heads, so per-layer head pruning cannot work; llm_pruner cannot prune it")
    raise UnsupportedLayerError(f"layer {idx} ({type(layer).__name__}): no attention layout llm_pruner knows "
                                "(q/k/v/o projections or GPT-NeoX query_key_value)")


def _mlp_structure(layer: nn.Module, idx: int) -> Structure:
    for _, mod in layer.named_modules():
        gate, up, down = _linear(mod, "gate_proj"), _linear(mod, "up_proj"), _linear(mod, "down_proj")
        if gate and up and down:
            return Structure("mlp", idx, mod, down.in_features, [Member(gate, 0, 1), Member(up, 0, 1),
                                                                 Member(down, 1, 1)])
        gate_up = _linear(mod, "gate_up_proj")
        if gate_up and down and gate_up.out_features == 2 * down.in_features:
            i = down.in_features
            return Structure("mlp", idx, mod, i, [Member(gate_up, 0, 1, (0, i)), Member(down, 1, 1)])
        for a, b in (("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h")):
            fa, fb = _linear(mod, a), _linear(mod, b)
            if fa and fb and fa.out_features == fb.in_features:
                return Structure("mlp", idx, mod, fb.in_features, [Member(fa, 0, 1), Member(fb, 1, 1)])
    raise UnsupportedLayerError(f"layer {idx} ({type(layer).__name__}): no MLP layout llm_pruner knows "
                                "(gate/up/down, gate_up/down, fc1/fc2, dense_h_to_4h/dense_4h_to_h)")


def find_structures(model: PreTrainedModel, layers: list[int], attention_unit: str = "kv-group") -> list[Structure]:
    """Per layer its attention and MLP structures; attention_unit "head" gives q heads inside KV groups under GQA
    (the same as "kv-group" without GQA, where a group is one head)."""
    if attention_unit not in ATTENTION_UNITS:
        raise ConfigError(f"method.attention_unit={attention_unit!r}: expected one of {ATTENTION_UNITS}")
    stack = find_decoder_stack(model)
    out = []
    for i in layers:
        out.append(_attention_structure(stack.layers[i], i, stack.config, attention_unit))
        out.append(_mlp_structure(stack.layers[i], i))
    return out


# ------------------------------------------------------------------------------------------- importance
def taylor_gradients(model: PreTrainedModel, tokens: torch.Tensor, params: list[nn.Parameter],
                     with_fisher: bool = True, accelerator=None):
    """(g, F) per parameter (keyed by id): g = the mean per-sequence gradient of the LM loss, accumulated by
    autograd into each parameter's own `.grad` (g[id(p)] IS p.grad, in p's dtype: no second copy of the scored
    weights); F = the mean squared per-sequence gradient, summed in float32 by a hook on each parameter as the
    backward pass reaches its layer (empty unless `with_fisher`: only element2 and mix need it, and it is one
    more copy of the scored weights). The caller frees the gradients (`p.grad = None`) once a layer is scored.
    Under torchrun (`accelerator`) sequence j runs on rank j mod P and g and F are summed over the ranks in place
    (an all-reduce of each scored weight's gradient, on its card, in its dtype: no float64 copy of a 7B model's
    gradients), so every rank ranks the units as one process does (up to the order of the additions)."""
    was_training = model.training
    model.eval()
    saved = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    n = tokens.shape[0]
    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params} if with_fisher else {}

    def square_into(acc: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            acc.add_(grad.float().square(), alpha=float(n))  # grad is d(loss_j / n): n * grad^2 = grad_j^2 / n
            return grad
        return hook

    hooks = [p.register_hook(square_into(fisher[id(p)])) for p in params] if with_fisher else []
    device = input_device(model)
    try:
        for j in range(n):
            if not mine(j, accelerator):
                continue
            ids = tokens[j:j + 1].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / n).backward()   # .grad accumulates the mean over sequences
    finally:
        for h in hooks:
            h.remove()
        for p, r in saved.items():
            p.requires_grad_(r)
        model.train(was_training)
    if ranks(accelerator)[0] > 1:
        import torch.distributed as dist

        for p in params:  # a rank with no sequence has no .grad yet: zeros join the sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if with_fisher:
                dist.all_reduce(fisher[id(p)], op=dist.ReduceOp.SUM)
    return {id(p): p.grad for p in params}, fisher


def _row_terms(w: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """w, g, f: [units, rows, entries] (the structure's rows of one matrix). Per-unit sums of each variant."""
    wg = w * g
    terms = {"element1": wg.abs().sum((1, 2)), "vector": wg.sum(2).abs().sum(1)}
    if f is not None:
        second = w * w * f
        terms["element2"] = second.abs().sum((1, 2))
        terms["mix"] = (wg - 0.5 * second).abs().sum((1, 2))
    return terms


def _unit_terms(struct: Structure, g: dict, fisher: dict) -> dict[str, torch.Tensor]:
    """Per-unit importance of every variant the gradients allow, summed over the structure's matrices."""
    units = torch.arange(struct.n_units)
    total: dict[str, torch.Tensor] = {}
    for m in struct.members:
        t = m.linear.weight
        idx = m.indices(units).to(t.device)                  # [units, rows of the unit]
        w, gg, ff = t.detach().float(), g[id(t)], fisher.get(id(t))
        if m.axis == 1:                                      # a pruned input column is a row of the transpose
            w, gg = w.t(), gg.t()
            ff = ff.t() if ff is not None else None
        part = _row_terms(w[idx], gg[idx], ff[idx] if ff is not None else None)
        for k, v in part.items():
            total[k] = total.get(k, 0) + v.double().cpu()
    return total


def structure_scores(struct: Structure, g: dict, fisher: dict, importance: str) -> torch.Tensor:
    if importance not in IMPORTANCE:
        raise ConfigError(f"method.importance={importance!r}: expected one of {IMPORTANCE}")
    if importance in NEEDS_FISHER and not fisher:
        raise ValueError(f"{importance} needs the Fisher diagonal: taylor_gradients(..., with_fisher=True)")
    return _unit_terms(struct, g, fisher)[importance]


# ------------------------------------------------------------------------------------------- surgery
def _set_size_attrs(struct: Structure, kept: int) -> None:
    mod = struct.module
    if struct.kind == "q_heads":  # k/v heads stay: fewer q heads share each of them
        for name, value in (("num_heads", kept), ("num_attention_heads", kept),
                            ("num_key_value_groups", kept // struct.n_groups)):
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, value)
    elif struct.kind == "attn":
        for name, value in (("num_heads", kept * struct.heads_per_unit),
                            ("num_attention_heads", kept * struct.heads_per_unit),
                            ("num_key_value_heads", kept * struct.kv_per_unit),
                            ("num_kv_heads", kept * struct.kv_per_unit)):
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, value)
    else:
        for name in ("intermediate_size", "ffn_dim"):
            if isinstance(getattr(mod, name, None), int):
                setattr(mod, name, kept)


def prune_structure(struct: Structure, keep: torch.Tensor) -> None:
    """Keep units `keep` (sorted, original order) of `struct`, in place."""
    keep = torch.as_tensor(sorted(int(u) for u in keep), dtype=torch.long)
    per_group = torch.bincount(keep // struct.per_group, minlength=struct.n_groups)
    if len(per_group) != struct.n_groups or not (per_group == per_group[0]).all():  # repeat_kv needs it uniform
        raise ValueError(f"layer {struct.layer} {struct.kind}: keeps {per_group.tolist()} units of its "
                         f"{struct.n_groups} groups; every group must keep the same number")
    for m in struct.members:
        lin = m.linear
        idx = m.flat_indices(keep).to(lin.weight.device)
        w = lin.weight.detach().index_select(m.axis, idx).clone()
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        if m.axis == 0:
            lin.out_features = w.shape[0]
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.detach().index_select(0, idx).clone(),
                                        requires_grad=lin.bias.requires_grad)
        else:
            lin.in_features = w.shape[1]
    struct.n_units = len(keep)
    _set_size_attrs(struct, len(keep))


def _n_removed(n_units: int, ratio: float) -> int:
    """round(ratio * n_units) (halves up), keeping at least one unit."""
    return min(n_units - 1, int(math.floor(ratio * n_units + 0.5)))


def units_to_keep(scores: torch.Tensor, struct: Structure, n_rm_per_group: int) -> list[int]:
    """Within each group of `struct` the most important units, `n_rm_per_group` fewer than it has (ties: the
    lower index is kept); sorted."""
    per = struct.per_group
    keep = []
    for gi in range(struct.n_groups):
        group = range(gi * per, (gi + 1) * per)
        ranked = sorted(group, key=lambda u: (-float(scores[u]), u))
        keep += ranked[:per - n_rm_per_group]
    return sorted(keep)


def choose_ratio(structs: list[Structure], target: int, steps: int = 10000) -> float:
    """The ratio on a 1/steps grid whose removed parameter count is closest to `target` (ties: the smaller)."""
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    removed = torch.zeros_like(grid)
    for s in structs:
        k = torch.clamp(torch.floor(grid * s.per_group + 0.5), max=s.per_group - 1)
        removed += k * s.n_groups * s.unit_params
    err = (removed - target).abs()
    return float(grid[int(torch.nonzero(err == err.min())[0])])


# Row labels. The paper's unit is one attention head: its hf_prune.py (LLaMA-1/2, no GQA) roots the attention
# groups at q_proj with head_dim-sized consecutive channels, i.e. one head with its k/v rows. The authors have no
# per-head path under GQA: their llama3.py (and the disabled block in gemma.py) roots the groups at k_proj, so it
# prunes whole KV groups (github.com/horseee/LLM-Pruner, llama3.py, "root_instances": ... self_attn.k_proj).
# Our `head` unit under GQA (q rows + o columns of one q head, k/v shared and kept) is the paper's unit with its
# dependency rule applied to GQA (only the o columns depend on one q head's output), not the authors' code;
# it is labelled `llm_pruner` as the paper's recipe, and the record's attn_unit / heads_per_kv_group say what was
# pruned. KV-group rows are labelled "style". Neither label covers the data: our calibration and LoRA corpus.
LABELS = {"head": "llm_pruner", "kv-group": "llm_pruner_style(kv-group)"}


def attention_unit(structs: list[Structure]) -> str:
    """"head" when every attention unit is one head (q heads under GQA, or a head with its own k/v rows),
    else "kv-group"."""
    return "head" if all(s.heads_per_unit == 1 for s in structs if s.kind in ATTN_KINDS) else "kv-group"


# ------------------------------------------------------------------------------------------- entry points
def apply(model: PreTrainedModel, calib: torch.Tensor, n: int, cfg, target: int | None = None, accelerator=None):
    """target: parameters to remove (default: those of n decoder layers), when method.width_ratio is null.
    accelerator: under torchrun the gradient sequences are shared by the ranks (`taylor_gradients`)."""
    from llm_streamline.baselines import BaselineResult

    mc = cfg.method
    stack = find_decoder_stack(model)
    L = stack.num_layers
    layers = list(range(mc.first_layer, L - mc.last_layers_kept))
    if not layers:
        raise ConfigError(f"method.first_layer={mc.first_layer}, method.last_layers_kept={mc.last_layers_kept}: "
                          f"no layer of {L} left to prune")
    structs = find_structures(model, layers, mc.attention_unit)
    dense_params = count_params(model)
    target = n * count_params(stack.layers[0]) if target is None else target
    ratio = mc.width_ratio if mc.width_ratio is not None else choose_ratio(structs, target)

    tokens = calib[:mc.grad_samples, :mc.grad_seq_len]
    params = [m.linear.weight for s in structs for m in s.members]   # TaylorImportance scores weights only
    g, fisher = taylor_gradients(model, tokens, params, with_fisher=mc.importance in NEEDS_FISHER,
                                 accelerator=accelerator) if ratio > 0 else ({}, {})
    del params  # the dense weights of a pruned structure are freed once it is cut, not held to the end

    per_layer: dict[int, dict] = {}
    for s in structs:   # structure by structure: scored, cut, its gradients freed before the next
        n_rm = _n_removed(s.per_group, ratio)
        before = s.n_units
        scored = [m.linear.weight for m in s.members]
        if n_rm > 0:
            prune_structure(s, torch.tensor(units_to_keep(structure_scores(s, g, fisher, mc.importance), s, n_rm)))
        for p in scored:  # keyed by id: dropped before a freed parameter's id can be reused
            g.pop(id(p), None)
            fisher.pop(id(p), None)
            p.grad = None
        del scored
        per_layer.setdefault(s.layer, {}).update(_sizes_entry(s, before))
    pruned_params = count_params(model)
    unit = attention_unit(structs)
    record = {"label": LABELS[unit], "attn_unit": unit, "importance": mc.importance,
              "importance_original": ORIGINAL_NAME[mc.importance], "ratio": ratio, "width_ratio": mc.width_ratio,
              "layers_pruned": [layers[0], layers[-1] + 1], "grad_samples": int(tokens.shape[0]),
              "grad_seq_len": int(tokens.shape[1]), "target_params_removed": target if mc.width_ratio is None else None,
              "params_removed": dense_params - pruned_params, "params_dense": dense_params,
              "params_pruned": pruned_params, "layer_sizes": {str(k): v for k, v in per_layer.items()}}
    log.info("llm_pruner: ratio %.4f on layers [%d, %d): removed %d params (target %s)", ratio, layers[0],
             layers[-1] + 1, dense_params - pruned_params, target if mc.width_ratio is None else "-")
    # the config keeps the dense sizes: a stock checkpoint only if nothing was pruned
    checkpoint = ("stock", {}) if pruned_params == dense_params else ("llm_pruner", checkpoint_fields(model))
    return BaselineResult(model, removed_layers=[], record=record, checkpoint=checkpoint)


def _sizes_entry(s: Structure, before: int) -> dict:
    """The record's sizes of one pruned structure, kept and dense."""
    if s.kind == "mlp":
        return {"channels": s.n_units, "channels_dense": before}
    if s.kind == "q_heads":
        return {"kv_groups": s.n_groups, "kv_groups_dense": s.n_groups, "heads": s.n_units, "heads_dense": before,
                "heads_per_kv_group": s.per_group, "heads_per_kv_group_dense": before // s.n_groups}
    return {"kv_groups": s.n_units, "kv_groups_dense": before, "heads": s.n_units * s.heads_per_unit,
            "heads_dense": before * s.heads_per_unit, "heads_per_kv_group": s.heads_per_unit,
            "heads_per_kv_group_dense": s.heads_per_unit}


def _layer_sizes(model: PreTrainedModel) -> dict[str, dict]:
    stack = find_decoder_stack(model)
    sizes = {}
    for s in find_structures(model, list(range(stack.num_layers)), "kv-group"):
        entry = sizes.setdefault(str(s.layer), {})
        if s.kind == "attn":
            entry.update(kv_groups=s.n_units, heads_per_kv_group=s.heads_per_unit)
        else:
            entry["channels"] = s.n_units
    return sizes


def checkpoint_fields(model: PreTrainedModel) -> dict:
    """What the llm_pruner checkpoint format keeps beside the dense config: each layer's kept sizes."""
    return {"layer_sizes": _layer_sizes(model)}


def cut_to_saved_sizes(model: PreTrainedModel, meta: dict) -> None:
    """The llm_pruner format's builder: a dense model built from the saved config, each layer cut to its sizes
    (the weights are loaded afterwards)."""
    sizes = {int(k): v for k, v in meta["layer_sizes"].items()}
    for s in find_structures(model, sorted(sizes), "kv-group"):
        kept = sizes[s.layer]["kv_groups" if s.kind == "attn" else "channels"]
        if kept != s.n_units:
            prune_structure(s, torch.arange(kept))
    # then q heads inside the KV groups (heads_per_kv_group is absent from checkpoints written before per-head
    # pruning: those kept the dense ratio)
    for i, entry in sorted(sizes.items()):
        if entry.get("heads_per_kv_group") is not None:
            _cut_heads_per_kv_group(model, i, entry["heads_per_kv_group"])


def _cut_heads_per_kv_group(model: PreTrainedModel, layer: int, per_group: int) -> None:
    """Keep the first `per_group` q heads of every KV group of `layer`."""
    attn = find_structures(model, [layer], "head")[0]
    current = attn.per_group if attn.kind == "q_heads" else attn.heads_per_unit
    if per_group == current:
        return
    if attn.kind != "q_heads" or not 1 <= per_group < current:
        raise ValueError(f"layer {layer}: cannot keep {per_group} q heads per KV group of {current}")
    prune_structure(attn, torch.tensor([gi * current + h for gi in range(attn.n_groups) for h in range(per_group)]))


register_builder("llm_pruner", cut_to_saved_sizes)
