"""One MSE training step of a decoder-layer replacement on SmolLM2-135M: the layer's call arguments captured
every step (before: a forward through layers 0..start-1 per step) vs once per batch shape (now).

    OMP_NUM_THREADS=1 python benchmarks/bench_layer_step.py [--start 11] [--batch-size 8] [--seq-len 256]
                                                            [--rounds 5] [--threads 1]

The call arguments (causal mask, rotary cos/sin, position ids) depend on the batch shape only (the test
`test_layer_call_arguments_depend_on_shape_not_tokens` checks it per family), so `train_mse` captures them
once. Timed side by side, interleaved: (a) the capture alone (`run_layers(..., kwargs_at=(start,))`, what
every step paid before), (b) the step itself (forward + backward + AdamW of the layer on a teacher batch).
Before = a + b per step, now = b; medians over rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/bench_layer_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from llm_streamline.models.layers import find_decoder_stack, run_layers
    from llm_streamline.models.loading import embedded_smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(embedded_smollm2_dir()), dtype=torch.float32).eval()
    stack = find_decoder_stack(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    layer = copy.deepcopy(stack.layers[args.start]).train()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    with torch.no_grad():
        x = run_layers(model, ids, inputs_at=(args.start,), stack=stack).inputs[args.start]
    y = x + 0.01 * torch.randn_like(x)

    def capture():
        return run_layers(model, ids, kwargs_at=(args.start,), stack=stack).call_kwargs[args.start]

    kwargs = capture()

    def step():
        out = layer(x, **kwargs)
        loss = torch.nn.functional.mse_loss(out[0] if isinstance(out, tuple) else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    timed(capture), timed(step)  # warm-up
    cap_s, step_s = [], []
    for _ in range(args.rounds):
        cap_s.append(timed(capture))
        step_s.append(timed(step))
    a, b = statistics.median(cap_s), statistics.median(step_s)
    result = {
        "start": args.start, "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
        "capture_s": cap_s, "step_s": step_s, "capture_median_s": a, "step_median_s": b,
        "before_step_s": a + b, "now_step_s": b, "speedup": (a + b) / b,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "host": {"python": platform.python_version(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"capture {a:.3f} s + step {b:.3f} s per step before, {b:.3f} s now: {(a + b) / b:.2f}x "
          f"(start={args.start}, {args.batch_size}x{args.seq_len} tokens, {torch.get_num_threads()} thread(s))")
    return result


if __name__ == "__main__":
    main()
