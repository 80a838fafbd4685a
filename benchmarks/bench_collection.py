"""Hidden-state collection (run_layers, truncated forward) vs a full forward with output_hidden_states.

    OMP_NUM_THREADS=1 python benchmarks/bench_collection.py [--blocks 2] [--seq-len 2048] [--batch-size 2]
                                          [--end 24] [--rounds 3] [--threads 1] [--data offline|random] [--profile]
                                          [--out benchmarks/results/bench_collection.json]

Model: SmolLM2-135M-Instruct (30 layers, fp32, CPU). The teacher pairs of a block ending at layer ``end``
(default 24 of 30) need x^(start) and x^(end): ``run_layers(model, ids, inputs_at=(start,),
outputs_at=(end - 1,))`` runs layers 0..end-1 only, no final norm, no LM head. The reference is what the
authors' code does: ``model(ids, output_hidden_states=True)`` (all 30 layers and the LM head over every
position). Both run on the same token batches, alternating (collect, full, collect, full, ...) after one
warm-up each, so that load from other processes hits both alike; medians over ``rounds``.

In the same process the machine's fp32 GEMM rate is measured with ``torch.mm`` on the shapes of the
model's linear layers ([tokens, 576] x [576, 1536], [tokens, 1536] x [1536, 576], [tokens, 576] x
[576, 576]) and a large square one (the ceiling). The collection's achieved FLOP/s counts, for layers
0..end-1 only, 2 FLOPs per matmul weight per token plus the causal attention scores/values
(``evaluate/speed.py``: 2 * d_attn * (seq_len + 1) per layer per token); norms, activations, softmax and
rotary embeddings count nothing. If the collection reaches less than ``--target-gemm-fraction`` of the
GEMM ceiling (or with ``--profile``), a torch.profiler breakdown of one collection batch (top ops by
self CPU time) is added.
Targets (issue): collection >= 1.3x faster than the full forward, and >= 60 % of the GEMM ceiling.
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
from torch import nn


def gemm_rate(m: int, k: int, n: int, repeats: int) -> float:
    """Median FLOP/s of an fp32 [m, k] x [k, n] torch.mm (one warm-up)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / statistics.median(times)


