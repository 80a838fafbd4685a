"""Peak RSS of training the replacement on N vs 4N blocks: teacher pairs streamed from disk vs all in RAM;
and (--recipe) the peak RSS of a whole run of the CLI, one source tree against another (one copy of the weights).

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--n 32] [--factor 4] [--seq-len 256] [--batch-size 8]
                                        [--start 16] [--layers 8] [--threads 1]
                                        [--out benchmarks/results/bench_memory.json]

Model: SmolLM2-135M-Instruct (fp32, CPU); block [start, start+layers) = [16, 24) by default; FFN replacement
(residual, width 1536); training blocks of the offline data config's length (256 tokens); epochs=1.

Two variants, each on N and factor*N training blocks (the same first blocks of one seeded split), each case
in a FRESH subprocess (ru_maxrss is a per-process high-water mark, so cases must not share a process):

* ``stream``: the project's path: ``write_teacher_shards`` (layers 0..start+layers-1 only, one
  safetensors shard per batch on disk) then ``train_mse`` streaming the shards back, one batch at a time.
* ``ram``: the authors' approach, written here: the same truncated forward (``run_layers``), but every
  (x_in, x_out) pair is kept in memory (preallocated tensors, so this is a lower bound for that approach)
  and the FFN is trained from those tensors with the same batch size, AdamW and MSE.

Reported per case: the process's peak RSS (ru_maxrss), the RSS after the model and data are loaded, and
the peak of each phase (collection, training) from VmHWM, reset between phases via /proc/self/clear_refs.
The relative rise from N to factor*N is reported for both variants. Target (issue): streaming rise < 10 %.

--recipe: ``python -m llm_streamline <RECIPE_OVERRIDES>`` once per ``--src NAME=PATH`` (PYTHONPATH=PATH selects the
source tree, e.g. ``before=/path/to/old/src after=src``), each in a fresh process with its own empty stage cache,
so every stage is computed; reported: each run's peak RSS (the largest of its per-stage peaks in results.json),
and the difference against the model's weight size. Default overrides: the default run (SmolLM2, one trained
decoder layer in place of 8, MSE, speed measured) with a small budget: 32 training blocks, 1 epoch, eval=smoke.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --recipe --src before=../main/src --src after=src \
        [--out benchmarks/results/bench_memory_recipe.json] [-- extra overrides]

--release: the pruned model's perplexity stage (SmolLM2 fp32, layers [start, start+layers) removed, the pruned model
over the dense one's weights, `share_weights`), in a fresh process each: with the dense model still held (`held`, the
recipes until the dense model was released after its last use) and released first (`released`,
`recipes.common.release_dense`); reported: RSS after the release and the stage's peak (VmHWM reset before it).

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --release [--start 16] [--layers 8] [--ppl-blocks 16]

--pruner: LLM-Pruner's Taylor importance and cut (`llm_pruner.apply`, n = --layers) on SmolLM2 fp32, once per
--src tree and for importance element1 and mix, each in a fresh process; its peak RSS inside apply.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --pruner --src before=../old/src --src after=src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _vm(key: str) -> float:
    """/proc/self/status value in MiB (VmRSS: current, VmHWM: peak since start or the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.config import DataConfig, ReplacementConfig, TrainConfig
    from llm_streamline.data import load_blocks
    from llm_streamline.models.layers import find_decoder_stack, run_layers
    from llm_streamline.models.loading import embedded_smollm2_dir
    from llm_streamline.replace import build_replacement
    from llm_streamline.train import _mse, train_mse, write_teacher_shards

    path = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    # the same split for every case: the largest request, then the first `blocks` training blocks
    data = load_blocks(DataConfig(seq_len=args.seq_len, calib_samples=1, train_samples=args.n * args.factor,
                                  val_samples=args.val_blocks), tok)
    train_blocks, val_blocks = data.train[:args.blocks].contiguous(), data.val
    stack = find_decoder_stack(model)
    start, n = args.start, args.layers
    torch.manual_seed(0)
    slot = build_replacement(ReplacementConfig(type="ffn"), list(stack.layers[start:start + n]), stack.config,
                             returns_tuple=False)
    tcfg = TrainConfig(epochs=1, batch_size=args.batch_size, first_token="exclude")
    rec = {"mode": args.mode, "blocks": args.blocks, "tokens": int(train_blocks.numel())}
    rec["rss_after_load_mib"] = _vm("VmRSS")
    rec["peak_after_load_mib"] = _vm("VmHWM")
    rec["peak_reset_supported"] = _reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if args.mode == "stream":
            tr = write_teacher_shards(model, train_blocks, start, n, Path(tmp) / "train", args.batch_size, "train")
            va = write_teacher_shards(model, val_blocks, start, n, Path(tmp) / "val", args.batch_size, "val")
            rec["collect_seconds"] = time.perf_counter() - t0
            rec["peak_collect_mib"] = _vm("VmHWM")
            rec["rss_after_collect_mib"] = _vm("VmRSS")
            _reset_peak()
            t1 = time.perf_counter()
            log = train_mse(model, slot, start, train_blocks, tr, va, tcfg, seed=0)
            rec["train_seconds"] = time.perf_counter() - t1
            rec["steps"], rec["best_val_loss"] = log.steps, log.best_val_loss
        else:
            d = model.config.hidden_size

            def collect(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x_in = torch.empty(blocks.shape[0], blocks.shape[1], d)
                x_out = torch.empty_like(x_in)
                for i in range(0, blocks.shape[0], args.batch_size):
                    cap = run_layers(model, blocks[i:i + args.batch_size], inputs_at=(start,),
                                     outputs_at=(start + n - 1,), stack=stack)
                    x_in[i:i + args.batch_size] = cap.inputs[start]
                    x_out[i:i + args.batch_size] = cap.outputs[start + n - 1]
                return x_in, x_out

            tx, ty = collect(train_blocks)
            vx, vy = collect(val_blocks)
            rec["collect_seconds"] = time.perf_counter() - t0
            rec["peak_collect_mib"] = _vm("VmHWM")
            rec["rss_after_collect_mib"] = _vm("VmRSS")
            _reset_peak()
            t1 = time.perf_counter()
            ffn = slot[0]
            opt = torch.optim.AdamW(ffn.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
            gen = torch.Generator().manual_seed(0)
            order = torch.randperm(tx.shape[0], generator=gen)
            steps = 0
            for i in range(0, tx.shape[0], args.batch_size):
                rows = order[i:i + args.batch_size]
                loss = _mse(ffn(tx[rows]), ty[rows], tcfg.first_token)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ffn.parameters(), tcfg.grad_clip)
                opt.step()
                steps += 1
            with torch.no_grad():
                rec["best_val_loss"] = _mse(ffn(vx), vy, tcfg.first_token).item()
            rec["train_seconds"] = time.perf_counter() - t1
            rec["steps"] = steps
            rec["pairs_in_ram_mib"] = (tx.numel() + ty.numel() + vx.numel() + vy.numel()) * 4 / 2**20
    rec["peak_train_mib"] = _vm("VmHWM")
    rec["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rec


def release_worker(args) -> dict:
    """One --release case (module docstring): the pruned model's perplexity with the dense model held or released."""
    torch.set_num_threads(args.threads)
    import gc
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.data import perplexity_text
    from llm_streamline.evaluate.perplexity import perplexity
    from llm_streamline.models.layers import find_decoder_stack, remove_block, share_weights
    from llm_streamline.models.loading import embedded_smollm2_dir
    from llm_streamline.recipes.common import release_dense

    path = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    text = perplexity_text("heldout", AutoTokenizer.from_pretrained(str(path)), args.seq_len, args.ppl_blocks)
    pruned = share_weights(model)
    remove_block(pruned, args.start, args.layers, [])  # the removed block object is dropped, as the recipe drops it
    ctx = SimpleNamespace(model=model, stack=find_decoder_stack(model))
    del model
    gc.collect()
    rec = {"mode": args.mode, "rss_before_mib": round(_vm("VmRSS"), 1)}
    if args.mode == "released":
        release_dense(ctx, pruned)
    rec["rss_after_release_mib"] = round(_vm("VmRSS"), 1)
    _reset_peak()
    t0 = time.perf_counter()
    ppl = perplexity(pruned, text.blocks, args.batch_size)
    rec.update(peak_perplexity_mib=round(_vm("VmHWM"), 1), seconds=round(time.perf_counter() - t0, 1),
               perplexity=ppl["ppl"], tokens=ppl["tokens"],
               removed_mib=round(sum(p.numel() * 4 for layer in ctx.stack.layers[args.start:args.start + args.layers]
                                     for p in layer.parameters()) / 2**20, 1) if ctx.stack is not None else None)
    return rec


def release(args) -> dict:
    """release_worker for held and released, each in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    runs = {}
    for mode in ("held", "released"):
        proc = subprocess.run([sys.executable, __file__, "--worker", "--release", "--mode", mode, "--start",
                               str(args.start), "--layers", str(args.layers), "--seq-len", str(args.seq_len),
                               "--ppl-blocks", str(args.ppl_blocks), "--batch-size", str(args.batch_size),
                               "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"--release {mode} failed with exit code {proc.returncode}")
        runs[mode] = json.loads(line[len("RESULT "):])
        print(f"{mode:8s}: {runs[mode]}", flush=True)
    drop = runs["held"]["peak_perplexity_mib"] - runs["released"]["peak_perplexity_mib"]
    return {"what": f"SmolLM2-135M fp32, layers [{args.start}, {args.start + args.layers}) removed; the pruned model's "
                    f"perplexity on {args.ppl_blocks} x {args.seq_len} tokens, batch {args.batch_size}",
            "runs": runs, "peak_drop_mib": round(drop, 1), "removed_block_mib": runs["held"]["removed_mib"],
            "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()}


def pruner_worker(args) -> dict:
    """LLM-Pruner's Taylor importance and cut on SmolLM2 (fp32), its own peak RSS (VmHWM reset after loading)."""
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from llm_streamline.baselines import llm_pruner
    from llm_streamline.config import LLMPrunerConfig, RunConfig
    from llm_streamline.models.loading import embedded_smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(embedded_smollm2_dir()), dtype=torch.float32).eval()
    calib = torch.randint(3, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    rec = {"importance": args.importance, "rss_after_load_mib": round(_vm("VmRSS"), 1)}
    _reset_peak()
    t0 = time.perf_counter()
    res = llm_pruner.apply(model, calib, args.layers, RunConfig(method=LLMPrunerConfig(
                                                                                    importance=args.importance)))
    rec.update(seconds=round(time.perf_counter() - t0, 1), peak_in_apply_mib=round(_vm("VmHWM"), 1),
               ratio=res.record["ratio"], params_removed=res.record["params_removed"])
    return rec


def pruner(args) -> dict:
    """pruner_worker once per --src tree and importance, each in a fresh process."""
    runs: dict[str, dict] = {}
    for spec in args.src:
        name, _, src = spec.partition("=")
        src = str(Path(src).resolve())
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        for imp in ("element1", "mix"):
            proc = subprocess.run([sys.executable, __file__, "--worker", "--pruner", "--importance", imp,
                                   "--layers", str(args.layers), "--threads", str(args.threads)], env=env,
                                  capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"llm_pruner with {name}={src} failed with exit code {proc.returncode}")
            runs.setdefault(name, {})[imp] = json.loads(line[len("RESULT "):])
            print(f"{name:8s} {imp:8s}: {runs[name][imp]}", flush=True)
    return {"what": "llm_pruner.apply on SmolLM2-135M fp32, 10 x 64-token gradient samples, n=layers", "runs": runs,
            "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()}


RECIPE_OVERRIDES = ["data.train_samples=32", "data.val_samples=8", "data.calib_samples=8", "train.epochs=1",
                    "eval=smoke", "eval.speed=true", "save=false", "wandb.mode=disabled"]


def recipe(args) -> dict:
    """The CLI run once per source tree (fresh process, fresh stage cache); peaks from each results.json."""
    overrides = RECIPE_OVERRIDES + list(args.overrides)
    runs = {}
    for spec in args.src:
        name, _, src = spec.partition("=")
        src = str(Path(src).resolve())
        commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # before the run: the code it imports
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True).stdout.strip()
        commit += "+changes" if dirty else ""
        with tempfile.TemporaryDirectory(prefix="bench-memory-recipe-") as tmp:
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled",
                   "TQDM_DISABLE": "1", "LLM_STREAMLINE_STAGES": str(Path(tmp) / "stages")}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "llm_streamline", *overrides,
                                   f"hydra.run.dir={Path(tmp) / 'run'}"], env=env, capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"the run with {name}={src} failed with exit code {proc.returncode}")
            res = json.loads((Path(tmp) / "run" / "results.json").read_text())
        stage_rss = res["peak_memory"].get("stage_rss_mib") or {}
        # records before the run's peak was folded over its stages (Timings) held only the last stage's in
        # rss_mib: the largest of both
        runs[name] = {"src": src, "commit": commit, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mib": max([res["peak_memory"]["rss_mib"], *stage_rss.values()]),
                      "stage_rss_mib": stage_rss, "timings": res["timings"],
                      "params_dense": res["params"]["dense"], "layers_removed": res["layers"]["removed"]}
        print(f"{name:8s} ({commit}): peak RSS {runs[name]['peak_rss_mib']:.0f} MiB in {runs[name]['seconds']:.0f} s; "
              f"per stage {runs[name]['stage_rss_mib']}", flush=True)
    first = next(iter(runs.values()))
    weights_mib = first["params_dense"] * 4 / 2**20  # fp32 on the CPU
    out = {"overrides": overrides, "model_weights_mib": round(weights_mib, 1), "runs": runs,
           "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()}
    names = list(runs)
    if len(names) == 2:
        drop = runs[names[0]]["peak_rss_mib"] - runs[names[1]]["peak_rss_mib"]
        out["peak_rss_drop_mib"] = round(drop, 1)
        out["drop_of_model_size"] = round(drop / weights_mib, 3)
        print(f"peak RSS {names[0]} -> {names[1]}: -{drop:.0f} MiB = {drop / weights_mib:.2f} x the weights "
              f"({weights_mib:.0f} MiB)")
    return out


def _write(dest: Path, out: dict) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="training blocks of the small case")
    ap.add_argument("--factor", type=int, default=4, help="the large case has factor * n blocks")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per block (the offline data config's)")
    ap.add_argument("--val-blocks", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--start", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    ap.add_argument("--target-rise", type=float, default=0.10)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/bench_memory[_recipe].json")
    ap.add_argument("--recipe", action="store_true", help="peak RSS of a whole CLI run per --src tree")
    ap.add_argument("--src", action="append", default=[], help="NAME=PATH of a source tree (--recipe, --pruner)")
    ap.add_argument("--pruner", action="store_true", help="peak RSS of LLM-Pruner's importance + cut per --src tree")
    ap.add_argument("--release", action="store_true", help="the pruned model's perplexity peak, dense held vs released")
    ap.add_argument("--ppl-blocks", type=int, default=16, help="--release: perplexity blocks")
    ap.add_argument("--importance", default="element1", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides of the --recipe run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("stream", "ram", "held", "released"), help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        work = pruner_worker if args.pruner else release_worker if args.release else worker
        print("RESULT " + json.dumps(work(args)))
        return {}
    if args.release:
        out = release(args)
        _write(Path(args.out or "benchmarks/results/bench_memory_release.json"), out)
        return out
    if args.pruner:
        out = pruner(args)
        _write(Path(args.out or "benchmarks/results/bench_memory_llm_pruner.json"), out)
        return out
    if args.recipe:
        if not args.src:
            ap.error("--recipe needs at least one --src NAME=PATH")
        out = recipe(args)
        _write(Path(args.out or "benchmarks/results/bench_memory_recipe.json"), out)
        return out

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    common = ["--n", str(args.n), "--factor", str(args.factor), "--seq-len", str(args.seq_len),
              "--val-blocks", str(args.val_blocks), "--batch-size", str(args.batch_size),
              "--start", str(args.start), "--layers", str(args.layers), "--threads", str(args.threads)]
    load_start = os.getloadavg()
    cases: dict[str, dict[str, dict]] = {"stream": {}, "ram": {}}
    for blocks in (args.n, args.n * args.factor):
        for mode in ("stream", "ram"):
            proc = subprocess.run([sys.executable, __file__, "--worker", "--mode", mode, "--blocks", str(blocks),
                                   *common], env=env, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"worker {mode} {blocks} failed with exit code {proc.returncode}")
            cases[mode][str(blocks)] = json.loads(line[len("RESULT "):])
            r = cases[mode][str(blocks)]
            print(f"{mode:6s} {blocks:4d} blocks: ru_maxrss {r['ru_maxrss_mib']:.0f} MiB, "
                  f"after load {r['rss_after_load_mib']:.0f}, collect peak {r['peak_collect_mib']:.0f}, "
                  f"train peak {r['peak_train_mib']:.0f}", flush=True)

    small, large = str(args.n), str(args.n * args.factor)

    def rise(mode: str, key: str) -> dict:
        a, b = cases[mode][small][key], cases[mode][large][key]
        return {"small_mib": a, "large_mib": b, "rise_mib": b - a, "relative_rise": (b - a) / a}

    out = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)", "replacement": "ffn (residual, width 1536)",
        "block": [args.start, args.start + args.layers], "seq_len": args.seq_len, "batch_size": args.batch_size,
        "val_blocks": args.val_blocks, "epochs": 1, "train_blocks": {"small": args.n, "large": args.n * args.factor},
        "torch_threads": args.threads, "omp_num_threads": str(args.threads),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "cases": cases,
        "peak_rss_rise": {mode: rise(mode, "ru_maxrss_mib") for mode in cases},
        "train_phase_peak_rise": {mode: rise(mode, "peak_train_mib") for mode in cases},
        "target_streaming_rise": args.target_rise,
    }
    out["target_met"] = out["peak_rss_rise"]["stream"]["relative_rise"] < args.target_rise
    _write(Path(args.out or "benchmarks/results/bench_memory.json"), out)
    print(json.dumps({"peak_rss_rise": out["peak_rss_rise"], "target_met": out["target_met"]}, indent=1))
    return out


if __name__ == "__main__":
    main()
