"""Remove a contiguous block of decoder layers and put the replacement in its slot.

Three things must stay consistent (transformers v5): `config.num_hidden_layers` (model loops slice the
layer list by it), every per-layer config array such as `layer_types` (sliced to the kept layers, the
replacement slots taking the types of the first pruned layers, not regenerated), and each attention
module's `layer_idx` (renumbered, else `generate` with a KV cache indexes a missing cache slot).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from llm_streamline.models.layers import find_decoder_stack, per_layer_config_keys, renumber_layer_indices


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


def count_params(module: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in module.parameters())