def layer_flops_per_token(layers: list[nn.Module], seq_len: int) -> float:
    from llm_streamline.evaluate.speed import attention_widths, matmul_params

    part = nn.ModuleList(layers)
    return 2.0 * matmul_params(part) + sum(2.0 * d * (seq_len + 1) for d in attention_widths(part))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="token blocks in the measured set")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--start", type=int, default=16, help="first layer of the block (its input is kept)")
    ap.add_argument("--end", type=int, default=24, help="one past the block's last layer: layers 0..end-1 run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemm-repeats", type=int, default=5)
    ap.add_argument("--data", choices=("offline", "random"), default="offline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    ap.add_argument("--target-speedup", type=float, default=1.3)
    ap.add_argument("--target-gemm-fraction", type=float, default=0.6)
    ap.add_argument("--profile", action="store_true", help="add the profiler breakdown even if the target is met")
    ap.add_argument("--out", default="benchmarks/results/bench_collection.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.config import DataConfig
    from llm_streamline.evaluate.speed import flops_per_token
    from llm_streamline.models.layers import find_decoder_stack, run_layers
    from llm_streamline.models.loading import embedded_smollm2_dir

    path = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    stack = find_decoder_stack(model)
    L = stack.num_layers
    if not 0 <= args.start < args.end <= L:
        raise SystemExit(f"need 0 <= start < end <= {L}")
    if args.data == "offline":
        from llm_streamline.data import load_blocks

        tok = AutoTokenizer.from_pretrained(str(path))
        blocks = load_blocks(DataConfig(seq_len=args.seq_len, calib_samples=args.blocks, train_samples=1,
                                        val_samples=1), tok).calib
    else:
        gen = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, model.get_input_embeddings().num_embeddings, (args.blocks, args.seq_len),
                               generator=gen)
    batches = [blocks[i:i + args.batch_size] for i in range(0, blocks.shape[0], args.batch_size)]
    tokens = blocks.numel()

    @torch.no_grad()
    def collect() -> float:
        t0 = time.perf_counter()
        for ids in batches:
            cap = run_layers(model, ids, inputs_at=(args.start,), outputs_at=(args.end - 1,), stack=stack)
            assert cap.outputs[args.end - 1].shape[1] == args.seq_len
        return time.perf_counter() - t0

    @torch.no_grad()
    def full() -> float:
        t0 = time.perf_counter()
        for ids in batches:
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            x_in, x_out = out.hidden_states[args.start], out.hidden_states[args.end]  # noqa: F841
            del out
        return time.perf_counter() - t0

    # same hidden states from both paths (x^(end) of the full forward is the un-normed output of layer end-1
    # unless end == L, where transformers applies the final norm)
    with torch.no_grad():
        ids = batches[0][:1, :128]
        cap = run_layers(model, ids, inputs_at=(args.start,), outputs_at=(args.end - 1,), stack=stack)
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        max_diff = max((cap.inputs[args.start] - ref[args.start]).abs().max().item(),
                       (cap.outputs[args.end - 1] - ref[args.end]).abs().max().item() if args.end < L else 0.0)

    load_start = os.getloadavg()
    collect(), full()  # warm-up
    times: dict[str, list[float]] = {"collect": [], "full": []}
    for _ in range(args.rounds):
        times["collect"].append(collect())
        times["full"].append(full())
    load_after_timing = os.getloadavg()

    m = args.batch_size * args.seq_len  # tokens per batch: the rows of every linear layer's matmul
    d, w = model.config.hidden_size, model.config.intermediate_size
    rows = [(m, d, w), (m, w, d), (m, d, d), (2048, 2048, 2048)]
    gemm = {f"{m}x{k}x{n}": gemm_rate(m, k, n, args.gemm_repeats) for m, k, n in rows}
    ceiling = max(gemm.values())

    f_collect = layer_flops_per_token(list(stack.layers[:args.end]), args.seq_len)
    f_full = flops_per_token(model, args.seq_len)
    med = {k: statistics.median(v) for k, v in times.items()}
    achieved = f_collect * tokens / med["collect"]
    out = {
        "model": f"SmolLM2-135M-Instruct (fp32, CPU, {L} layers)",
        "data": args.data, "blocks": args.blocks, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "tokens": tokens, "block": {"start": args.start, "end": args.end, "layers_run_by_collection": args.end},
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "loadavg_start": load_start, "loadavg_after_timing": load_after_timing, "loadavg_end": os.getloadavg(),
        "max_abs_hidden_diff_collect_vs_full": max_diff,
        "seconds": {k: {"median": med[k], "min": min(v), "all": v} for k, v in times.items()},
        "tokens_per_s": {k: tokens / med[k] for k in med},
        "speedup": med["full"] / med["collect"],
        "speedup_min": min(times["full"]) / min(times["collect"]),
        "flops_per_token": {"collect_layers_0_to_end": f_collect, "full_forward_with_head": f_full},
        "flop_ratio_full_over_collect": f_full / f_collect,
        "gemm_flops_per_s": gemm,
        "gemm_ceiling_flops_per_s": ceiling,
        "collect_flops_per_s": achieved,
        "collect_fraction_of_gemm_ceiling": achieved / ceiling,
        "full_flops_per_s": f_full * tokens / med["full"],
        "full_fraction_of_gemm_ceiling": f_full * tokens / med["full"] / ceiling,
        "targets": {"speedup": args.target_speedup, "gemm_fraction": args.target_gemm_fraction},
    }
    out["targets_met"] = {"speedup": out["speedup"] >= args.target_speedup,
                          "gemm_fraction": out["collect_fraction_of_gemm_ceiling"] >= args.target_gemm_fraction}

    if args.profile or not out["targets_met"]["gemm_fraction"]:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            run_layers(model, batches[0], inputs_at=(args.start,), outputs_at=(args.end - 1,), stack=stack)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        out["profile_one_collect_batch"] = {
            "total_self_cpu_ms": total / 1e3,
            "top_ops_by_self_cpu": [
                {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                 "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                for e in events[:15]],
        }

    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, dest)
    keys = ("speedup", "speedup_min", "flop_ratio_full_over_collect", "gemm_ceiling_flops_per_s",
            "collect_flops_per_s", "collect_fraction_of_gemm_ceiling", "targets_met")
    print(json.dumps({k: out[k] for k in keys}, indent=1))
    print({k: round(v, 2) for k, v in med.items()})
    if "profile_one_collect_batch" in out:
        for row in out["profile_one_collect_batch"]["top_ops_by_self_cpu"][:8]:
            print(row)
    return out


if __name__ == "__main__":
    main()
