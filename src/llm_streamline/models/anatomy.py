"""Where the parts of a decoder layer are, found by running it once: no family names, no attribute names.

The questions SliceGPT's layer adapters answer per family (which norm feeds the attention and which the MLP,
which maps read the normed stream and which write back) are answered here for any family by watching one call
of the layer, as the model calls it. Every norm-like module (a leaf whose parameters are vectors of the hidden
size: RMSNorm, LayerNorm) and every map by a weight matrix (nn.Linear, GPT-2's Conv1D) is recorded with the
tensors it read and returned, compared by identity:
  - the norms whose output a map reads feed the attention (the first of them) and the MLP (the last: the MLP
    runs after the attention; Gemma's post-attention norm feeds no map and is skipped);
  - the MLP's input maps read the pre-MLP norm's output; its output map is the last map the layer calls; the
    attention's output map is the last one called before the MLP's first; its input maps read the
    pre-attention norm's output (one norm feeding both, as in parallel blocks, is split by which child of the
    layer holds the map);
  - a post-MLP norm (Gemma) is a norm that reads the MLP output map's output;
  - the attention and the MLP are the innermost modules holding all their maps; an MLP whose maps sit on the
    layer itself (OPT) is given as its parts in call order (fc1, activation, fc2).
A post-norm layer (norms after the residual add) has no pre-MLP norm and is refused with one line.
Paths are attribute paths inside the layer (`layer.get_submodule(path)`); the layers of one stack share one
class, so the anatomy of one is that of all.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llm_streamline.config import ConfigError
from llm_streamline.models.devices import input_device
from llm_streamline.models.layers import find_decoder_stack, run_layers


class AnatomyError(ConfigError):
    """The model's layers cannot be probed for what the replacement needs: bad input for it (exit 2)."""


@dataclass(frozen=True)
class Anatomy:
    attention_norm: str                 # the norm whose output the attention's input maps read
    attention: str                      # the module holding the attention's maps
    attention_inputs: tuple[str, ...]   # q, k, v (or one fused map), in call order
    attention_output: str               # the map writing the attention's output (o_proj, out_proj, dense)
    mlp_norm: str                       # the norm whose output the MLP reads
    mlp: tuple[str, ...]                # the MLP: one module, or its parts in call order when they sit on the layer
    mlp_inputs: tuple[str, ...]         # gate and up (or one map), in call order
    mlp_output: str                     # down_proj, fc2, dense_4h_to_h
    mlp_post_norm: str | None           # a norm applied to the MLP's output before the residual add (Gemma)


def norm_like(module: nn.Module, hidden_size: int) -> bool:
    """A leaf module whose parameters are per-channel vectors of the hidden size (RMSNorm, LayerNorm)."""
    params = list(module.parameters(recurse=False))
    return (not list(module.children()) and bool(params)
            and all(p.dim() == 1 and p.numel() == hidden_size for p in params))


