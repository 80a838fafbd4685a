"""Stock HFLM vs FastHFLM (shared-context scoring) on SmolLM2-135M: time, accuracy, score agreement.

    python benchmarks/bench_scoring.py [--tasks piqa hellaswag] [--limit 50] [--batch-size 16]
                                       [--repeats 1] [--out benchmarks/results/bench_scoring.json]

Both scorers run in the same process, alternating (stock, fast, stock, fast, ...) so that load from
other processes on the machine hits both alike; the task data is built once beforehand so that
neither run pays for it. Reported per scorer: median and min wall time of the lm-eval run, acc/acc_norm per
task; and the largest per-option log-likelihood difference and the number of items whose prediction
differs. The machine's load average is recorded: on a shared 2-core machine it matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag"])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/bench_scoring.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.evaluate.harness import run_lm_eval
    from llm_streamline.evaluate.tasks import build_tasks
    from llm_streamline.models.loading import embedded_smollm2_dir

    path = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    build_tasks(args.tasks)  # data preparation out of the timed runs
    load_start = os.getloadavg()

    runs: dict[str, list] = {"hflm": [], "fast": []}
    for _ in range(args.repeats):
        for scorer in ("hflm", "fast"):
            t0 = time.perf_counter()
            res = run_lm_eval(model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size, scorer=scorer)
            runs[scorer].append((time.perf_counter() - t0, res))

    stock = {(r["task"], r["doc_id"]): r for r in runs["hflm"][-1][1].samples}
    fast_rows = runs["fast"][-1][1].samples
    max_diff = max(
        abs(a - b)
        for r in fast_rows
        for a, b in zip(r["loglikelihoods"], stock[(r["task"], r["doc_id"])]["loglikelihoods"])
    )
    flips = sum(r["prediction"] != stock[(r["task"], r["doc_id"])]["prediction"] for r in fast_rows)
    out = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "scorers": {
            name: {
                "seconds_median": statistics.median(t for t, _ in rs),
                "seconds_min": min(t for t, _ in rs),
                "seconds_all": [t for t, _ in rs],
                "metrics": {t: rs[-1][1].metrics[t] for t in args.tasks},
            }
            for name, rs in runs.items()
        },
        "max_abs_loglik_diff": max_diff,
        "prediction_flips": flips,
        "items": len(fast_rows),
    }
    sc = out["scorers"]
    out["speedup"] = sc["hflm"]["seconds_median"] / sc["fast"]["seconds_median"]
    out["speedup_min"] = sc["hflm"]["seconds_min"] / sc["fast"]["seconds_min"]
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, dest)
    keys = ("speedup", "speedup_min", "max_abs_loglik_diff", "prediction_flips", "items")
    print(json.dumps({k: out[k] for k in keys}))
    print({n: round(s["seconds_median"], 1) for n, s in out["scorers"].items()})
    return out


if __name__ == "__main__":
    main()
