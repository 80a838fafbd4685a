"""A sweep of k pruned configurations evaluates the dense model once: read it from each job's results.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_sweep_reuse.py [--layers 1 2 3] [--experiment smoke] [--threads 1]
                                             [--keep] [--out benchmarks/results/bench_sweep_reuse.json]

Runs one Hydra multirun with the CLI, as a user would:

    python -m llm_streamline -m experiment=smoke sparsity.layers=1,2,3 hydra.sweep.dir=<tmp>/sweep

(tiny random Llama, tiny data, smoke training and evaluation) with a fresh, empty stage cache
(``LLM_STREAMLINE_STAGES=<tmp>/stages``) and ``WANDB_MODE=disabled``, so nothing is reused from an earlier
run and the user's cache is not touched. Then reads each job's ``results.json``: ``timings`` (seconds per
stage) and ``cache.dense_eval_reused``. Target (README, Sweeps): the dense evaluation runs in job 0 only and
is reused by every other job (``dense_eval_reused`` false for job 0, true for the rest, and a much shorter
``eval_dense`` stage in the later jobs). The temporary directory is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="sparsity.layers of the k jobs")
    ap.add_argument("--experiment", default="smoke")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the CLI process")
    ap.add_argument("--keep", action="store_true", help="keep the temporary sweep and stage directories")
    ap.add_argument("--out", default="benchmarks/results/bench_sweep_reuse.json")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    sweep, stages = tmp / "sweep", tmp / "stages"
    stages.mkdir()
    cmd = [sys.executable, "-m", "llm_streamline", "-m", f"experiment={args.experiment}",
           "sparsity.layers=" + ",".join(map(str, args.layers)), f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "LLM_STREAMLINE_STAGES": str(stages), "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the sweep failed with exit code {proc.returncode}")
        jobs = []
        for res in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name.split("-", 1)[0])):
            r = json.loads(res.read_text())
            jobs.append({
                "job": int(res.parent.name.split("-", 1)[0]), "dir": res.parent.name,
                "n_removed": r["layers"]["n_removed"], "removed": r["layers"]["removed"],
                "dense_eval_reused": r["cache"]["dense_eval_reused"],
                "eval_dense_seconds": r["timings"].get("eval_dense"),
                "eval_pruned_seconds": r["timings"].get("eval_pruned"),
                "timings": r["timings"],
            })
        stage_kinds: dict[str, int] = {}
        for p in stages.iterdir():
            kind = p.name.split("-", 1)[0]
            stage_kinds[kind] = stage_kinds.get(kind, 0) + 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    ok = (len(jobs) == len(args.layers) and not jobs[0]["dense_eval_reused"]
          and all(j["dense_eval_reused"] for j in jobs[1:]))
    out = {
        "command": " ".join(["python", *cmd[1:]]).replace(str(sweep), "<tmp>/sweep"),
        "env": {"LLM_STREAMLINE_STAGES": "<tmp>/stages (fresh, empty)", "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": str(args.threads)},
        "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "sweep_wall_seconds": wall,
        "jobs": jobs,
        "stage_cache_entries_by_kind": stage_kinds if not args.keep else {**stage_kinds, "kept_at": str(stages)},
        "dense_eval_computed_once": ok,
        "eval_dense_seconds_job0": jobs[0]["eval_dense_seconds"] if jobs else None,
        "eval_dense_seconds_reused_jobs": [j["eval_dense_seconds"] for j in jobs[1:]],
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpf = dest.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(out, indent=2))
    os.replace(tmpf, dest)
    for j in jobs:
        print(f"job {j['job']} ({j['dir']}): dense_eval_reused={j['dense_eval_reused']} "
              f"eval_dense {j['eval_dense_seconds']} s, eval_pruned {j['eval_pruned_seconds']} s")
    print(f"dense evaluation computed once: {ok}; sweep wall {wall:.1f} s; stage cache: {stage_kinds}")
    return out


if __name__ == "__main__":
    main()
