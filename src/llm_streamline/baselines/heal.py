"""LoRA healing of a pruned model, as the run config asks for it (`config.heal_train_config`): the one training
loop's LoRA job (`train.train_lora`), adapters of rank method.lora_rank and alpha method.lora_alpha."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from llm_streamline.config import RunConfig, heal_train_config
from llm_streamline.train import lora_targets, train_lora

__all__ = ["lora_heal", "lora_targets"]


def lora_heal(model: PreTrainedModel, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
              cfg: RunConfig, progress: bool = True, cached: tuple[dict, dict] | None = None,
              on_trained=None) -> tuple[PreTrainedModel, dict]:
    """Returns (the merged plain model, training log); see `train.train_lora`."""
    return train_lora(model, train_blocks, val_blocks, heal_train_config(cfg), cfg.method.lora_rank,
                      cfg.method.lora_alpha, cfg.seed, progress=progress, cached=cached, on_trained=on_trained)