def _matrix_map(module: nn.Module) -> bool:
    """A leaf mapping by one weight matrix: nn.Linear, or transformers' Conv1D (GPT-2) that stores it transposed."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and not list(module.children())
            and not isinstance(module, nn.Embedding))


@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int                     # when it started, among all calls inside the layer
    input: torch.Tensor | None
    output: torch.Tensor | None = None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in x if isinstance(t, torch.Tensor)), None)
    return None


def _record_calls(layer: nn.Module, hidden: torch.Tensor, call_kwargs: dict) -> list[_Call]:
    """Every submodule call of one forward of `layer`, in the order they started. The tensors are kept (not
    their ids): they are compared by identity, and a freed tensor's memory could be reused."""
    calls: list[_Call] = []
    running: dict[nn.Module, list[_Call]] = {}
    handles = []

    def pre(name):
        def fn(module, args, kwargs):
            c = _Call(name, module, len(calls), _first_tensor(args) if args else _first_tensor(list(kwargs.values())))
            calls.append(c)
            running.setdefault(module, []).append(c)
        return fn

    def post(module, args, kwargs, output):
        running[module].pop().output = _first_tensor(output)

    for name, m in layer.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            layer(hidden, **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _innermost_holder(paths: list[str]) -> str:
    """The path of the innermost module holding every one of `paths` ("" = the layer itself)."""
    parents = [p.split(".")[:-1] for p in paths]
    common = []
    for level in zip(*parents):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _child(path: str) -> str:
    return path.split(".", 1)[0]


def probe_layer(layer: nn.Module, hidden: torch.Tensor, call_kwargs: dict) -> Anatomy:
    """The anatomy of `layer`, from one call with `hidden` and the keyword arguments the model gives it."""
    kind = type(layer).__name__
    calls = _record_calls(layer, hidden, call_kwargs)
    maps = [c for c in calls if _matrix_map(c.module)]
    norms = [c for c in calls if norm_like(c.module, hidden.shape[-1])]
    feeding = [n for n in norms if any(m.input is n.output for m in maps)]
    if not feeding:
        raise AnatomyError(f"{kind}: no norm whose output a Linear map reads (norm-like modules run: "
                           f"{[n.name for n in norms]}); a pre-norm decoder layer is needed")
    attn_norm, mlp_norm = feeding[0], feeding[-1]
    mlp_out = maps[-1]
    mlp_in = [m for m in maps if m.input is mlp_norm.output]
    if attn_norm is mlp_norm:  # one norm feeds both (parallel block): the MLP's maps share a child with its output
        mlp_in = [m for m in mlp_in if _child(m.name) == _child(mlp_out.name)]
    attn_in = [m for m in maps if m.input is attn_norm.output and m not in mlp_in]
    first_mlp = min((m.order for m in mlp_in), default=mlp_out.order)
    before_mlp = [m for m in maps if m.order < first_mlp]
    if not mlp_in or not attn_in or not before_mlp:
        raise AnatomyError(f"{kind}: cannot tell the attention's maps from the MLP's "
                           f"(maps in call order: {[m.name for m in maps]})")
    attn_out = before_mlp[-1]
    holder = _innermost_holder([m.name for m in mlp_in] + [mlp_out.name])
    if holder:
        mlp = (holder,)
    else:  # the maps sit on the layer itself: the MLP is the layer's children called from its first map to its last
        mlp = tuple(dict.fromkeys(c.name for c in calls if "." not in c.name and first_mlp <= c.order <= mlp_out.order
                                  and not isinstance(c.module, nn.Dropout)))
    return Anatomy(attention_norm=attn_norm.name,
                   attention=_innermost_holder([m.name for m in attn_in] + [attn_out.name]),
                   attention_inputs=tuple(m.name for m in attn_in), attention_output=attn_out.name,
                   mlp_norm=mlp_norm.name, mlp=mlp, mlp_inputs=tuple(m.name for m in mlp_in),
                   mlp_output=mlp_out.name,
                   mlp_post_norm=next((n.name for n in norms if n.input is mlp_out.output), None))


def anatomy_of(model: nn.Module, index: int = 0, input_ids: torch.Tensor | None = None) -> Anatomy:
    """`probe_layer` for decoder layer `index` of `model`, called as the model calls it on `input_ids` (by default
    a few token ids: which module feeds which does not depend on the tokens). A model without weights (the meta
    device: the plan, the checks before loading) is probed on shapes alone (`_shapes_only`)."""
    stack = find_decoder_stack(model)
    if input_ids is None:
        device = input_device(model)
        input_ids = (torch.arange(8, device=device) % stack.config.vocab_size).unsqueeze(0)
    with _shapes_only(model, input_ids) as mask:
        cap = run_layers(model, input_ids, mask, inputs_at=(index,), kwargs_at=(index,), stack=stack)
    return probe_layer(stack.layers[index], cap.inputs[index], cap.call_kwargs[index])


@contextmanager
def _shapes_only(model: nn.Module, input_ids: torch.Tensor):
    """The attention mask to probe `model` with: None for a model with weights. On the meta device the forward
    runs on shapes, but transformers' mask code asks the data two questions with `.item()`, which a meta tensor
    cannot answer: whether the batch packs several sequences (asked when no mask is given) and whether SDPA may
    skip the causal mask. An explicit all-ones mask and eager attention ask neither (seen on all nine families:
    'Tensor.item() cannot be called on meta tensors'); the modules called, and so the anatomy, are the same under
    any attention implementation. The model's own implementation is restored afterwards."""
    first = next(model.parameters(), None)
    switch = getattr(model, "set_attn_implementation", None)
    if first is None or not first.is_meta or switch is None:
        yield None
        return
    before = model.config._attn_implementation
    switch("eager")
    try:
        yield torch.ones_like(input_ids)
    finally:
        switch(before)
