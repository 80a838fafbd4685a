"""The paper's path at Llama-2-7B's real shapes on one GPU, with random weights: similarity profile, teacher pairs
and a short training of the replacement (one decoder layer, MSE) on them both ways, online (train.OnlineTeacher:
computed batch by batch, nothing written) and cached (shards on disk); removing the block, a small evaluation
(perplexity on random tokens, dense and pruned, and decode speed) and saving the pruned model. Each stage's wall
time and peak accelerator memory are set beside the plan's figures for the same workload (`llm_streamline.plan`,
from the same config.json).

    python benchmarks/gpu_scale.py --out results/gpu_scale            # on a CUDA machine: bf16, Llama-2-7B shapes
    python benchmarks/gpu_scale.py --tiny --out /tmp/gpu_scale         # a 4-layer, 64-wide copy on the CPU in seconds

The model is built on the meta device from the packaged config.json and materialised on the device with
`to_empty` (no CPU copy, no slow init): weights N(0, 0.02), norms 1, biases 0; the rotary tables are rebuilt.
Writes `<out>/gpu_scale.json` and `<out>/gpu_scale.md`. Stages run through the package's own functions
(importance.similarity_profile, train.OnlineTeacher, write_teacher_shards and train_mse, layers.remove_block,
evaluate.perplexity, evaluate.speed, models.checkpoints.save_checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

HUB_ID = "meta-llama/Llama-2-7b-hf"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=512, max_position_embeddings=256)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 4-layer 64-wide model on the CPU (fp32): checks the script")
    p.add_argument("--out", default="gpu_scale_out", help="where gpu_scale.json / .md go")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 2048; --tiny 32)")
    p.add_argument("--calib", type=int, default=16, help="calibration blocks of the similarity profile")
    p.add_argument("--train-blocks", type=int, default=64, help="blocks of teacher pairs for training")
    p.add_argument("--val-blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="layers removed (default 8 of 32; --tiny 2)")
    p.add_argument("--ppl-blocks", type=int, default=16)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--hub-id", default=HUB_ID, help="whose packaged config.json gives the shapes "
                   "(src/llm_streamline/models/configs/<id with / as -->)")
    p.add_argument("--set", default="", help="config overrides, e.g. hidden_size=1024,num_hidden_layers=16")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: this process's CPU seconds (on a shared CPU with one thread, the work done "
                        "whatever the load; for comparing models, not for absolute speed)")
    return p.parse_args(argv)


def materialise(config, device: str, dtype: torch.dtype, seed: int = 0):
    """The model built on meta and given storage on `device` without running its initialisers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("weight") and "norm" in name.rsplit(".", 2)[-2]:
                p.fill_(1.0)
            else:
                p.zero_()
        for mod in model.modules():  # buffers computed in __init__ (rotary inv_freq): rebuilt on the CPU, copied
            if getattr(mod, "_non_persistent_buffers_set", None) and hasattr(mod, "config"):
                fresh = type(mod)(mod.config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    getattr(mod, bname).copy_(buf.to(device))
    model.tie_weights()
    return model.eval()


class Stages:
    """Wall time (synchronised) and peak accelerator memory of each stage."""

    def __init__(self, device: str, clock: str = "wall"):
        self.cuda = device.startswith("cuda")
        self.clock = time.process_time if clock == "process" else time.perf_counter
        self.rows: dict[str, dict] = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = self.clock()
        yield
        self.sync()
        row = {"seconds": round(self.clock() - t0, 3)}
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.rows[name] = row
        print(f"{name}: {row}", flush=True)


def run_config(args, device: str, dtype_name: str, seq: int):
    """The RunConfig whose plan prices this benchmark's workload."""
    from llm_streamline.config import (
        DataConfig,
        EvalConfig,
        ModelConfig,
        PlanConfig,
        RunConfig,
        SparsityConfig,
        TrainConfig,
    )

    return RunConfig(
        model=ModelConfig(name="random", source="hub", name_or_path=args.hub_id, dtype=dtype_name, device=device),
        data=DataConfig(seq_len=seq, calib_samples=args.calib, train_samples=args.train_blocks,
                        val_samples=args.val_blocks),
        sparsity=SparsityConfig(layers=args.n), train=TrainConfig(epochs=1, batch_size=args.batch, teacher="cached"),
        eval=EvalConfig(tasks=[], perplexity_blocks=args.ppl_blocks, speed_tokens=min(256, seq)),
        plan=PlanConfig(devices=1, disk_free_gib=1e6, host_ram_gib=1e6), save=not args.no_save)


def main(argv=None) -> dict:
    args = parse(argv)
    from transformers import AutoConfig

    from llm_streamline import plan
    from llm_streamline.config import ReplacementConfig
    from llm_streamline.evaluate.perplexity import perplexity
    from llm_streamline.evaluate.speed import measure_throughput
    from llm_streamline.importance import similarity_profile
    from llm_streamline.models.checkpoints import save_checkpoint
    from llm_streamline.models.layers import find_decoder_stack, remove_block, run_layers
    from llm_streamline.preflight import packaged_config_dir
    from llm_streamline.replace import build_replacement
    from llm_streamline.train import OnlineTeacher, train_mse, write_teacher_shards

    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_scale: no CUDA device here (use --tiny for the CPU check)")
    dtype_name = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    if packaged_config_dir(args.hub_id) is None:
        sys.exit(f"gpu_scale: no packaged config.json for {args.hub_id}")
    config = AutoConfig.from_pretrained(str(packaged_config_dir(args.hub_id)))
    overrides = dict(TINY) if args.tiny else {}
    for item in filter(None, args.set.split(",")):
        k, v = item.split("=", 1)
        overrides[k] = (int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v.lower(), v))
    for k, v in overrides.items():
        setattr(config, k, v)
    if args.tiny:
        args.n = min(args.n, 2)
    seq = args.seq_len or (32 if args.tiny else 2048)
    plan_config = copy.deepcopy(config)  # removing the block edits the model's config in place
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_scale-", dir=out))
    cfg = run_config(args, device, dtype_name, seq)
    torch.manual_seed(0)
    V = config.vocab_size
    calib = torch.randint(0, V, (args.calib, seq))
    train_blocks = torch.randint(0, V, (args.train_blocks, seq))
    val_blocks = torch.randint(0, V, (args.val_blocks, seq))
    ppl_blocks = torch.randint(0, V, (args.ppl_blocks, seq))
    st = Stages(device, args.clock)
    try:
        with st.stage("load_model"):
            model = materialise(config, device, dtype)
        stack = find_decoder_stack(model)
        L, n = stack.num_layers, args.n
        with st.stage("importance"):
            profile = similarity_profile(model, calib, ns=list(range(1, L + 1)), batch_size=args.batch)
        start = min(max(profile.best_start(n), 0), L - n)
        cfg = replace(cfg, sparsity=replace(cfg.sparsity, start=start))  # the plan prices the block chosen
        with st.stage("perplexity_dense"):
            dense_ppl = perplexity(model, ppl_blocks, args.batch)
        probe = run_layers(model, calib[:1].to(device), outputs_at=(start,), stack=stack)
        slot = build_replacement(ReplacementConfig(type="layer"), list(stack.layers[start:start + n]), stack.config,
                                 probe.output_is_tuple)
        slot_online = copy.deepcopy(slot)  # the same initial weights for both ways of getting the pairs
        with st.stage("train_online"):  # train.teacher=online: x^(l*), x^(l*+n) batch by batch, nothing written
            online_log = train_mse(model, slot_online, start, train_blocks,
                                   OnlineTeacher(model, train_blocks, start, n, args.batch),
                                   OnlineTeacher(model, val_blocks, start, n, args.batch), cfg.train, seed=0)
        del slot_online
        with st.stage("teacher_pairs"):  # train.teacher=cached: the shards on disk, then training reads them
            train_sh = write_teacher_shards(model, train_blocks, start, n, work / "teacher" / "train", args.batch)
            val_sh = write_teacher_shards(model, val_blocks, start, n, work / "teacher" / "val", args.batch)
        with st.stage("train"):
            log = train_mse(model, slot, start, train_blocks, train_sh, val_sh, cfg.train, seed=0)
        remove_block(model, start, n, slot)  # in place: the benchmark holds one copy of the weights
        with st.stage("perplexity_pruned"):
            pruned_ppl = perplexity(model, ppl_blocks, args.batch)
        with st.stage("speed"):
            speed = measure_throughput(model, batch_size=1, prompt_len=min(256, seq), decode_tokens=32, repeats=1)
        if not args.no_save:
            with st.stage("save"):
                save_checkpoint(model, None, work / "model", {"benchmark": "gpu_scale"})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = _meta(plan_config, dtype)  # the same shapes (tiny or not), the dense model, on meta
    planned = plan.make_plan(cfg, model=meta, teacher="cached")
    planned_online = plan.make_plan(cfg, model=meta, teacher="online")
    compare = {}
    for name, row in st.rows.items():
        # load_model here is no disk read, and the recipe's speed stage runs 28 prefill/decode rounds: not priced
        p = (planned_online.stage("train") if name == "train_online" else
             next((s for s in planned.stages if s.name == name), None) if name not in ("load_model", "speed") else None)
        if p is not None:
            compare[name] = {**row, "plan_seconds": round(p.seconds, 3),
                             "time_ratio": round(row["seconds"] / p.seconds, 2) if p.seconds else None}
            if st.cuda:  # the plan's device column is the accelerator's (on the CPU everything is host RAM)
                compare[name]["plan_device_gib"] = round(p.device_gib, 2)
        else:
            compare[name] = row
    result = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": dtype_name, "threads": torch.get_num_threads(), "clock": args.clock,
        "shapes": {"hub_id": args.hub_id, "overrides": overrides},
        "params": sum(p.numel() for p in model.parameters()), "dense_params": planned.shapes.total_params,
        "layers": L, "removed": [start, start + n],
        "seq_len": seq, "workload": {k: getattr(args, k) for k in ("calib", "train_blocks", "val_blocks", "batch",
                                                                 "ppl_blocks")},
        "plan_throughput": {"tflops": planned.hw.tflops, "bandwidth_gbs": planned.hw.bandwidth_gbs,
                            "disk_gbs": planned.hw.disk_gbs},
        "ppl": {"dense": dense_ppl["ppl"], "pruned": pruned_ppl["ppl"]},
        "train": {"steps": log.steps, "initial_val_loss": log.initial_val_loss, "best_val_loss": log.best_val_loss,
                  "online_best_val_loss": online_log.best_val_loss},
        "speed": speed, "stages": compare,
    }
    (out / "gpu_scale.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"gpu_scale on {result['device']} ({dtype_name}, {args.hub_id} {overrides or ''}, "
             f"{result['params'] / 1e6:.1f}M params, seq {seq}): plan at "
             f"{planned.hw.tflops:g} TFLOP/s, {planned.hw.bandwidth_gbs:g} GB/s, {planned.hw.disk_gbs:g} GB/s disk", "",
             "| stage | measured s | plan s | measured / plan | peak GiB | plan GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in compare.items():
        lines.append(f"| {name} | {r['seconds']} | {r.get('plan_seconds', '-')} | {r.get('time_ratio', '-')} | "
                     f"{r.get('peak_gib', '-')} | {r.get('plan_device_gib', '-')} |")
    (out / "gpu_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def _meta(config, dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


if __name__ == "__main__":
    main()
