"""Run by tests/test_distributed.py under torchrun (gloo on the CPU; `DP_WORKER_DEVICE=cuda`: NCCL, a card per rank)
with `model.shard=fsdp`: dp_worker's tiny model, saved as safetensors, loaded sharded (each rank reading its rows
only); the similarity profile and SLEB's search over calibration batches that do not divide evenly by the ranks
(lockstep: the short rank runs a filler forward). Each rank writes its resident parameter bytes, the profile, what
SLEB removed with every candidate's perplexity (a filler counted would show in the profile's token count), LoRA
healing's log and merged weights, and the MSE with online teacher pairs from the sharded dense model and
distillation from it (the student through the same sharded layers) against the same ranks with a replicated one."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import dp_worker  # noqa: E402

from llm_streamline.baselines import layer_removal  # noqa: E402

LORA_BATCH = 1  # blocks per rank per step under two ranks; one process takes both ranks' (2) in one batch
START, N = 2, 2  # the MSE's block
CALIB = 5  # windows: 3 + 2 over two ranks, so the second runs one filler forward per pass


def save_problem(directory: Path) -> None:
    """dp_worker's model as a safetensors checkpoint (what a sharded load reads)."""
    dp_worker.problem()[0].save_pretrained(directory)


def run(model, calib, accelerator=None) -> dict:
    """The profile of every block size, SLEB's greedy search, then LoRA healing of what is left (with activation
    checkpointing; the same effective batch in one process, `LORA_BATCH` x ranks) on `model` (sharded or not)."""
    from llm_streamline.importance import similarity_profile

    prof = similarity_profile(model, calib, ns=list(range(1, 7)), batch_size=dp_worker.BATCH, progress=False,
                              accelerator=accelerator).as_dict()
    removed, steps = layer_removal.sleb(model, calib, dp_worker.REMOVE, blocks=None, batch_size=dp_worker.BATCH,
                                        progress=False, accelerator=accelerator)
    from llm_streamline.config import TrainConfig
    from llm_streamline.train import train_lora

    world = accelerator.num_processes if accelerator is not None else 1
    cfg = TrainConfig(epochs=1, batch_size=LORA_BATCH * 2 // world, max_steps=2, lr=1e-2, grad_checkpointing=True)
    blocks = dp_worker.problem()[1]
    merged, log = train_lora(model, blocks, blocks, cfg, rank=4, alpha=8, seed=0, progress=False,
                             accelerator=accelerator, merge_in_place=True)
    log.pop("seconds")
    return {"profile": prof, "removed": removed, "steps": steps, "lora": log}, merged


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (a sharded one gathered: a collective, the same order on every rank)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.named_parameters()}


def mse_online(model, slot, accelerator) -> tuple[dict, dict]:
    """Two steps of the MSE with online teacher pairs from `model` (the dense one, sharded or not), slot = layers
    [START, START + N), 6 training blocks, 5 validation blocks (3 + 2 batches over two ranks: a filler)."""
    from llm_streamline.config import TrainConfig
    from llm_streamline.train import OnlineTeacher, train_mse

    blocks = dp_worker.problem()[1]
    cfg = TrainConfig(loss="mse", epochs=1, batch_size=1, max_steps=2, lr=1e-3, teacher="online")
    torch.manual_seed(0)
    for m in slot:
        m.requires_grad_(True)
    log = train_mse(model, slot, START, blocks, OnlineTeacher(model, blocks, START, N, 1),
                    OnlineTeacher(model, blocks[:5], START, N, 1), cfg, seed=0, accelerator=accelerator)
    return log.as_dict(), {k: v.detach().clone() for k, v in slot[0].state_dict().items()}


