"""Run by tests/test_cache_agreement.py under torchrun (two CPU processes, gloo), each rank with a stage cache of
its own (as nodes with node-local caches): the recipe's cached stages (a layer replacement fitted by least squares
then trained with the MSE, online pairs; LoRA healing) are reused or recomputed by both ranks together although
the ranks' caches differ. Collective timeout 20 s: a rank left waiting for the other fails instead of hanging."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

OVERRIDES = ["experiment=smoke", "replacement=layer", "replacement.init=linear", "train.teacher=online",
             "train.batch_size=2", "train.max_steps=2", "data.train_samples=8", "method.lora_epochs=1"]


def digest(modules) -> str:
    h = hashlib.sha256()
    for j, m in enumerate(modules):
        for k, v in sorted(m.state_dict().items()):
            h.update(f"{j}.{k}".encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(where: Path) -> None:
    rank = int(os.environ["RANK"])
    os.environ["LLM_STREAMLINE_STAGES"] = str(where / f"stages{rank}")
    from llm_streamline import compose
    from llm_streamline.recipes import common, streamline

    common.DATA_PARALLEL_TIMEOUT_S = 20  # read by start_run's accelerator
    torch.set_num_threads(1)
    cfg = compose(OVERRIDES)
    ctx = common.start_run(cfg, where / "run")
    common.load_dense_model(ctx)
    common.load_data(ctx)
    trained: list = []  # this rank's trainings (train_mse and LoRA calls)
    for module, name in ((streamline, "train_mse"), (common, "train_lora")):
        inner = getattr(module, name)

        def counted(*args, _inner=inner, _name=name, **kwargs):
            if kwargs.get("cached") is None:  # train_lora with cached adapters only merges them
                trained.append(_name)
            return _inner(*args, **kwargs)

        setattr(module, name, counted)
    out = {}

    def attempt(name: str) -> None:
        before = len(trained)
        c = streamline.replace_block(ctx, 2, 2)
        log = {k: v for k, v in c.train_log.items() if k not in ("fit", "fit_seconds")}  # fitted: wall time
        healed, hlog = common.heal(ctx, c.model, "lora-agree")
        hlog = {k: v for k, v in hlog.items() if k != "seconds"}
        out[name] = {"slot": digest(c.slot), "train": log, "healed": digest([healed]), "heal": hlog,
                     "trained": trained[before:]}
        ctx.accelerator.wait_for_everyone()

    mine, theirs = where / "stages0", where / "stages1"
    attempt("fresh")            # both caches empty: trained together, stored by rank 0 in its cache only
    attempt("rank0_only")       # rank 0's cache has the entries, rank 1's none
    if rank == 1:               # rank 1 gets rank 0's entries, damaged
        for entry in (p for p in mine.iterdir() if p.name.startswith(("train-", "lora-agree"))):
            shutil.copytree(entry, theirs / entry.name)
            for f in entry.glob("*.safetensors"):
                (theirs / entry.name / f.name).write_bytes(b"\0" * f.stat().st_size)
    ctx.accelerator.wait_for_everyone()
    attempt("damaged_on_rank1")
    if rank == 0:               # rank 0's entries damaged: both train again
        for f in (f for p in mine.iterdir() if p.name.startswith(("train-", "lora-agree")) and p.is_dir()
                  for f in p.glob("*.safetensors")):
            f.write_bytes(b"\0" * f.stat().st_size)
    ctx.accelerator.wait_for_everyone()
    attempt("damaged_on_rank0")
    (where / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
