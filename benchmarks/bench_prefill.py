"""Dense vs pruned prefill throughput on SmolLM2-135M: measured speedup vs the FLOP-predicted speedup.

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill.py [--ks 4 8 12] [--replacements none ffn] [--end 24]
                                         [--batch-size 1] [--prompt-len 1024] [--rounds 4] [--threads 1]
                                         [--out benchmarks/results/bench_prefill.json]

For each k, layers [end-k, end) are removed with the project's ``models.layers.remove_block`` and the slot gets
``replace.build_replacement`` of each type (``none``: plain pruning; ``ffn``: Linear-SiLU-Linear of the MLP
width, residual). Weights do not change the cost, so the replacement is left untrained. One prefill is what
``evaluate.speed.measure_throughput`` times (``speed._one_run``: one forward over the prompt with a KV cache,
LM head on the last position only); every model gets one warm-up, then ``rounds`` rounds in which every
model (dense and all pruned ones) runs once, in an order rotated each round, so that load from other
processes hits all alike. Speedup = median dense seconds / median pruned seconds (also the median of the
per-round paired ratios).

Predicted speedup: ``evaluate.speed.flops_per_token`` ratio dense / pruned (the number the pipeline
reports next to the measured speed). That formula counts the LM head on every token, which a prefill with
``logits_to_keep=1`` does not compute, so it under-predicts the gain of a prefill; the ratio without the
head (``flops_per_token - 2 * head weights``) is reported too. Gain = speedup - 1; the target (issue) is a
measured gain >= 90 % of the predicted gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--replacements", nargs="+", default=["none", "ffn"])
    ap.add_argument("--end", type=int, default=24, help="one past the last removed layer")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    ap.add_argument("--target", type=float, default=0.9, help="measured gain / predicted gain")
    ap.add_argument("--out", default="benchmarks/results/bench_prefill.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import time

    from transformers import AutoModelForCausalLM

    from llm_streamline.config import ReplacementConfig
    from llm_streamline.evaluate.speed import _one_run, flops_per_token
    from llm_streamline.models.anatomy import anatomy_of
    from llm_streamline.models.layers import count_params, find_decoder_stack, remove_block, run_layers
    from llm_streamline.models.loading import embedded_smollm2_dir
    from llm_streamline.replace import build_replacement

    path = embedded_smollm2_dir()
    dense = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    L = find_decoder_stack(dense).num_layers
    head = dense.get_output_embeddings().weight.numel()
    probe = run_layers(dense, torch.zeros(1, 4, dtype=torch.long), outputs_at=(0,))
    models: dict[str, torch.nn.Module] = {"dense": dense}
    blocks: dict[str, dict] = {}
    for k in args.ks:
        start = args.end - k
        if start < 0:
            raise SystemExit(f"k={k} does not fit before layer {args.end}")
        for rtype in args.replacements:
            m = copy.deepcopy(dense)
            st = find_decoder_stack(m)
            torch.manual_seed(0)
            slot = build_replacement(ReplacementConfig(type=rtype), list(st.layers[start:start + k]), st.config,
                                     probe.output_is_tuple, anatomy_of(m, start))
            blocks[f"k{k}-{rtype}"] = remove_block(m, start, k, slot).as_dict()
            models[f"k{k}-{rtype}"] = m.eval()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dense.get_input_embeddings().num_embeddings, (args.batch_size, args.prompt_len),
                        generator=gen)

    def prefill(m) -> float:
        t0 = time.perf_counter()
        _one_run(m, ids, 0)
        return time.perf_counter() - t0

    load_start = os.getloadavg()
    for m in models.values():
        prefill(m)  # warm-up
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(prefill(models[n]))
    load_end = os.getloadavg()

    tokens = args.batch_size * args.prompt_len
    fd = flops_per_token(dense, args.prompt_len)
    med_d = statistics.median(times["dense"])
    configs = {}
    for n in names[1:]:
        fp = flops_per_token(models[n], args.prompt_len)
        med = statistics.median(times[n])
        speedup = med_d / med
        paired = statistics.median(d / p for d, p in zip(times["dense"], times[n]))
        pred = fd / fp
        pred_nohead = (fd - 2 * head) / (fp - 2 * head)
        configs[n] = {
            "block": blocks[n], "params": count_params(models[n]),
            "seconds_median": med, "seconds_all": times[n], "prefill_tokens_per_s": tokens / med,
            "speedup": speedup, "speedup_paired_median": paired,
            "flops_per_token": fp, "predicted_speedup": pred, "predicted_speedup_without_head": pred_nohead,
            "gain_fraction": (speedup - 1) / (pred - 1),
            "gain_fraction_without_head": (speedup - 1) / (pred_nohead - 1),
        }
        configs[n]["target_met"] = configs[n]["gain_fraction"] >= args.target
    out = {
        "model": f"SmolLM2-135M-Instruct (fp32, CPU, {L} layers)",
        "batch_size": args.batch_size, "prompt_len": args.prompt_len, "rounds": args.rounds,
        "prefill": "speed._one_run: forward with KV cache, logits_to_keep=1",
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "loadavg_start": load_start, "loadavg_end": load_end,
        "dense": {"seconds_median": med_d, "seconds_all": times["dense"], "prefill_tokens_per_s": tokens / med_d,
                  "flops_per_token": fd, "params": count_params(dense)},
        "pruned": configs,
        "target_gain_fraction": args.target,
        "all_targets_met": all(c["target_met"] for c in configs.values()),
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, dest)
    print(f"dense: {med_d:.3f} s ({tokens / med_d:.0f} tok/s)")
    for n, c in configs.items():
        print(f"{n:10s} speedup {c['speedup']:.3f} (paired {c['speedup_paired_median']:.3f}); predicted "
              f"{c['predicted_speedup']:.3f} (no head {c['predicted_speedup_without_head']:.3f}); gain fraction "
              f"{c['gain_fraction']:.2f} (no head {c['gain_fraction_without_head']:.2f})")
    return out


if __name__ == "__main__":
    main()
