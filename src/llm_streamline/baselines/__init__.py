"""Baselines in the same harness: each takes the dense model, the calibration data, the similarity profile
and the size to remove, and returns the compressed model; the baseline recipe then heals it (optional),
evaluates, records and saves it exactly like an LLM-Streamline model. Components, not orchestrators: no files,
no W&B, no Hydra here.

  shortgpt    remove the n layers with the lowest Block Influence (not necessarily contiguous)
  gromov      remove the contiguous block with the smallest angular distance (then optional LoRA healing)
  laco        layer collapse: merge following layers' parameter differences into one layer
  sleb        greedy removal of one layer at a time by the smallest increase in calibration perplexity
  llm_pruner  width pruning of coupled heads / MLP channels by first-order Taylor importance
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from llm_streamline.config import RunConfig
from llm_streamline.importance import SimilarityProfile


@dataclass
class BaselineResult:
    model: PreTrainedModel               # the compressed model (the input may have been modified in place)
    removed_layers: list[int]            # original indices of removed layers ([] for width pruning)
    record: dict[str, Any] = field(default_factory=dict)   # method-specific facts for results.json
    # the checkpoint format that holds the model and its builder's fields (models.checkpoints.save_checkpoint)
    checkpoint: tuple[str, dict] = ("stock", {})


def apply_method(cfg: RunConfig, model: PreTrainedModel, calib: torch.Tensor, profile: SimilarityProfile, n: int,
                 chosen: dict | None = None, target_removed: int | None = None, accelerator=None) -> BaselineResult:
    """Compress `model` by `method.name` (healing, `method.heal`, is the recipe's next step).
    chosen: the record of an earlier identical layer-removal run (SLEB's search is long): its layers are removed
    without searching again. target_removed: the net parameter count to remove (default: n layers); width
    pruning (llm_pruner) matches it, layer removal removes n whole layers (the record shows the difference).
    accelerator: an `accelerate.Accelerator` under torchrun: SLEB's search, LaCo's similarities and LLM-Pruner's
    gradients are shared by the ranks."""
    name = cfg.method.name
    if name in ("shortgpt", "gromov", "sleb"):
        from llm_streamline.baselines import layer_removal

        result = layer_removal.apply(name, model, calib, profile, n, cfg, chosen=chosen, accelerator=accelerator)
    elif name == "laco":
        from llm_streamline.baselines import laco

        result = laco.apply(model, calib, n, cfg, accelerator=accelerator)
    elif name == "llm_pruner":
        from llm_streamline.baselines import llm_pruner

        result = llm_pruner.apply(model, calib, n, cfg, target=target_removed, accelerator=accelerator)
    else:
        raise ValueError(f"method={name!r} is not a baseline")
    return result