def distill(dense, pruned, slot, accelerator, alpha: float) -> tuple[dict, dict]:
    """Two steps of distillation (KL, + alpha x the hidden-state MSE at the slot's output) from `dense`, slot =
    layers [START, START + N), through `pruned` (`dense` itself when sharded: the slot put in for the student's
    forwards only); 6 training blocks, 5 validation blocks (a filler on the second rank)."""
    from llm_streamline.config import TrainConfig
    from llm_streamline.train import train_distill

    blocks = dp_worker.problem()[1]
    cfg = TrainConfig(loss="distill", epochs=1, batch_size=1, max_steps=2, lr=1e-3, distill_alpha=alpha)
    log = train_distill(dense, pruned, slot, START, N, blocks, blocks[:5], cfg, seed=0, accelerator=accelerator)
    return log.as_dict(), {k: v.detach().clone() for k, v in slot[0].state_dict().items()}


def one_process() -> dict:
    model, calib = dp_worker.problem()
    out, merged = run(model, calib[:CALIB])
    return out, full_weights(merged)


if __name__ == "__main__":
    from accelerate import Accelerator

    from llm_streamline.config import ModelConfig
    from llm_streamline.models.layers import count_params, find_decoder_stack, remove_block, share_weights
    from llm_streamline.models.sharded import load_sharded, local_param_bytes

    acc = Accelerator(cpu=os.environ.get("DP_WORKER_DEVICE", "cpu") == "cpu")
    torch.set_num_threads(1)
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = ModelConfig(name="tiny", source="local", name_or_path=str(directory))
    model = load_sharded(cfg, torch.float32, acc.device, acc.num_processes, acc.process_index)
    resident = {"local_bytes": local_param_bytes(model), "model_bytes": count_params(model) * 4}
    # the MSE with online pairs: the sharded dense model and a replicated slot read whole from the checkpoint, against
    # the same two ranks with a replicated dense model (the same batches: equal weights)
    from llm_streamline.models.sharded import load_layers

    slot = load_layers(cfg, torch.float32, acc.device, [START])
    sharded_log, sharded_slot = mse_online(model, slot, acc)
    plain = dp_worker.problem(acc.device)[0]
    plain_log, plain_slot = mse_online(plain, [copy.deepcopy(find_decoder_stack(plain).layers[START])], acc)
    # distillation: the teacher's logits from the sharded dense model, the student through the same sharded layers
    # with the replicated slot, against a whole dense model and a pruned one over its weights on each rank
    # (the KL alone, and + 0.5 x the hidden-state MSE: the teacher's hooked layer output too)
    distilled = {}
    for alpha in (0.0, 0.5):
        slot = load_layers(cfg, torch.float32, acc.device, [START])
        sharded = distill(model, model, slot, acc, alpha)
        pruned = share_weights(plain)
        slot = [copy.deepcopy(find_decoder_stack(plain).layers[START])]
        remove_block(pruned, START, N, slot)
        distilled[alpha] = sharded, distill(plain, pruned, slot, acc, alpha)
    del plain, pruned
    initial = find_decoder_stack(dp_worker.problem()[0]).layers[START].state_dict()

    def compared(sharded, replicated) -> dict:
        (s_log, s_slot), (r_log, r_slot) = sharded, replicated
        return {"sharded": s_log, "replicated": r_log,
                "max_diff": max((s_slot[k] - v).abs().max().item() for k, v in r_slot.items()),
                "moved": max((s_slot[k] - v).abs().max().item() for k, v in initial.items()),
                "sha256": {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).hexdigest()
                           for k, v in s_slot.items()}}

    mse = compared((sharded_log, sharded_slot), (plain_log, plain_slot))
    resident["distill"] = {"kl": compared(*distilled[0.0]), "kl_mse": compared(*distilled[0.5]),
                           "layers": find_decoder_stack(model).num_layers}
    calib = dp_worker.problem()[1][:CALIB]
    rec, merged = run(model, calib, acc)
    weights = full_weights(merged)
    rec["sha256"] = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).hexdigest()
                     for k, v in weights.items()}
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "fsdp_merged.safetensors"))
    (out / f"fsdp_rank{acc.process_index}.json").write_text(json.dumps({**resident, **rec, "mse": mse}))
