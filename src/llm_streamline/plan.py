"""The cost plan of a composed run, from the model's config alone: the model is built on the meta device (shapes,
no weights, no memory) and every stage of the run's recipe is priced in FLOPs, peak accelerator memory per device,
host RAM, disk written and wall time at a stated throughput.

    llm-streamline-plan model=llama2-7b data=slimpajama eval=paper          # prints the table, loads nothing

Every real run computes the same plan first (`check`, about a second) and is refused with one line when the plan
exceeds the free disk, the device memory or the host RAM (`plan.enforce=false` overrides).

How each figure is derived (one small function per stage below):
- FLOPs per token of layer i at sequence length T: 2 x its matmul weights + 2 x d_attn x (T + 1) (causal
  attention, as `evaluate.speed.flops_per_token`); the LM head 2 x its weights. Backward = 2 x forward.
- Time = FLOPs / `plan.tflops` (dense matmul throughput of one device in the run's dtype) + bytes moved by
  bandwidth-bound work / `plan.bandwidth_gbs` + disk traffic / `plan.disk_gbs`. Defaults per device kind and
  dtype (`HARDWARE`): measured on this project's CPU, stated for GPUs; `plan.measure=true` times a GEMM here.
- Evaluation: items per task x contexts x context tokens + options x continuation tokens, from `TASK_TOKENS`
  (measured with SmolLM2's tokenizer over each task's full offline split; other tokenizers differ by ~10-20%),
  scored as the fast scorer does (a context once per item, the options after it, packed rows of `PACK_TOKENS`
  with a dense mask, the LM head only where read).
- The removed block is unknown before the similarity profile: unless `sparsity.start` is set, stages that run
  the dense model up to the block's end take the mean over the possible starts (L + n) / 2 layers.
- Memory: weights at the model's dtype (split over `plan.devices` with device_map; the pruned model shares them;
  from the speed comparison on, the dense model's last use, only the pruned model's are held: LoRA healing, the
  pruned evaluation and saving), trainable parameters at 16 B each (fp32 master, grad, AdamW's two moments) plus
  activations per stage (with `train.grad_checkpointing` only each layer's input, and a second forward in the
  backward).
- Data parallel (`torchrun --nproc_per_node P`, `plan.processes`, null: WORLD_SIZE): every process holds a whole
  copy on its own card (device memory per card as for one process; host RAM and the node's total x P); the
  stages the ranks share (`Stage.shared`: the similarity profile, block-by-perplexity scoring, SLEB's, LaCo's and
  LLM-Pruner's scoring, a replacement's or LoRA's training steps and validations, the evaluations' items and the
  perplexities' batches) take 1/P of their compute and memory-traffic time (at most one rank per batch, candidate
  or item), a step being P batches; saving runs on the main rank while the others wait.
- Sharded weights (`model.shard=fsdp`, or `auto` when a replica's plan exceeds a card: `layout`): each card holds
  1/P of the weights plus what FSDP2 gathers (one decoder layer at a time, and the root's embeddings, final norm and
  head, which stay gathered between forwards) plus the stage's own buffers. Every forward all-gathers the weights
  it runs: (P-1)/P of their bytes per card at `plan.interconnect_gbs` (an upper estimate: a stage's weights read
  once per forward of `Stage.forward_tokens` tokens, FLOPs / (2 x those tokens) of them, backward counted like
  forward; no overlap with compute assumed). Shared stages divide compute and gathers by P as above; the others
  run on every rank in lockstep (as long as on one card, plus the gathers).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from llm_streamline.composition import compose
from llm_streamline.config import ConfigError, PlanConfig, RunConfig, infer_batch_size
from llm_streamline.importance import PPL_IMPORTANCE_BLOCKS
from llm_streamline.parallel import world_size
from llm_streamline.preflight import meta_model, model_config, run_block_size
from llm_streamline.replace import replacement_param_count

log = logging.getLogger("llm_streamline")
GIB = 2**30

# Effective throughput per device by (device kind, dtype): TFLOP/s of dense matmuls, GB/s of memory traffic,
# GB/s of disk. CPU: this project's 2-core Xeon (AMX-BF16): a 2048^3 GEMM 0.13 TFLOP/s in fp32, 1.0 in bf16
# (`environment.md`); 8 GB/s from the default run's decode (14.8 tokens/s x 538 MB of fp32 weights), 1 GB/s disk
# (its save: 0.41 GiB in 0.45 s, page cache). CUDA: an
# H100 80 GB at about 40% of its 989 dense bf16 TFLOP/s and 60% of its 3.35 TB/s, a local NVMe disk.
# interconnect_gbs: what one card all-gathers per second under FSDP: CUDA, an 8-GPU NVLink node (H100 SXM: 450 GB/s
# per direction; NCCL's all-gather reaches ~350, 200 assumed); CPU: gloo over loopback, a guess (1 GB/s).
HARDWARE = {
    ("cpu", "float32"): dict(tflops=0.13, bandwidth_gbs=8.0, disk_gbs=1.0, interconnect_gbs=1.0),
    ("cpu", "bfloat16"): dict(tflops=1.0, bandwidth_gbs=8.0, disk_gbs=1.0, interconnect_gbs=1.0),
    ("cuda", "bfloat16"): dict(tflops=400.0, bandwidth_gbs=2000.0, disk_gbs=2.0, interconnect_gbs=200.0),
    ("cuda", "float16"): dict(tflops=400.0, bandwidth_gbs=2000.0, disk_gbs=2.0, interconnect_gbs=200.0),
    ("cuda", "float32"): dict(tflops=40.0, bandwidth_gbs=2000.0, disk_gbs=2.0, interconnect_gbs=200.0),
}
DEFAULT_GPU_MEMORY_GIB = 80.0   # per device, when planning for CUDA on a machine without one
HOST_BASE_GIB = 0.35            # python + torch + transformers imported (default run: 785 MiB RSS with 538 MB loaded)
EVAL_HOST_GIB = 1.0             # lm-eval's task data and per-sample rows (default run: +0.9 GiB in its eval stages)
LOAD_OVERHEAD_S = 1.0          # building the model and its tokenizer (default run: 1.9 s to load 0.5 GiB)
HASH_GBS = 1.0                  # sha256 of sealed stage outputs (teacher shards) on write
DECODE_TOKENS = 32              # speed: tokens decoded after the prompt (evaluate.speed, recipes.common._speed)
SPEED_RUNS = 5 * 2 + 9 * 2      # 5 interleaved throughput rounds x 2 models, 9 paired prefills x 2 models
PACK_TOKENS = 1024              # the fast scorer's packed row length (evaluate.fast_hflm)

# Per task, over its full offline split (SmolLM2 tokenizer): items, options per item, distinct contexts per item,
# mean context tokens, mean continuation tokens per option. MMLU: the 57 subjects together (14042 items, mean
# weighted by items). Measured by `benchmarks/task_tokens.py` from lm-eval's own requests.
TASK_TOKENS = {
    "piqa": (1838, 2, 1, 13.4, 22.9),
    "hellaswag": (10042, 4, 1, 49.7, 29.6),
    "winogrande": (1267, 2, 2, 16.9, 5.6),
    "arc_easy": (570, 4, 1, 27.3, 4.3),
    "arc_challenge": (299, 4, 1, 31.2, 5.7),
    "boolq": (3270, 2, 1, 145.4, 1.0),
    "openbookqa": (500, 4, 1, 11.6, 3.6),
    "mmlu": (14042, 4, 1, 125.9, 1.0),
    # eval=tiny's generated items; with the tiny presets' byte-level tokenizer, which they run with: 37.1, 6.2
    "synthetic_cloze": (200, 4, 1, 8.1, 1.0),
}
UNKNOWN_TASK = (1000, 4, 1, 64.0, 8.0)  # a task not measured above: a typical multiple-choice task


# ------------------------------------------------------------------------------------------------ shapes
@dataclass
class Shapes:
    """What the plan needs from the model, read off the meta-device model (architecture-generic)."""
    layers: int
    hidden: int
    vocab: int
    bytes_per_param: int
    total_params: int
    layer_params: list[int]      # all parameters of each decoder layer
    layer_matmul: list[int]      # nn.Linear weights of each decoder layer
    attn_width: list[int]        # q_proj width of each layer (d_attn)
    head_matmul: int             # the LM head's weights (a matmul per scored position even when tied)
    layer_activations: int       # elements per token a decoder layer keeps for backward (estimate)
    replacement_params: int = 0
    replacement_matmul: int = 0

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    @property
    def gathered_bytes(self) -> float:
        """What FSDP2 holds gathered at once beyond a card's shard: the largest decoder layer and the root's
        parameters (embeddings, final norm, head: kept gathered between forwards)."""
        return (max(self.layer_params) + self.total_params - sum(self.layer_params)) * self.bytes_per_param

    def layer_flops(self, i: int, seq: int) -> float:
        """Forward FLOPs per token of layer i in a causal sequence of `seq` tokens (speed.flops_per_token's rule)."""
        return 2.0 * self.layer_matmul[i] + 2.0 * self.attn_width[i] * (seq + 1)

    def layers_flops(self, first: int, end: float, seq: int) -> float:
        """Layers [first, end) per token; a fractional end (a mean over block starts) counts pro rata."""
        whole = int(end)
        f = sum(self.layer_flops(i, seq) for i in range(first, whole))
        if end > whole and whole < self.layers:
            f += (end - whole) * self.layer_flops(whole, seq)
        return f

    def model_flops(self, seq: int, head_positions: float = 1.0, removed: int = 0, added: float = 0.0) -> float:
        """Forward FLOPs per token of the whole model (n layers `removed` at the mean layer cost, `added` replacement
        FLOPs per token), the head on a fraction `head_positions` of the tokens."""
        mean = self.layers_flops(0, self.layers, seq) / self.layers
        return self.layers_flops(0, self.layers, seq) - removed * mean + added + head_positions * 2.0 * self.head_matmul


def shapes_of(model: nn.Module, cfg: RunConfig) -> Shapes:
    from llm_streamline.evaluate.speed import attention_widths, matmul_params
    from llm_streamline.models.layers import find_decoder_stack

    stack = find_decoder_stack(model)
    c = stack.config
    layers = list(stack.layers)
    widths = [attention_widths(layer)[0] if attention_widths(layer) else 0 for layer in layers]
    if not any(widths):  # fused qkv families: the config's width
        widths = [attention_widths(model)[0]] * len(layers)
    head = model.get_output_embeddings()
    hidden = int(c.hidden_size)
    inter = int(getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden)
    dtype_bytes = torch.finfo(_dtype(cfg)).bits // 8
    # kept for backward per token: the norms' and attention's inputs and outputs (~8 x hidden incl. q, k, v, o and
    # the residuals) and the MLP's (3 x intermediate: gate, up, their product): the usual bf16 transformer estimate
    acts = 8 * hidden + 3 * inter
    shapes = Shapes(layers=len(layers), hidden=hidden, vocab=int(head.weight.shape[0]), bytes_per_param=dtype_bytes,
                    total_params=sum(p.numel() for p in model.parameters()),
                    layer_params=[sum(p.numel() for p in layer.parameters()) for layer in layers],
                    layer_matmul=[matmul_params(layer) for layer in layers], attn_width=widths,
                    head_matmul=int(head.weight.numel()), layer_activations=acts)
    rp, rm = _replacement_size(cfg, model, shapes, inter)
    return replace(shapes, replacement_params=rp, replacement_matmul=rm)


def _replacement_size(cfg: RunConfig, model: nn.Module, s: Shapes, inter: int) -> tuple[int, int]:
    """(parameters, matmul weights) of the replacement put in the slot; the parameters as the run counts them
    (`replace.replacement_param_count`, which also sizes the block)."""
    r = cfg.replacement
    if cfg.method.name != "streamline" or r.type in ("none", "linear"):  # linear: fused into a kept layer's map
        return 0, 0
    params = replacement_param_count(r, model)  # swiglu / pre-norm FFN: the anatomy is probed on the meta model
    if r.type in ("layer", "layers"):
        return params, (1 if r.type == "layer" else r.num_layers) * s.layer_matmul[0]
    if r.type == "ffn":
        w = r.hidden_size or inter
        return params, 2 * s.hidden * w
    return params, params  # linear_patch: one d x d matrix; swiglu: the MLP's maps (and a norm or two: d each)


def _dtype(cfg: RunConfig) -> torch.dtype:
    from llm_streamline.precision import torch_dtype

    return torch_dtype(cfg.model.dtype, cfg.model.device)  # model.dtype=auto: what this machine resolves it to


# ------------------------------------------------------------------------------------------------ hardware
@dataclass
class Hardware:
    kind: str               # cpu | cuda
    devices: int
    tflops: float           # per device, the run's dtype
    bandwidth_gbs: float
    disk_gbs: float
    device_memory_gib: float  # per device (cpu: the host RAM)
    host_ram_gib: float
    disk_free_gib: float    # where stage outputs go (the stage cache)
    out_free_gib: float     # where the run directory is
    one_disk: bool = True   # the stage cache and the run directory share a filesystem (their needs add up)
    measured: str = ""      # what was measured on this machine rather than taken from HARDWARE
    processes: int = 1      # torchrun data-parallel processes, one card each
    interconnect_gbs: float = 1.0  # what one card all-gathers per second (sharded weights)
    sharded: bool = False   # the weights sharded over the processes (FSDP2, `layout`), else a whole model each


def hardware(cfg: RunConfig, out_dir: Path | None = None) -> Hardware:
    import psutil

    from llm_streamline import stages

    p: PlanConfig = cfg.plan
    kind = "cuda" if cfg.model.device.startswith("cuda") else "cpu"
    base = HARDWARE.get((kind, cfg.model.dtype), HARDWARE[(kind, "float32")])
    measured = []
    tflops = p.tflops
    if tflops is None and p.measure:
        tflops = measure_tflops(kind, _dtype(cfg))
        measured.append(f"GEMM {tflops:.3g} TFLOP/s")
    devices = p.devices or (torch.cuda.device_count() if kind == "cuda" and torch.cuda.is_available() else 1)
    host = psutil.virtual_memory().available / GIB
    if p.device_memory_gib is not None:
        dev_mem = p.device_memory_gib
    elif kind == "cuda" and torch.cuda.is_available():
        dev_mem = min(torch.cuda.mem_get_info(i)[0] for i in range(devices)) / GIB
        measured.append("free device memory")
    else:
        dev_mem = DEFAULT_GPU_MEMORY_GIB if kind == "cuda" else host
    disk = p.disk_free_gib if p.disk_free_gib is not None else _free_gib(stages.stage_root())
    out = p.disk_free_gib if p.disk_free_gib is not None else _free_gib(out_dir or Path("."))
    one = p.disk_free_gib is not None or _device_of(stages.stage_root()) == _device_of(out_dir or Path("."))
    processes = p.processes or world_size()
    return Hardware(kind, max(1, devices), tflops or base["tflops"], p.bandwidth_gbs or base["bandwidth_gbs"],
                    p.disk_gbs or base["disk_gbs"], dev_mem, p.host_ram_gib or host, disk, out, one,
                    ", ".join(measured), max(1, processes), p.interconnect_gbs or base["interconnect_gbs"])


def _existing(path: Path) -> Path:
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _free_gib(path: Path) -> float:
    return shutil.disk_usage(_existing(path)).free / GIB


def _device_of(path: Path) -> int:
    return os.stat(_existing(path)).st_dev


def measure_tflops(kind: str, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """A square GEMM timed on the run's device and dtype for about `seconds` (after one warm-up)."""
    device = "cuda" if kind == "cuda" else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    name: str
    flops: float = 0.0
    bytes_moved: float = 0.0   # bandwidth-bound memory traffic
    disk_io: float = 0.0       # bytes read or written on disk (and hashed)
    overhead_s: float = 0.0
    device_gib: float = 0.0    # peak per device
    host_gib: float = 0.0
    disk_gib: float = 0.0      # left on disk
    note: str = ""
    seconds: float = 0.0
    shared: bool = False       # data-parallel processes divide its compute and memory traffic among them
    shared_ways: float = 0     # how many pieces that work comes in (0: as many as there are processes)
    forward_tokens: float = 0.0  # tokens per forward (sharded weights: one all-gather of what runs per forward)
    gather_bytes: float = 0.0  # sharded weights: bytes one card all-gathers over the stage (set by `price`)

    def price(self, hw: Hardware, bytes_per_param: int = 2) -> "Stage":
        # one device's throughput: with device_map the layers run card after card, one busy at a time; under
        # torchrun a shared stage runs on every process's card at once
        ways = min(hw.processes, self.shared_ways or hw.processes) if self.shared else 1
        if hw.sharded and self.flops and self.forward_tokens:  # the weights each forward runs, gathered
            run = self.flops / (2.0 * self.forward_tokens)      # parameters read per forward, summed over forwards
            self.gather_bytes = run * bytes_per_param * (hw.processes - 1) / hw.processes
        self.seconds = ((self.flops / (hw.tflops * 1e12) + self.bytes_moved / (hw.bandwidth_gbs * 1e9)
                         + self.gather_bytes / (hw.interconnect_gbs * 1e9)) / ways
                        + self.disk_io / (hw.disk_gbs * 1e9) + self.overhead_s)
        if ways > 1:
            self.note += f"; shared by {ways} processes"
        if self.gather_bytes:
            self.note += f"; {_gib(self.gather_bytes / ways / GIB)} all-gathered per card"
        return self


@dataclass
class Plan:
    cfg: RunConfig
    shapes: Shapes
    hw: Hardware
    stages: list[Stage] = field(default_factory=list)
    layout: str = "none"    # torchrun: fsdp (weights sharded over the processes) | none (a whole model each)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def device_gib(self) -> float:
        return max((s.device_gib for s in self.stages), default=0.0)

    @property
    def host_gib(self) -> float:
        return max((s.host_gib for s in self.stages), default=0.0)

    @property
    def disk_gib(self) -> float:
        return sum(s.disk_gib for s in self.stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


class _Ctx:
    """The run's sizes the stage functions share."""

    def __init__(self, cfg: RunConfig, s: Shapes, hw: Hardware, n: int, teacher: str | None = None):
        self.cfg, self.s, self.hw, self.n, self.teacher = cfg, s, hw, n, teacher
        self.seq = cfg.data.seq_len
        self.batch = cfg.train.batch_size
        self.procs = hw.processes
        self.step_batch = self.batch * self.procs   # blocks in one optimizer step (grad_accum aside)
        self.infer_batch = infer_batch_size(cfg)  # the forward-only stages (model.infer_batch_size)
        self.on_gpu = hw.kind == "cuda"
        # device_map spreads the weights (one process only: under torchrun each holds a whole copy, or 1/P sharded)
        self.split = hw.devices if cfg.model.device_map and hw.processes == 1 else 1
        self.sharded = hw.sharded
        self.weights_gib = s.weight_bytes / GIB
        start = cfg.sparsity.start
        # the block's end: given, or the mean over the possible starts
        self.block_end = start + n if start is not None else (s.layers - n) / 2 + n
        self.pruned_gib = self.weights_gib * (1 - n * _mean(s.layer_params) / s.total_params) \
            + s.replacement_params * s.bytes_per_param / GIB

    def weights(self, released: bool) -> float:
        """GiB of weights held: the dense model's, which the pruned model shares (`models.layers.share_weights`), or
        once the dense model is released after its last use (`recipes.common.dense_speed_then_release`) the pruned
        model's alone."""
        return self.pruned_gib if released else self.weights_gib

    def device(self, extra_gib: float, released: bool = False) -> float:
        """Peak per device: the weights held (`weights`) plus a stage's own buffers on one device; sharded (FSDP2):
        1/P of them plus what is gathered at once (`Shapes.gathered_bytes`)."""
        if not self.on_gpu:
            return 0.0
        if self.sharded:
            return self.weights(released) / self.procs + self.s.gathered_bytes / GIB + extra_gib
        return self.weights(released) / self.split + extra_gib

    def host(self, extra_gib: float, released: bool = False) -> float:
        """Host RAM: the process, plus on CPU everything the device column would hold; times the data-parallel
        processes (`torchrun --nproc_per_node`: all of them on one node)."""
        on_host = 0.0 if self.on_gpu else self.weights(released) / (self.procs if self.sharded else 1)
        return self.procs * (HOST_BASE_GIB + on_host + (0.0 if self.on_gpu else extra_gib))


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


def stage_load(c: _Ctx) -> Stage:
    return Stage("load_model", disk_io=c.s.weight_bytes, overhead_s=LOAD_OVERHEAD_S, device_gib=c.device(0),
                 host_gib=c.host(0), note=f"{c.s.total_params / 1e9:.3g}B params, {c.weights_gib:.3g} GiB read "
                                          "(a hub download not included)")


def stage_profile(c: _Ctx) -> Stage:
    """Every block's cos(x^l, x^(l+n)) on the calibration blocks: all layers (no head), the L+1 states of a batch
    held and normalised in fp32, L(L+1)/2 elementwise products per token (bandwidth-bound).

    Per card under a device_map over D cards (`importance._BlockSums.add`): each state x^j stays on the card of
    the layer that made it, in the run's dtype and normalised in fp32 beside it; a pair on two cards is formed on
    the earlier one's, which keeps an fp32 copy of the later state for the batch. The first card thus holds its
    (L+1)/D states twice and an fp32 copy of every later one: (L+1) x (4 + bytes/D) per token and hidden unit, the
    most of any card (one card: (L+1) x (4 + bytes), as on the CPU)."""
    s, d = c.s, c.cfg.data
    tokens = d.calib_samples * d.seq_len
    L = s.layers
    states = (L + 1) * c.infer_batch * c.seq * s.hidden * (4 + s.bytes_per_param / c.split) / GIB
    moved = L * (L + 1) / 2 * tokens * s.hidden * 4 * 3
    st = Stage("importance", flops=tokens * s.layers_flops(0, L, c.seq), bytes_moved=moved,
               device_gib=c.device(states), host_gib=c.host(states), note=f"{tokens:,} tokens x {L} layers",
               forward_tokens=c.infer_batch * c.seq,
               shared=True, shared_ways=math.ceil(d.calib_samples / c.infer_batch))  # batch k: rank k mod P
    if c.cfg.sparsity.importance == "perplexity" and c.cfg.sparsity.start is None:
        blocks = min(PPL_IMPORTANCE_BLOCKS, d.calib_samples)
        ppl_tokens = blocks * c.seq * (L - c.n + 1)
        ppl_flops = ppl_tokens * s.model_flops(c.seq, removed=c.n)
        st.note += f"; + block perplexity on {ppl_tokens:,} tokens"
        # the profile's batches and the candidates (start l: rank l mod P; sharded weights: each candidate's
        # batches) are shared: the one stage's ways weighted by the two parts' FLOPs
        ways = (min(c.procs, st.shared_ways),
                min(c.procs, math.ceil(blocks / c.infer_batch) if c.sharded else L - c.n + 1))
        st.shared_ways = (st.flops + ppl_flops) / (st.flops / ways[0] + ppl_flops / ways[1])
        st.flops += ppl_flops
    return st


def eval_tokens(cfg: RunConfig, task: str) -> tuple[int, float, float, float]:
    """(items, forward tokens, LM-head positions without / with the contexts' own NLL) of one task as scored."""
    items_all, k, contexts, ctx_tok, cont_tok = TASK_TOKENS.get(task, UNKNOWN_TASK)
    limit = cfg.eval.task_limits.get(task, cfg.eval.limit) if task in cfg.eval.task_limits else cfg.eval.limit
    items = min(items_all, limit) if limit else items_all
    if cfg.eval.scorer == "fast":   # a context once, each option after it (its last token only a target)
        fwd = contexts * ctx_tok + k * max(cont_tok - 1, 0.0) + (k if contexts > 1 else 0)
    else:                           # stock HFLM: every (context, option) pair on its own
        fwd = k * (ctx_tok + cont_tok)
    head = k * cont_tok
    return items, items * fwd, items * head, items * (head + contexts * ctx_tok)


def stage_eval(c: _Ctx, which: str) -> Stage:
    """lm-eval on the suite: per task, the forward tokens of its items, the head only where read (the dense model
    also scores each context's own NLL, for stability), attention over packed rows with a dense mask."""
    s, e = c.s, c.cfg.eval
    pruned = which == "pruned"
    removed, added = (c.n, 2.0 * s.replacement_matmul) if pruned else (0, 0.0)
    pack = PACK_TOKENS if e.scorer == "fast" else 2 * (TASK_TOKENS["hellaswag"][3] + TASK_TOKENS["hellaswag"][4])
    flops, tokens, items = 0.0, 0.0, 0
    for task in e.tasks:
        n_items, fwd, head, head_ctx = eval_tokens(c.cfg, task)
        items += n_items
        tokens += fwd
        per_token = s.model_flops(pack, head_positions=0.0, removed=removed, added=added)
        flops += fwd * per_token + (head if pruned else head_ctx) * 2.0 * s.head_matmul
    logits = e.batch_size * 64 * s.vocab * 4 / GIB   # read positions' logits in fp32 (a pack's continuations)
    scores = max(1, s.attn_width[0] // 128) * pack * pack * 4 / GIB
    # lm-eval's data parallel: each task's documents shared by the ranks (not with sharded weights: refused)
    fewest = min(eval_tokens(c.cfg, task)[0] for task in e.tasks) if e.tasks else 0
    return Stage(f"eval_{which}", flops=flops, device_gib=c.device(logits + scores, pruned),
                 forward_tokens=e.batch_size * pack, shared=not c.sharded, shared_ways=fewest,
                 host_gib=c.host(logits + scores, pruned) + EVAL_HOST_GIB,
                 note=f"{len(e.tasks)} tasks, {items:,} items, {tokens:,.0f} tokens")


def stage_perplexity(c: _Ctx, which: str) -> Stage:
    s, e = c.s, c.cfg.eval
    seq = e.perplexity_seq_len or c.seq
    blocks = e.perplexity_blocks or 256  # null: the whole text; about 256 blocks is assumed
    tokens = blocks * seq
    pruned = which == "pruned"
    removed, added = (c.n, 2.0 * s.replacement_matmul) if pruned else (0, 0.0)
    buf = c.infer_batch * seq * (s.hidden * 4 + s.vocab * 4 / 8) / GIB  # the head in chunks of positions
    return Stage(f"perplexity_{which}", flops=tokens * s.model_flops(seq, removed=removed, added=added),
                 forward_tokens=c.infer_batch * seq, shared=True, shared_ways=math.ceil(blocks / c.infer_batch),
                 device_gib=c.device(buf, pruned), host_gib=c.host(buf, pruned), note=f"{tokens:,} tokens")


def teacher_mode(cfg: RunConfig, pairs_gib: float, free_gib: float, forced: str | None = None) -> str:
    """cached | online: `train.teacher` where the config has it (auto: cached when the pairs fit the disk)."""
    from llm_streamline.train import teacher_mode as run_teacher_mode  # the run's own rule

    processes = cfg.plan.processes or world_size()
    return forced or run_teacher_mode(cfg.train, int(pairs_gib * GIB), int(free_gib * GIB),
                                      data_parallel=processes > 1)[0]


def pairs_bytes(c: _Ctx) -> float:
    d = c.cfg.data
    return (d.train_samples + d.val_samples) * c.seq * c.s.hidden * c.s.bytes_per_param * 2


def stage_teacher(c: _Ctx) -> Stage | None:
    """x^(l*) and x^(l*+n) of every train and validation block, from layers [0, l*+n) of the dense model, written
    as shards (cached) or computed batch by batch during training (online: priced in `stage_train`)."""
    if c.cfg.train.loss != "mse" or c.cfg.method.name != "streamline" or c.cfg.replacement.type == "none":
        return None
    d, s = c.cfg.data, c.s
    size = pairs_bytes(c)
    mode = teacher_mode(c.cfg, size / GIB, c.hw.disk_free_gib, c.teacher)
    if mode == "online":
        return Stage("teacher_pairs", note="online: computed during training, nothing written")
    tokens = (d.train_samples + d.val_samples) * c.seq
    rows = max(1, c.infer_batch // c.batch) * c.batch  # whole training batches (shards) per forward
    batch = 3 * rows * c.seq * s.hidden * s.bytes_per_param / GIB
    return Stage("teacher_pairs", flops=tokens * s.layers_flops(0, c.block_end, c.seq),
                 disk_io=size * (1 + c.hw.disk_gbs / HASH_GBS), device_gib=c.device(batch), host_gib=c.host(batch),
                 forward_tokens=rows * c.seq,
                 disk_gib=size / GIB, note=f"cached: {tokens:,} tokens x 2 states written ({_gib(size / GIB)})")


def stage_train(c: _Ctx) -> Stage | None:
    """The replacement's training. mse: forward + backward of the slot on the pairs (online: plus the dense model
    up to the block's end per epoch); lm/distill: the whole pruned model (distill: + the dense teacher)."""
    cfg, s, d, t = c.cfg, c.s, c.cfg.data, c.cfg.train
    if cfg.method.name != "streamline":
        return None
    # train=lora: plain pruning, no replacement to train (its healing: make_plan, after the dense model's release)
    if cfg.method.heal == "lora" or cfg.replacement.type == "none":
        return None
    tokens = d.train_samples * c.seq
    steps = math.ceil(d.train_samples / c.step_batch) * t.epochs
    if t.max_steps:
        steps = min(steps, t.max_steps)
        tokens = min(tokens * t.epochs, steps * c.step_batch * c.seq) / t.epochs
    val_tokens = d.val_samples * c.seq * (4 * t.epochs + 1)  # evals_per_epoch = 4, plus the initial one
    slot = 2.0 * s.replacement_matmul + 2.0 * s.attn_width[0] * (c.seq + 1) * (s.replacement_matmul
                                                                               >= s.layer_matmul[0])
    trainable = s.replacement_params * 16 / GIB   # fp32 master + grad + AdamW moments
    slot_acts = c.batch * c.seq * s.layer_activations * s.bytes_per_param / GIB
    note = (f"{steps} steps x {c.batch}{f' x {c.procs} processes' if c.procs > 1 else ''} x {c.seq} tokens, "
            f"{s.replacement_params / 1e6:,.3g}M trainable")
    if t.loss == "mse":
        flops = t.epochs * tokens * 3 * slot + val_tokens * slot
        if cfg.replacement.type in ("layer", "layers"):  # a decoder layer's call arguments: layers [0, l*) once
            flops += c.batch * c.seq * s.layers_flops(0, c.block_end - c.n, c.seq)
        st = Stage("train", flops=flops, device_gib=c.device(trainable + slot_acts),
                   host_gib=c.host(trainable + slot_acts), note=note, forward_tokens=c.batch * c.seq)
        if teacher_mode(cfg, pairs_bytes(c) / GIB, c.hw.disk_free_gib, c.teacher) == "online":
            st.flops += (t.epochs * tokens + val_tokens) * s.layers_flops(0, c.block_end, c.seq)
            st.note += "; teacher online"
        else:
            st.disk_io = t.epochs * d.train_samples * c.seq * s.hidden * s.bytes_per_param * 2  # the pairs re-read
        st.shared = True  # each rank its share of the steps' and the validations' batches (and pairs)
        return st
    # lm / distill: every token through the pruned model, backward from the slot to the head
    after = s.layers - c.block_end
    fwd = s.model_flops(c.seq, removed=c.n, added=slot)
    back = 2.0 * (after * _mean([s.layer_flops(i, c.seq) for i in range(s.layers)]) + slot + 2.0 * s.head_matmul)
    flops = t.epochs * tokens * (fwd + back) + val_tokens * fwd
    logits = c.batch * c.seq * s.vocab * 4 * 2 / GIB
    acts, extra = _kept_activations(c, after + 1)
    flops += t.epochs * tokens * extra * (after + 1) / max(1, s.layers - c.n)
    if t.loss == "distill":
        flops += (t.epochs * tokens + val_tokens) * s.model_flops(c.seq)
        logits *= 2
    return Stage("train", flops=flops, device_gib=c.device(trainable + acts + logits),
                 host_gib=c.host(trainable + acts + logits), note=note + f"; {t.loss} loss through the model",
                 shared=True, forward_tokens=c.batch * c.seq)


def _kept_activations(c: _Ctx, layers: float) -> tuple[float, float]:
    """(GiB kept for backward by `layers` decoder layers of one micro-batch, extra forward FLOPs per token of the
    pruned model). With `train.grad_checkpointing` (null: on CUDA) each layer keeps only its input and one layer's
    activations live at a time, for a second forward in the backward pass."""
    s = c.s
    gc = c.cfg.train.grad_checkpointing
    on = c.on_gpu if gc is None else gc
    per_token = s.layer_activations * s.bytes_per_param
    if not on:
        return layers * c.batch * c.seq * per_token / GIB, 0.0
    kept = (layers * s.hidden * s.bytes_per_param + per_token) * c.batch * c.seq / GIB
    return kept, s.model_flops(c.seq, head_positions=0.0, removed=c.n)


def stage_lora(c: _Ctx, name: str, epochs: int) -> Stage:
    """LoRA healing: the whole pruned model forward and backward (input gradients through every layer; the
    adapters' own weights are small); activations of every layer kept, or only their inputs with gradient
    checkpointing (then a second forward)."""
    s, d = c.s, c.cfg.data
    tokens = d.train_samples * c.seq
    fwd = s.model_flops(c.seq, removed=c.n)
    acts, extra = _kept_activations(c, s.layers - c.n)
    logits = c.batch * c.seq * s.vocab * 4 * 2 / GIB
    val = d.val_samples * c.seq * (4 * epochs + 1)
    return Stage(name, flops=epochs * tokens * (3 * fwd + extra) + val * fwd,
                 shared=True, forward_tokens=c.batch * c.seq,
                 device_gib=c.device(acts + logits, True),
                 host_gib=c.host(acts + logits, True),
                 note=f"LoRA r={c.cfg.method.lora_rank}, {epochs} epoch(s) x {tokens:,} tokens")


def stage_compress(c: _Ctx) -> Stage | None:
    """A baseline's own search: SLEB's greedy removal, LaCo's merges, LLM-Pruner's Taylor gradients."""
    cfg, s, m = c.cfg, c.s, c.cfg.method
    L = s.layers
    if m.name in ("shortgpt", "gromov"):
        return Stage("compress", note="layers chosen from the similarity profile")
    if m.name == "sleb":
        tokens = (m.sleb_samples or cfg.data.calib_samples) * (m.sleb_seq_len or c.seq)
        seq = m.sleb_seq_len or c.seq
        layer = s.layers_flops(0, L, seq) / L
        flops = 0.0
        for k in range(c.n):  # step k: every inner layer of the L - k left scored (the layers after it + the head)
            alive = L - k
            flops += (alive - 2) * (alive / 2 * layer + 2.0 * s.head_matmul) + alive * layer
        return Stage("compress", flops=tokens * flops, device_gib=c.device(0), host_gib=c.host(0),
                     note=f"SLEB: {c.n} greedy steps on {tokens:,} tokens", shared=True,
                     forward_tokens=c.infer_batch * seq,
                     # batch k of model.infer_batch_size windows: rank k
                     shared_ways=math.ceil((m.sleb_samples or cfg.data.calib_samples) / c.infer_batch))
    if m.name == "laco":
        from llm_streamline.baselines.laco import LACO_BLOCKS, LACO_LOWEST

        tokens = LACO_BLOCKS * c.seq
        # the downward pass scores each position once; when it accepts too few collapses, each fallback scores every
        # position of the current model and may remove one layer (the committed SmolLM2 run: 8 fallbacks, 204 scores)
        scores = (L - LACO_LOWEST) + sum(L - k - 1 - LACO_LOWEST for k in range(c.n))
        return Stage("compress", flops=tokens * scores * s.model_flops(c.seq), device_gib=c.device(0),
                     forward_tokens=c.infer_batch * c.seq, shared=True, shared_ways=LACO_BLOCKS,  # block j: rank j
                     host_gib=c.host(0), note=f"LaCo: up to {scores:.0f} merged-model forwards of {tokens:,} tokens")
    if m.name == "llm_pruner":
        tokens = m.grad_samples * m.grad_seq_len
        scored = sum(s.layer_params[m.first_layer:L - m.last_layers_kept])
        grads = scored * 4 / GIB
        return Stage("compress", flops=tokens * 3 * s.model_flops(m.grad_seq_len), device_gib=c.device(grads),
                     forward_tokens=m.grad_seq_len, shared=True, shared_ways=m.grad_samples,  # sequence j: rank j
                     host_gib=c.host(grads), note=f"Taylor gradients on {tokens:,} tokens, fp32 grads")
    return None


def stage_speed(c: _Ctx) -> Stage | None:
    """Prefill of eval.speed_tokens and 32 decoded tokens, dense and pruned, in rounds: each decoded token reads
    all the weights (bandwidth-bound)."""
    if not c.cfg.eval.speed:
        return None
    s, seq = c.s, c.cfg.eval.speed_tokens
    prefill = seq * s.model_flops(seq, head_positions=1.0 / seq)
    decode_bytes = DECODE_TOKENS * (s.weight_bytes + c.pruned_gib * GIB) / 2
    return Stage("speed", flops=SPEED_RUNS * prefill, bytes_moved=(SPEED_RUNS // 2 + 2) * decode_bytes,
                 device_gib=c.device(0), host_gib=c.host(0), forward_tokens=seq,
                 note=f"prefill {seq} + decode {DECODE_TOKENS} tokens, {SPEED_RUNS} runs")


def stage_save(c: _Ctx) -> Stage | None:
    if not c.cfg.save:
        return None
    size = c.pruned_gib * GIB
    shard = min(size / GIB, 5.0) if c.on_gpu else 0.0   # save_pretrained brings a shard at a time to the host
    return Stage("save", disk_io=size, device_gib=c.device(0, True), host_gib=c.host(0, True) + shard,
                 disk_gib=size / GIB,
                 note=f"pruned model {size / GIB:,.3g} GiB")


# ------------------------------------------------------------------------------------------------ the plan
def make_plan(cfg: RunConfig, out_dir: Path | None = None, model: nn.Module | None = None,
              teacher: str | None = None) -> Plan:
    """Every stage of the composed run priced from the meta-device model; nothing is loaded. `teacher`: price the
    teacher pairs as cached or online whatever the config says (for comparing the two)."""
    model = model if model is not None else meta_model(cfg)
    s = shapes_of(model, cfg)
    hw = hardware(cfg, out_dir)
    n = run_block_size(cfg, model, s.replacement_params)  # the n the recipe removes
    shard = cfg.model.shard if hw.processes > 1 else "none"
    if shard == "auto":  # sharded when a whole replica per card does not fit (`layout`)
        replica = _priced(cfg, s, replace(hw, sharded=False), n, teacher)
        shard = "fsdp" if hw.kind == "cuda" and replica.device_gib > hw.device_memory_gib else "none"
    plan = _priced(cfg, s, replace(hw, sharded=shard == "fsdp"), n, teacher)
    plan.n, plan.model, plan.layout = n, model, shard
    return plan


def layout(cfg: RunConfig, out_dir: Path | None = None) -> str:
    """How a torchrun job holds the weights: `fsdp` (sharded over the processes) or `none` (a whole replica on every
    card; also for one process). `model.shard=auto`: fsdp when the plan of a replica per card exceeds a card's
    memory, on CUDA (on a CPU every rank's replica is in the host RAM: sharding is asked for, never chosen)."""
    if (cfg.plan.processes or world_size()) <= 1:
        return "none"
    if cfg.model.shard != "auto":
        return str(cfg.model.shard)
    if not cfg.model.device.startswith("cuda") or model_config(cfg.model) is None:
        return "none"  # a CPU (auto never shards there), or the embedded model before its conversion (small)
    return make_plan(cfg, out_dir).layout


SHARDED_METHODS = ("streamline", "sleb", "gromov", "shortgpt")  # what the recipes run on sharded weights


def sharded_refusal(cfg: RunConfig, world: int, resolved: str | None = None) -> str | None:
    """What of a run does not run on sharded weights yet, in one line (None: all of it does, or the layout is not
    sharded; `resolved`: the layout when already known). A run whose layout resolves to fsdp (`layout`) runs the
    baselines that remove whole layers and LLM-Streamline with a trained ffn / layer(s) (the MSE, teacher pairs
    online from the sharded dense model, the LM loss through the pruned one, or distillation: the teacher's logits
    from the dense layers, the student's through the same model with the slot put in for its forward; the
    replacement replicated) or plain removal, each with or without LoRA healing: the profile, SLEB's search, the
    training, LoRA, the evaluations and perplexities on the sharded model (`models.sharded`); the block is removed
    from the dense model itself once trained (no second model over shards). Not yet: LaCo and LLM-Pruner (they
    rewrite weights of a copy), the linear fits and replacements that copy parts of a layer (swiglu, a pre-norm ffn)
    and the speed comparison; `recipes.common.check_sharded` refuses them, the
    plan lists them among its problems. Saving gathers each tensor in turn (`models.sharded.save_sharded_weights`)."""
    if cfg.mode != "run":  # llm-streamline-eval loads a whole checkpoint on every rank
        if world > 1 and cfg.model.shard == "fsdp":
            return (f"model.shard=fsdp with {world} processes: mode=eval loads a whole copy of the checkpoint on "
                    "every rank (not sharded); set model.shard=none")
        return None
    if (resolved or layout(replace(cfg, plan=replace(cfg.plan, processes=world)))) != "fsdp":
        return None
    why = " (auto: a whole replica does not fit one card)" if cfg.model.shard == "auto" else ""
    head = f"model.shard={cfg.model.shard}{why} with {world} processes"
    if cfg.method.name not in SHARDED_METHODS:
        return (f"{head}: method={cfg.method.name} does not run on sharded weights yet (only "
                f"{', '.join(SHARDED_METHODS)}, with or without method.heal=lora); run it in one process with "
                "model.device_map=auto")
    r, streamline = cfg.replacement, cfg.method.name == "streamline"
    for bad, fix in ((r.type in ("linear", "linear_patch", "swiglu"), f"replacement={r.type}: not on sharded weights "
                      "yet (ffn, layer, layers or none)"),
                     (streamline and r.type == "ffn" and r.pre_norm, "replacement.pre_norm=true: not on sharded "
                      "weights yet"),
                     (streamline and r.init == "linear", "replacement.init=linear: not on sharded weights yet"),
                     (cfg.eval.speed, "eval.speed=true: set eval.speed=false")):
        if bad:
            return f"{head}: {fix}"
    return None


def _priced(cfg: RunConfig, s: Shapes, hw: Hardware, n: int, teacher: str | None) -> Plan:
    c = _Ctx(cfg, s, hw, n, teacher)
    steps = [stage_load(c), stage_profile(c), stage_eval(c, "dense")]
    if cfg.eval.perplexity:
        steps.append(stage_perplexity(c, "dense"))
    # in the recipes' order: the speed comparison is the dense model's last use, then it is released (LoRA
    # healing, the pruned evaluation and saving hold only the pruned model's weights)
    if cfg.method.name == "streamline":
        steps += [stage_teacher(c), stage_train(c)]
    else:
        steps.append(stage_compress(c))
    steps.append(stage_speed(c))
    if cfg.method.heal == "lora":  # train=lora or a method's own healing
        steps.append(stage_lora(c, "train", cfg.method.lora_epochs))
    steps.append(stage_eval(c, "pruned"))
    if cfg.eval.perplexity:
        steps.append(stage_perplexity(c, "pruned"))
    steps.append(stage_save(c))
    return Plan(cfg, s, hw, [st.price(hw, s.bytes_per_param) for st in steps if st is not None])


# ------------------------------------------------------------------------------------------------ checks, table
def problems(plan: Plan) -> list[str]:
    """What does not fit, one phrase each (empty: the run fits)."""
    hw, out = plan.hw, []
    cache = sum(s.disk_gib for s in plan.stages if s.name != "save")
    save = sum(s.disk_gib for s in plan.stages if s.name == "save")
    if hw.one_disk:  # one filesystem: the saved model comes on top of the stage cache
        cache, save = cache + save, 0.0
    if cache > hw.disk_free_gib:
        out.append(f"the stage cache{' and the saved model' if hw.one_disk else ''} need {_gib(cache)} on disk, "
                   f"{_gib(hw.disk_free_gib)} free"
                   + (" (teacher pairs: set train.teacher=online or fewer data.train_samples)"
                      if any(s.name == "teacher_pairs" and s.disk_gib for s in plan.stages) else ""))
    if save > hw.out_free_gib:
        out.append(f"the saved model needs {_gib(save)}, {_gib(hw.out_free_gib)} free in the run directory")
    if hw.processes > 1 and plan.cfg.model.device_map:  # as the run refuses it (recipes.common.check_data_parallel)
        out.append(f"model.device_map={plan.cfg.model.device_map} with {hw.processes} processes: each holds a whole "
                   "copy on its own card (set model.device_map=null)")
    sharded = sharded_refusal(plan.cfg, hw.processes, plan.layout) if plan.layout == "fsdp" else None
    if sharded:  # as the run refuses it (recipes.common.check_sharded)
        out.append(sharded)
    if hw.kind == "cuda" and plan.device_gib > hw.device_memory_gib:
        worst = max(plan.stages, key=lambda s: s.device_gib)
        out.append(f"{worst.name} needs {_gib(plan.device_gib)} per device, {_gib(hw.device_memory_gib)} "
                   f"on each of {hw.devices}")
    if plan.host_gib > hw.host_ram_gib:
        worst = max(plan.stages, key=lambda s: s.host_gib)
        out.append(f"{worst.name} needs {_gib(plan.host_gib)} of host RAM, {_gib(hw.host_ram_gib)} available")
    return out


def check(cfg: RunConfig, out_dir: Path | None = None) -> Plan | None:
    """At the start of every run: the plan, and a one-line refusal (ConfigError) when it does not fit, unless
    plan.enforce=false. None when the model's config is not at hand yet (the embedded model before its conversion)."""
    if model_config(cfg.model) is None:
        return None
    plan = make_plan(cfg, out_dir)
    bad = problems(plan)
    log.info(headline(plan))
    if bad and cfg.plan.enforce:
        raise ConfigError("plan: " + "; ".join(bad) + " (llm-streamline-plan prints it; plan.enforce=false runs "
                          "anyway)")
    return plan


def headline(plan: Plan) -> str:
    """The plan in one line, logged at the start of every run: time, the peak per accelerator and host RAM (without
    an accelerator the host RAM alone: it holds everything), disk."""
    mem = (f"peak {_gib(plan.device_gib)} per device, {_gib(plan.host_gib)} host RAM" if plan.hw.kind == "cuda"
           else f"peak {_gib(plan.host_gib)} host RAM (no accelerator)")
    return f"plan: {_duration(plan.seconds)}, {mem}, {_gib(plan.disk_gib)} on disk"


def _gib(x: float) -> str:
    if x >= 1024:
        return f"{x / 1024:.2f} TiB"
    return f"{x:.3g} GiB" if x >= 0.001 or x == 0 else f"{x * 1024:.3g} MiB"


def _duration(sec: float) -> str:
    if sec < 60:
        return f"{sec:.1f} s"
    if sec < 3600:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def table(plan: Plan) -> str:
    """The plan as a markdown table with a header of what it assumes."""
    cfg, s, hw = plan.cfg, plan.shapes, plan.hw
    where = (f"{hw.devices} x {hw.kind} ({hw.device_memory_gib:.0f} GiB each)" if hw.kind == "cuda"
             else f"cpu ({hw.host_ram_gib:.0f} GiB RAM)")
    if hw.processes > 1:
        where += (f", {hw.processes} torchrun processes (weights sharded, FSDP2; all-gathers at "
                  f"{hw.interconnect_gbs:g} GB/s per card)" if hw.sharded else
                  f", {hw.processes} torchrun processes (a whole model each)")
    lines = [
        f"plan: {cfg.model.name} ({s.total_params / 1e9:.3g}B params, {s.layers} layers, hidden {s.hidden}, "
        f"vocab {s.vocab}, {cfg.model.dtype}) method={cfg.method.name} replacement={cfg.replacement.type} "
        f"n={plan.n} data={cfg.data.name} eval={cfg.eval.name} "
        + ("method.heal=lora" if cfg.method.heal == "lora" else f"train.loss={cfg.train.loss}"),
        f"on {where}; {hw.tflops:g} TFLOP/s, {hw.bandwidth_gbs:g} GB/s memory, {hw.disk_gbs:g} GB/s disk"
        + (f" (measured: {hw.measured})" if hw.measured else " (plan.tflops / bandwidth_gbs / disk_gbs)")
        + f"; free disk {_gib(hw.disk_free_gib)}",
        "",
        "| stage | TFLOP | time | accelerator peak / device | host RAM | disk written | what |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for st in plan.stages:
        lines.append(f"| {st.name} | {st.flops / 1e12:,.1f} | {_duration(st.seconds)} | "
                     f"{_gib(st.device_gib) if hw.kind == 'cuda' else '-'} | {_gib(st.host_gib)} | "
                     f"{_gib(st.disk_gib)} | {st.note} |")
    lines.append(f"| **total** | {sum(st.flops for st in plan.stages) / 1e12:,.1f} | {_duration(plan.seconds)} | "
                 f"{_gib(plan.device_gib) if hw.kind == 'cuda' else '-'} | {_gib(plan.host_gib)} | "
                 f"{_gib(plan.disk_gib)} | |")
    bad = problems(plan)
    lines += ["", "does not fit: " + "; ".join(bad) if bad else "fits"]
    pairs = next((st for st in plan.stages if st.name == "teacher_pairs"), None)
    if pairs is not None and hw.processes > 1:
        lines.append("train.teacher=cached: not with several processes (each computes its own batches' pairs)")
    elif pairs is not None:  # the other way of getting the teacher pairs, for comparison
        other = "online" if pairs.disk_gib else "cached"
        alt = make_plan(cfg, model=plan.model, teacher=other)
        alt.hw = hw
        lines.append(f"with train.teacher={other}: teacher pairs {_duration(alt.stage('teacher_pairs').seconds)}, "
                     f"{_gib(alt.stage('teacher_pairs').disk_gib)} written; train "
                     f"{_duration(alt.stage('train').seconds)}; total {_duration(alt.seconds)}, disk "
                     f"{_gib(alt.disk_gib)}" + ("; does not fit: " + "; ".join(problems(alt)) if problems(alt) else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> None:
    """`llm-streamline-plan [overrides]`: print the plan of the run those overrides compose; exit 2 when it does
    not fit and plan.enforce is on (the default)."""
    from llm_streamline import errors

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: llm-streamline-plan [key=value ...]   (the overrides of llm-streamline; plan.* sets the "
              "hardware: plan.devices, plan.processes, plan.device_memory_gib, plan.tflops, plan.measure=true, "
              "plan.disk_free_gib)")
        return
    try:
        cfg = compose(argv)
        plan = make_plan(cfg)
    except Exception as e:  # bad input: one line, exit 2; anything else: exit 3, its traceback in a file
        errors.fail(*errors.job_failure(e, None, None))
    print(table(plan))
    bad = problems(plan)
    if bad and cfg.plan.enforce:
        errors.fail("plan: " + "; ".join(bad))


if __name__ == "__main__":
    main()
