"""Where a model's decoder layers are and how they are called, found from the model itself.

No family names here. The decoder stack is the `nn.ModuleList` whose length is the text config's
`num_hidden_layers` and whose members share one class. How a layer is called (attention mask per layer
type, rotary embeddings, position ids, ...) is not re-derived either: we let the model's own forward build
those arguments and capture them with a forward pre-hook on the layer, then stop the forward with an
exception as soon as the last layer we need has run. So only the layers needed are computed, the final
norm and the LM head never run, and every family's own masking and position logic is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


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
    try:
        with torch.set_grad_enabled(grad):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if stop_before is not None or stop_after is not None:
            raise RuntimeError("the model's forward did not reach the requested layers")
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return cap


def renumber_layer_indices(stack: DecoderStack) -> None:
    """After layers are removed, layer i must use KV-cache slot i: renumber every `layer_idx`."""
    for i, layer in enumerate(stack.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i
