"""The decoder layers of a model: where they are, how they are called, and every change made to their list.

Discovery. No family names here. The decoder stack is the `nn.ModuleList` whose length is the text config's
`num_hidden_layers` and whose members share one class. How a layer is called (attention mask per layer
type, rotary embeddings, position ids, ...) is not re-derived either: we let the model's own forward build
those arguments and capture them with a forward pre-hook on the layer, then stop the forward with an
exception as soon as the last layer we need has run. So only the layers needed are computed, the final
norm and the LM head never run, and every family's own masking and position logic is used as is.

Surgery (the only place that changes the list): remove a block and put modules in its slot (`remove_block`),
drop any layers (`remove_layers`), replace layers in place (`splice`), skip layers for a while (`skipping`),
run with another list for a while (`layer_view`), a second model over the same weights (`share_weights`: the
pruned model beside the dense one, one copy of the weights), and `count_params`. Three things must stay consistent
(transformers v5): `config.num_hidden_layers` (model loops slice the layer list by it), every per-layer
config array such as `layer_types` (sliced to the kept layers, the replacement slots taking the types of the
first pruned layers, not regenerated), and each attention module's `layer_idx` (renumbered, else `generate`
with a KV cache indexes a missing cache slot).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from llm_streamline.models.devices import after_stopped_forward, input_device


class NoDecoderLayersError(ValueError):
    pass


@dataclass
class DecoderStack:
    parent: nn.Module      # the module holding the list
    attr: str              # its attribute name
    layers: nn.ModuleList
    config: Any            # the text config whose num_hidden_layers counts the layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def replace(self, new_layers: list[nn.Module]) -> None:
        self.layers = nn.ModuleList(new_layers)
        self.layers._llm_streamline_stack = True  # mixed classes from now on: found by this marker
        setattr(self.parent, self.attr, self.layers)


def text_config(model: PreTrainedModel):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    cfg = text_config(model)
    want = getattr(cfg, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 or getattr(module, "_llm_streamline_stack", False):
                candidates.append((name, module))
    # Prefer the list whose length the config names; among those, the outermost (shortest name).
    exact = [c for c in candidates if len(c[1]) == want]
    pool = exact or [c for c in candidates if getattr(c[1], "_llm_streamline_stack", False)]
    if not pool:
        raise NoDecoderLayersError(
            f"{type(model).__name__} has no list of decoder layers matching num_hidden_layers={want}")
    name, layers = min(pool, key=lambda c: c[0].count("."))
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return DecoderStack(parent=parent, attr=attr, layers=layers, config=cfg)


def per_layer_config_keys(config) -> list[str]:
    """Config attributes that hold one entry per layer (e.g. Gemma/Qwen `layer_types`)."""
    n = config.num_hidden_layers
    return [k for k, v in vars(config).items()
            if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_")]


class _StopForward(Exception):
    pass


@dataclass
class Capture:
    """What one truncated forward recorded."""
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)     # hidden state entering layer i
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)    # hidden state leaving layer i (un-normed)
    call_kwargs: dict[int, dict] = field(default_factory=dict)        # keyword arguments layer i was called with
    output_is_tuple: bool = False


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def run_layers(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, inputs_at: tuple[int, ...] = (), outputs_at: tuple[int, ...] = (),
               kwargs_at: tuple[int, ...] = (), stack: DecoderStack | None = None,
               grad: bool = False) -> Capture:
    """Run the model only as far as needed to record the requested hidden states / layer arguments.

    inputs_at: layers whose input hidden state to keep (x^(i)); outputs_at: layers whose output to keep
    (x^(i+1), before any final norm); kwargs_at: layers whose call keyword arguments to keep.
    The forward stops right after the deepest layer needed (or before it, if only its input is needed).
    """
    stack = stack or find_decoder_stack(model)
    cap = Capture()
    last_out = max(outputs_at, default=-1)
    last_in = max((*inputs_at, *kwargs_at), default=-1)
    stop_before = last_in if last_in > last_out else None   # stop in the pre-hook of this layer
    stop_after = last_out if stop_before is None else None  # stop in the forward hook of this layer
    handles = []

    def pre_hook(idx):
        def fn(module, args, kwargs):
            if idx in inputs_at:
                cap.inputs[idx] = _hidden_of(args, kwargs)
            if idx in kwargs_at:
                cap.call_kwargs[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if idx == stop_before:
                raise _StopForward
        return fn

    def post_hook(idx):
        def fn(module, args, kwargs, output):
            cap.output_is_tuple = isinstance(output, tuple)
            if idx in outputs_at:
                cap.outputs[idx] = output[0] if isinstance(output, tuple) else output
            if idx == stop_after:
                raise _StopForward
        return fn

    for i, layer in enumerate(stack.layers):
        if i in inputs_at or i in kwargs_at or i == stop_before:
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        if i in outputs_at or i == stop_after:
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    device = input_device(model)  # ids from the CPU data stage go where the embedding is (the first card)
    mask = attention_mask.to(device) if attention_mask is not None else None
    try:
        with torch.set_grad_enabled(grad):
            model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
        if stop_before is not None or stop_after is not None:
            raise RuntimeError("the model's forward did not reach the requested layers")
    except _StopForward:
        after_stopped_forward(model)  # a sharded model: its gathered layers back to shards, FSDP idle again
    finally:
        for h in handles:
            h.remove()
    return cap


# ------------------------------------------------------------------------------------------------ surgery
@dataclass
class PrunedBlock:
    start: int            # first removed layer (original index)
    end: int              # one past the last removed layer
    num_original_layers: int
    num_replacement_layers: int

    @property
    def removed(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "removed": self.removed,
                "original": self.num_original_layers, "replacement_slots": self.num_replacement_layers,
                "kept": self.num_original_layers - self.removed + self.num_replacement_layers}


def renumber_layer_indices(stack: DecoderStack) -> None:
    """After layers are removed, layer i must use KV-cache slot i: renumber every `layer_idx`."""
    for i, layer in enumerate(stack.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def remove_block(model: PreTrainedModel, start: int, n: int, replacement: list[nn.Module]) -> PrunedBlock:
    """In place: layers [start, start+n) are dropped and `replacement` modules take their slot."""
    stack = find_decoder_stack(model)
    total = stack.num_layers
    if not (0 <= start and n >= 1 and start + n <= total):
        raise ValueError(f"block [{start}, {start + n}) is outside the model's {total} layers")
    k = len(replacement)
    layers = list(stack.layers)
    stack.replace(layers[:start] + list(replacement) + layers[start + n:])
    cfg = stack.config
    keys = per_layer_config_keys(cfg)
    for key in keys:
        arr = list(getattr(cfg, key))
        setattr(cfg, key, arr[:start] + arr[start:start + k] + arr[start + n:])
    cfg.num_hidden_layers = total - n + k
    if cfg is not model.config and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = cfg.num_hidden_layers
    renumber_layer_indices(stack)
    return PrunedBlock(start, start + n, total, k)


def remove_layers(model: PreTrainedModel, indices) -> list[int]:
    """In place: drop the layers at `indices` (current indices, any order, not necessarily contiguous).

    Calls `remove_block` from the highest index down, so lower indices stay valid and config
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


