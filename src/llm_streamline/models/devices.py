"""Where tensors go: the one home of "which device does this module / this model's input live on".

A model may sit on one device or be spread over several by a `device_map` (accelerate's hooks then move each
group's inputs to its device as the forward passes through it). Token ids go to the input embedding's device, the
first card of a split: not `next(model.parameters()).device`, which is whatever parameter a module registered first.
Tensors fed to one module directly (a replacement trained on its own, a loss against another tensor) go to that
module's (or that tensor's) device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module that holds no tensor."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a causal LM's token ids must go: its input embedding's device (PEFT wrappers pass the call on)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb) if emb is not None else module_device(model)


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`; anything else as it is (the keyword
    arguments a model passes to a layer: masks, rotary cos/sin, position ids)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return type(obj)(*(to_device(o, device) for o in obj)) if hasattr(obj, "_fields") else \
            tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
