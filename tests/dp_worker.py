"""Run by tests/test_distributed.py under torchrun (gloo on the CPU; `DP_WORKER_DEVICE=cuda`: NCCL, a card per rank):
SLEB's greedy search with its calibration windows shared by the ranks (each rank writes what it removed, every
candidate's perplexity and how many batches it scored), the similarity profile and LM-loss training (its steps'
and validation's batches) shared."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from llm_streamline.baselines import layer_removal
from llm_streamline.models.loading import tiny_model

REMOVE, BATCH = 2, 1


def problem(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny random Llama (6 layers) on `device` and 6 calibration windows of 16 tokens: 6 batches per candidate."""
    model = tiny_model("llama", 128, {"num_hidden_layers": 6}, seed=0).to(device)
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    return model, calib


def search(accelerator=None, device="cpu") -> dict:
    model, calib = problem(accelerator.device if accelerator is not None else device)
    scored = []
    score = layer_removal._candidate_loss_sums

    def counted(m, ids, candidates):  # the batches this process scored
        scored.append(ids.shape[0])
        return score(m, ids, candidates)

    layer_removal._candidate_loss_sums = counted
    try:
        removed, steps = layer_removal.sleb(model, calib, REMOVE, blocks=None, batch_size=BATCH, progress=False,
                                            accelerator=accelerator)
    finally:
        layer_removal._candidate_loss_sums = score
    return {"removed": removed, "steps": steps, "scored": len(scored)}


def profile(accelerator=None, device="cpu") -> dict:
    """The similarity profile of every block size, its calibration batches shared."""
    from llm_streamline.importance import similarity_profile

    model, calib = problem(accelerator.device if accelerator is not None else device)
    return similarity_profile(model, calib, ns=list(range(1, 7)), batch_size=BATCH, progress=False,
                              accelerator=accelerator).as_dict()


def lm_training(accelerator=None, device="cpu") -> dict:
    """Two steps of train.loss=lm through the model, layer 2 the slot: the validation loss before training (it
    does not depend on how many processes share the validation batches) and the trained slot's weights."""
    from llm_streamline.config import TrainConfig
    from llm_streamline.models.layers import find_decoder_stack
    from llm_streamline.train import train_lm

    model, calib = problem(accelerator.device if accelerator is not None else device)
    cfg = TrainConfig(loss="lm", epochs=1, batch_size=BATCH, max_steps=2, lr=1e-2)
    slot = find_decoder_stack(model).layers[2]
    log = train_lm(model, [slot], calib, calib, cfg, seed=0, accelerator=accelerator)
    return {"initial_val_loss": log.initial_val_loss, "train_loss": log.train_loss,
            "slot": {k: v.tolist() for k, v in slot.state_dict().items()}}


if __name__ == "__main__":
    from accelerate import Accelerator

    acc = Accelerator(cpu=os.environ.get("DP_WORKER_DEVICE", "cpu") == "cpu")
    torch.set_num_threads(1)
    out = {**search(acc), "lm": lm_training(acc), "profile": profile(acc)}
    (Path(sys.argv[1]) / f"rank{acc.process_index}.json").write_text(json.dumps(out))
