"""Run by tests/test_sharded_stages.py under torchrun (two CPU processes, gloo): the stages that shard their work
over the ranks (perplexity, block-by-perplexity scoring, lm-eval scoring, LaCo's and LLM-Pruner's scoring),
each rank writing what it got and how much of the work it did. Called with no accelerator, the same functions
give the one-process reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm_streamline.models.loading import tiny_model
from llm_streamline.models.tiny_tokenizer import tiny_tokenizer

TASKS, LIMIT = ["piqa", "arc_easy"], 5  # odd: the ranks score 3 and 2 documents (lm-eval pads the second)
SHOTS = {"piqa": 1}  # examples drawn at random: that call is rank 0's alone; ARC-Easy's (zero-shot) is shared


def problem() -> tuple[torch.nn.Module, object, torch.Tensor]:
    """A tiny random Llama (6 layers), its tokenizer, 7 blocks of 16 tokens (4 batches of 2: 2 per rank)."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok), {"num_hidden_layers": 6}, seed=0).eval()
    blocks = torch.randint(0, len(tok), (7, 16), generator=torch.Generator().manual_seed(0))
    return model, tok, blocks


def counting(module, name: str, counter: list):
    """`module.name` wrapped to count its calls on this rank (the work was split, not repeated)."""
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        counter.append(1)
        return inner(*args, **kwargs)

    setattr(module, name, counted)
    return inner


def perplexities(accelerator=None) -> dict:
    from llm_streamline import losses
    from llm_streamline.evaluate.perplexity import perplexity
    from llm_streamline.importance import block_perplexities

    model, _, blocks = problem()
    calls: list = []
    inner = counting(losses, "nll_sum", calls)
    try:
        ppl = perplexity(model, blocks, 2, accelerator=accelerator)
        ppl_batches = len(calls)
        block = block_perplexities(model, blocks, 2, 2, progress=False, accelerator=accelerator)
    finally:
        losses.nll_sum = inner
    return {"ppl": ppl, "ppl_batches": ppl_batches, "block": block, "block_batches": len(calls) - ppl_batches}


def lm_eval_scores(out: Path | None, accelerator=None) -> dict | None:
    """Stock HFLM scoring of TASKS; rank 0 (or one process) also writes lm-eval's own files under `out`. Every
    rank says how many lm-eval calls it took part in."""
    import lm_eval

    from llm_streamline.evaluate import harness

    model, tok, _ = problem()
    calls: list = []
    inner = counting(lm_eval, "simple_evaluate", calls)
    try:
        res = harness.run_lm_eval(model, tok, TASKS, LIMIT, 4, num_fewshot=SHOTS, accelerator=accelerator)
    finally:
        lm_eval.simple_evaluate = inner
    if res is None:
        return {"calls": len(calls)}
    if out is not None:
        harness.write_lm_eval_files(res.lm_eval, out, "tiny")
    return {"metrics": res.metrics, "samples": res.samples, "n_samples": res.n_samples, "calls": len(calls)}


def baselines(accelerator=None) -> dict:
    """LaCo (its 4 calibration blocks shared: 2 per rank) and LLM-Pruner (3 gradient sequences: 2 and 1) on the
    tiny model: what they chose, and a digest of the pruned weights (the same choices give the same bytes)."""
    import hashlib

    from llm_streamline.baselines import laco, llm_pruner
    from llm_streamline.config import LaCoConfig, LLMPrunerConfig, RunConfig

    def digest(model) -> str:
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    out = {}
    model, _, blocks = problem()
    res = laco.apply(model, blocks, 2, RunConfig(method=LaCoConfig(laco_merge=2)), accelerator=accelerator)
    out["laco"] = {"removed": res.removed_layers, "merges": res.record["merges"], "sha256": digest(res.model)}
    model, _, blocks = problem()
    cfg = RunConfig(method=LLMPrunerConfig(first_layer=1, last_layers_kept=1, grad_samples=3, grad_seq_len=16,
                                           width_ratio=0.25))
    res = llm_pruner.apply(model, blocks, 1, cfg, accelerator=accelerator)
    out["llm_pruner"] = {"layer_sizes": res.record["layer_sizes"], "sha256": digest(res.model)}
    return out


def fits(accelerator=None) -> dict:
    """The training-free fits on layers [2, 4) of the tiny model (4 calibration batches of 2: 2 per rank):
    ReplaceMe's least-squares map, LinearPatch's matrix, an ffn's and a layer's linear init (their weights)."""
    import copy

    from llm_streamline import linear_map
    from llm_streamline.config import ReplacementConfig
    from llm_streamline.models.layers import find_decoder_stack
    from llm_streamline.replace import build_replacement

    model, _, blocks = problem()
    stack = find_decoder_stack(model)
    t, log = linear_map.replaceme_map(model, blocks, 2, 2, ReplacementConfig(type="linear"), 2,
                                      accelerator=accelerator)
    p, plog = linear_map.linear_patch_matrix(model, blocks, 2, 2, 2, accelerator=accelerator)
    out = {"replaceme": t.tolist(), "replaceme_log": log, "linear_patch": p.tolist(), "linear_patch_log": plog}
    for kind, init in (("ffn", linear_map.init_ffn_linear), ("layer", linear_map.init_layer_linear)):
        slot = build_replacement(ReplacementConfig(type=kind, init="linear"), list(copy.deepcopy(stack.layers[2:4])),
                                 stack.config, True)[0]
        # a ridge: 112 calibration tokens underdetermine the layer's 128-wide MLP output map (no unique solution)
        out[f"{kind}_log"] = init(slot, model, blocks, 2, 2, 2, ridge=0.1, accelerator=accelerator)
        out[kind] = {k: v.tolist() for k, v in slot.state_dict().items()}
    return out


def eval_mode(out: Path) -> dict:
    """`mode=eval` on the smoke preset's tiny model into `out` (under torchrun: its items and perplexity batches
    shared, the first rank records); what the recipe returned."""
    from llm_streamline import compose, recipes

    out.mkdir(parents=True, exist_ok=True)
    return recipes.run(compose(["experiment=smoke", "mode=eval", "eval.speed=false"]), out)


if __name__ == "__main__":
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.set_num_threads(1)
    where = Path(sys.argv[1])
    out = {"ppl": perplexities(acc), "lm_eval": lm_eval_scores(where / "lm_eval", acc), "baselines": baselines(acc),
           "fits": fits(acc), "eval_mode": eval_mode(where / "eval_mode")}
    (where / f"rank{acc.process_index}.json").write_text(json.dumps(out))