def splice(model: PreTrainedModel, start: int, modules: list[nn.Module]) -> None:
    """In place: `modules` take the places of layers [start, start + len(modules)); the count is unchanged
    (a model built from a pruned config gets its saved slot back, or a slot becomes a stock layer)."""
    stack = find_decoder_stack(model)
    if not (0 <= start and start + len(modules) <= stack.num_layers):
        raise ValueError(f"slots [{start}, {start + len(modules)}) are outside the model's {stack.num_layers} layers")
    layers = list(stack.layers)
    layers[start:start + len(modules)] = modules
    stack.replace(layers)
    renumber_layer_indices(stack)


def skip_layer_hook(module, args, kwargs, output):
    """Forward hook (with_kwargs) that makes a decoder layer return its input: the layer is skipped."""
    h = args[0] if args else kwargs["hidden_states"]
    return (h, *output[1:]) if isinstance(output, tuple) else h


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


def _set_per_layer(model, stack: DecoderStack, keep: list[int], saved: dict) -> None:
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


def share_weights(model: nn.Module) -> nn.Module:
    """A second model over the SAME weight tensors: its own modules, config and Parameter objects, so surgery on
    it (`remove_block`, a slot put in, parameters replaced by pruned ones), its requires_grad flags and `.data =`
    assignments leave `model` as it was, while every parameter and buffer shares `model`'s storage. A pruned model
    built this way costs no second copy of the weights (a deep copy doubles them: 2 x 13.5 GB for Llama-2-7B in
    bf16); the dense model keeps the removed block for the stages that still need it (teacher, speed).
    The one rule: nothing may write INTO a shared tensor in place (`p.add_`, `load_state_dict` into an existing
    layer, peft's unsafe merge); such code puts a new tensor or module in place instead."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def count_params(module: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in module.parameters())
