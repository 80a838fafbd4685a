"""Compute cost and measured speed of a causal LM (run on dense and pruned side by side).

FLOPs per token (forward pass), for a sequence of ``seq_len`` tokens processed causally:

    flops/token = 2 * P_matmul  +  sum over attention layers of 2 * d_attn * (seq_len + 1)

* ``P_matmul``: weights of every ``nn.Linear`` (q/k/v/o, MLP, replacement modules, and the LM head,
  which is a real per-token matmul even when tied to the embedding). Input embeddings are a lookup and
  cost no FLOPs; norms, biases, activations and the softmax are ignored (lower order).
  One multiply-add = 2 FLOPs.
* Attention scores: a query at position t attends to t keys; QK^T and AV each cost 2 * d_attn * t
  FLOPs (d_attn = heads * head_dim = the q_proj output width of that layer). Averaged over the
  positions t = 1..seq_len of a causal prefill, t averages (seq_len + 1) / 2, giving
  4 * d_attn * (seq_len + 1) / 2 per layer. Sliding-window layers are counted as full attention.

Throughput: ``measure_throughput`` times a prefill (one forward over ``prompt_len`` tokens with a KV
cache, LM head on the last position only, as ``generate`` does) and a greedy decode of
``decode_tokens`` single-token steps on that cache; one warm-up run, then the median of ``repeats``.
Timing (`Clock`): on the CPU, perf_counter around the work. On CUDA a call returns once its kernels are queued, so
perf_counter would time the launches: every card the model uses is synchronised at each mark, and the time
between marks is read from CUDA events (the GPU's own timeline), after the end event has completed.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from llm_streamline.models.devices import input_device


def matmul_params(model: nn.Module) -> int:
    """Weights of all nn.Linear modules (each tied weight counted once per use as a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_widths(model: nn.Module) -> list[int]:
    """d_attn (= q_proj output features) of every attention module that has a ``q_proj``."""
    widths = [
        m.q_proj.out_features for m in model.modules()
        if "attention" in type(m).__name__.lower() and isinstance(getattr(m, "q_proj", None), nn.Linear)
    ]
    if widths:
        return widths
    cfg = getattr(model, "config", None)  # fallback: families without q_proj (fused qkv)
    if cfg is None:
        return []
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return [heads * head_dim] * cfg.num_hidden_layers


def flops_per_token(model: nn.Module, seq_len: int, lm_head: bool = True) -> float:
    """Forward FLOPs per token averaged over a causal sequence of ``seq_len`` (formula above).

    ``lm_head=False``: without the LM head, as in a prefill that computes logits for the last position
    only (``measure_throughput``, ``generate``): its head cost is 1/seq_len of a token's, left out."""
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    attention = sum(2.0 * d * (seq_len + 1) for d in attention_widths(model))
    params = matmul_params(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not lm_head and isinstance(head, nn.Linear):
        params -= head.weight.numel()
    return 2.0 * params + attention


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _cache_keyword(model: Any) -> str:
    """The KV-cache argument and output field: transformers 5.x renamed `past_key_values` to `cache` (the
    old name warns that it goes in 5.40); the dependency range starts before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Clock:
    """Marks on a timeline and the seconds between two of them, right for the devices `model` runs on.

    CPU: `time.perf_counter()`. CUDA: `synchronize(device)` for each CUDA card of the model, then a CUDA event
    recorded (`event()`: `torch.cuda.Event(enable_timing=True)`); `seconds(a, b)` waits for `b` and reads
    `a.elapsed_time(b)` (milliseconds). `synchronize` and `event` are injectable so that the CUDA logic is tested
    without a GPU."""

    def __init__(self, devices, synchronize: Callable | None = None, event: Callable | None = None):
        self.cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)
        self._sync = synchronize or torch.cuda.synchronize
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))

    @classmethod
    def of(cls, model: nn.Module) -> "Clock":
        return cls({p.device for p in model.parameters()})

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        for d in self.cuda:  # every card: under a device_map the last layers run on another one
            self._sync(d)
        e = self._event()
        e.record()
        return e

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1000.0


@torch.no_grad()
def _one_run(model: Any, ids: torch.Tensor, decode_tokens: int, clock: Clock | None = None) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prefill + greedy decode."""
    key = _cache_keyword(model)
    clock = clock or Clock.of(model)
    t0 = clock.mark()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    t1 = clock.mark()
    cache = out[key]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        cache = out[key]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).to(ids.device)  # the head's card -> the embedding's
    t2 = clock.mark()
    return clock.seconds(t0, t1), clock.seconds(t1, t2)


@torch.no_grad()
def measure_throughput(
    model: Any, batch_size: int, prompt_len: int, decode_tokens: int, repeats: int = 3, seed: int = 0
) -> dict[str, float]:
    """Median prefill and decode throughput (tokens/s, summed over the batch) of ``model``.

    Random prompts (seeded, same for every model with the same vocabulary) on the model's device.
    """
    if min(batch_size, prompt_len, repeats) < 1 or decode_tokens < 0:
        raise ValueError("batch_size, prompt_len, repeats must be >= 1 and decode_tokens >= 0")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(model), (batch_size, prompt_len), generator=gen).to(input_device(model))
    clock = Clock.of(model)
    try:
        _one_run(model, ids, min(decode_tokens, 2), clock)  # warm-up: allocator, kernels, lazy init
        runs = [_one_run(model, ids, decode_tokens, clock) for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "decode_tokens_per_s": batch_size * decode_tokens / decode_s if decode_tokens else float("nan"),
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "batch_size": float(batch_size),
        "prompt_len": float(prompt_len),
        "decode_tokens": float(decode_tokens),
        "repeats": float(repeats),
    }


@torch.no_grad()
def paired_prefill_speedup(dense: Any, pruned: Any, prompt_len: int, rounds: int = 9, seed: int = 0) -> float:
    """Median over rounds of (dense prefill time / pruned prefill time), the two timed back to back in each
    round with the order alternating, after one warm-up each. A single prefill of a small model takes well
    under a second, so one pair is noisy on a shared machine (two back-to-back calls of the pipeline's
    earlier 5-round median gave 1.35 and 1.26 for the same models); the median of paired ratios is not."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(dense), (1, prompt_len), generator=gen).to(input_device(dense))
    pids = ids.to(input_device(pruned))
    was = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    try:
        _one_run(dense, ids, 0)
        _one_run(pruned, pids, 0)
        ratios = []
        for r in range(rounds):
            if r % 2:
                p, d = _one_run(pruned, pids, 0)[0], _one_run(dense, ids, 0)[0]
            else:
                d, p = _one_run(dense, ids, 0)[0], _one_run(pruned, pids, 0)[0]
            ratios.append(d / p)
    finally:
        dense.train(was[0])
        pruned.train(was[1])
    return statistics.median(ratios)
