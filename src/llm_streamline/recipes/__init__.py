"""One recipe per kind of run, each readable top to bottom with no branches for the others:

  streamline.py       the paper's method: similarity profile -> chosen block -> trained replacement -> evaluate
  baseline.py         a baseline (shortgpt, gromov, laco, sleb, llm_pruner): compress -> heal -> evaluate
  eval_checkpoint.py  mode=eval: a saved model on the evaluation suite
  common.py           what they share: the run context, the dense reference, evaluating a compressed model,
                      LoRA healing, saving, the results record

`run(cfg, out_dir)` runs the recipe the config asks for (the config already validated: see `cli`).
"""

from __future__ import annotations

from pathlib import Path

from llm_streamline.config import RunConfig


def run(cfg: RunConfig, out_dir: Path) -> dict:
    if cfg.mode == "eval":
        from llm_streamline.recipes import eval_checkpoint as recipe
    elif cfg.method.name == "streamline":
        from llm_streamline.recipes import streamline as recipe
    else:
        from llm_streamline.recipes import baseline as recipe
    return recipe.run(cfg, out_dir)
