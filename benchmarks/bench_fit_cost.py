"""Cost of a training-free linear replacement against the trained layer's compression, side by side (issue 24's
target: the training-free rows cost at most a tenth of the trained layer's compression wall time).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_cost.py [--rounds 3] [--out FILE] [overrides ...]

Both arms run the recipe's own `replace_block` on SmolLM2-135M (the embedded preset) with the default data, in
one process (the model and blocks loaded once), interleaved with the order rotated per round so that both see
the same load:
  fit      `sparsity=net8 replacement=linear`: ReplaceMe's least-squares map for LLM-Streamline's block [11, 19)
           (64 calibration blocks, one pass), fused (the `fit` stage)
  trained  `sparsity=net8 replacement=layer`: the equal-size trained layer for [10, 19): teacher pairs of the
           256 + 32 train/val blocks written to disk, then MSE training at the default budget (`teacher_pairs`
           + `train` stages)
The stage cache is a fresh temporary directory for each trained arm (LLM_STREAMLINE_STAGES), so the pairs and
the training are computed, never reused. Reported: each round's seconds, the ratio fit / (pairs + training) per
round, and the ratio of the medians. Blocks as in the committed rows (the cosine choice for n = 8 and 9);
`--linear-block` / `--layer-block` change them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--linear-block", default="11,8", help="start,n of the training-free arm")
    ap.add_argument("--layer-block", default="10,9", help="start,n of the trained arm")
    ap.add_argument("--out", default="benchmarks/results/bench_fit_cost.json")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for both arms")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench_fit_cost-"))
    os.environ["LLM_STREAMLINE_STAGES"] = str(scratch / "stages")  # read at every stage lookup

    import torch

    from llm_streamline.composition import compose
    from llm_streamline.recipes.common import Timings, load_data, load_dense_model, start_run
    from llm_streamline.recipes.streamline import replace_block

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    common = ["wandb.mode=disabled", *args.overrides]
    arms = {"fit": (compose(["sparsity=net8", "replacement=linear", *common]), args.linear_block),
            "trained": (compose(["sparsity=net8", "replacement=layer", *common]), args.layer_block)}
    ctxs = {name: start_run(cfg, scratch / name) for name, (cfg, _) in arms.items()}
    first = ctxs["fit"]
    load_dense_model(first)
    load_data(first)
    for ctx in ctxs.values():
        ctx.model, ctx.tok, ctx.stack, ctx.blocks = first.model, first.tok, first.stack, first.blocks

    def run(name: str) -> dict:
        ctx, (_, block) = ctxs[name], arms[name]
        start, n = (int(v) for v in block.split(","))
        shutil.rmtree(scratch / "stages", ignore_errors=True)  # nothing reused: pairs and training computed
        ctx.timings = Timings()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        compressed = replace_block(ctx, start, n)
        wall = time.perf_counter() - t0
        del compressed
        t = dict(ctx.timings)
        method = t.get("fit", 0.0) if name == "fit" else t.get("teacher_pairs", 0.0) + t.get("train", 0.0)
        return {"block": [start, start + n], "stages": t, "method_s": round(method, 2), "wall_s": round(wall, 2),
                "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds: list[dict] = []
    result: dict = {}
    for r in range(args.rounds):
        order = ["fit", "trained"] if r % 2 == 0 else ["trained", "fit"]
        got = {name: run(name) for name in order}
        got["ratio"] = round(got["fit"]["method_s"] / got["trained"]["method_s"], 4)
        rounds.append(got)
        print(json.dumps({"round": r, **got}), flush=True)
        fit_med = statistics.median(x["fit"]["method_s"] for x in rounds)
        trained_med = statistics.median(x["trained"]["method_s"] for x in rounds)
        result = {
            "rounds": rounds,
            "fit_median_s": fit_med,
            "trained_median_s": trained_med,
            "ratio_of_medians": round(fit_med / trained_med, 4),
            "ratio_per_round_median": statistics.median(x["ratio"] for x in rounds),
            "threads": torch.get_num_threads(),
            "overrides": common,
            "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        }
        # after every round, replaced whole: a bench cut short still leaves its finished rounds
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
