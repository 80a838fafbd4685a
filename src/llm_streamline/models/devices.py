"""Where tensors go: the one home of "which device does this module / this model's input live on".

A model may sit on one device or be spread over several by a `device_map` (accelerate's hooks then move each
group's inputs to its device as the forward passes through it). Token ids go to the input embedding's device, the
first card of a split: not `next(model.parameters()).device`, which is whatever parameter a module registered first.
Tensors fed to one module directly (a replacement trained on its own, a loss against another tensor) go to that
module's (or that tensor's) device.

A model may also be sharded over a torchrun job's ranks (FSDP2, `models.sharded`): whether it is and how its
gathered layers go back to their shards after a stopped forward live here, below `models.layers` (which stops
forwards) and `models.sharded` (which builds the sharded model), so neither imports the other back.
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


def _root(model: nn.Module):
    """The FSDP2 root of `model` (itself, or the model inside a peft wrapper); None when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    if isinstance(model, FSDPModule):
        return model
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if isinstance(inner, FSDPModule) else None


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a peft wrapper) is held by FSDP2."""
    return _root(model) is not None


def after_stopped_forward(model: nn.Module) -> None:
    """A forward of a sharded model stopped by an exception (on every rank alike) left its root and the layer it
    stopped in gathered and FSDP mid-iteration: put everything back to sharded and idle (torch >= 2.13's
    `reset_iter_state`; before it, each module's `reshard`)."""
    root = _root(model)
    if root is None:
        return
    if hasattr(root, "reset_iter_state"):
        root.reset_iter_state()
        return
    from torch.distributed.fsdp import FSDPModule

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
