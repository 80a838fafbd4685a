"""Losses over the vocabulary, computed in chunks of positions.

A causal LM's forward returns [batch, seq, vocab] logits; upcast to fp32 for the log-softmax that is
4 * B * T * V bytes (8 GB for 8 sequences of 2048 tokens over a 128k vocabulary), and the LM head's
output is by far the largest activation of a small model. Here the model body runs only to its final
hidden states (what the LM head reads: final norm applied, OPT's `project_out` too), and the LM head
and the loss run on `chunk` positions at a time. With gradients on, each chunk is checkpointed: its
logits are recomputed in the backward pass instead of being kept, so peak memory holds one chunk's
logits whatever the sequence length.

Generic over families: the head is `get_output_embeddings()`, the body is the model's forward up to it, and a config's
`final_logit_softcapping` (Gemma 2/3: logits = cap * tanh(logits / cap)) is applied as the families'
own forward does. Checked equal to the unchunked `model(...).logits` computation on tiny models of every
family in conf/model/tiny-*.yaml (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_streamline.models.devices import input_device, is_sharded
from llm_streamline.models.layers import text_config
from llm_streamline.parallel import shares

DEFAULT_CHUNK = 1024  # positions per head call: 1024 x 49k fp32 logits = 200 MB (SmolLM2)
# the fp32 logits one head call may form: the chunk shrinks as the vocabulary grows (SmolLM2's 49k: 1024
# positions; Gemma 3's 262k: 192 positions, not 1024 positions = 1 GiB, twice over with the loss's log-softmax)
LOGITS_BUDGET = DEFAULT_CHUNK * 49152 * 4


def chunk_for(head: "Head") -> int:
    """Positions per head call so that one chunk's fp32 logits stay within `LOGITS_BUDGET`."""
    vocab = getattr(head.proj, "out_features", None) or head.proj.weight.shape[0]
    return max(16, min(DEFAULT_CHUNK, LOGITS_BUDGET // (4 * vocab)))


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Head:
    """The LM head of a model and what its forward does to the head's output."""
    proj: nn.Module
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.proj(hidden).float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def head_of(model: nn.Module) -> Head:
    lm = causal_lm(model)
    proj = lm.get_output_embeddings()
    if proj is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (not a causal LM?)")
    return Head(proj, getattr(text_config(lm), "final_logit_softcapping", None))


class _BodyDone(Exception):
    pass


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, d] hidden states the LM head reads (no logits computed).

    The model is called as a whole (its own hooks and wrappers run: PEFT's, accelerate's, a test's) and
    stopped by a pre-hook on the LM head, which records the head's input: the body's output whatever the
    family calls it (OPT's forward calls its decoder, not its base model)."""
    head = head_of(model).proj
    caught = {}

    def stop_at_head(module, args):
        caught["h"] = args[0]
        raise _BodyDone

    handle = head.register_forward_pre_hook(stop_at_head)
    try:
        model(input_ids=ids, use_cache=False)
    except _BodyDone:
        pass
    finally:
        handle.remove()
    if "h" not in caught:
        raise RuntimeError(f"{type(causal_lm(model)).__name__}: the forward did not reach its LM head")
    return caught["h"]


def _chunk_sums(fn, *tensors: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum over row chunks of fn(*rows); checkpointed when a tensor needs its gradient."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    total = None
    for i in range(0, tensors[0].shape[0], chunk):
        part = [t[i:i + chunk] for t in tensors]
        s = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        total = s if total is None else total + s
    return total


def nll_sum(model: nn.Module, ids: torch.Tensor, chunk: int | None = None,
            hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL in nats, number of predicted tokens) over the blocks `ids` [B, T]."""
    head = head_of(model)
    h = final_hidden(model, ids) if hidden is None else hidden
    d = h.shape[-1]
    h = h[:, :-1].reshape(-1, d)
    targets = ids[:, 1:].reshape(-1)

    def ce(hc, tc):
        z = head.logits(hc)  # on the head's card (the ids are on the embedding's)
        return F.cross_entropy(z, tc.to(z.device), reduction="sum")

    return _chunk_sums(ce, h, targets, chunk=chunk or chunk_for(head)), targets.numel()


def nll_batches(model: nn.Module, blocks: torch.Tensor, batch_size: int, accelerator=None
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
    """(first block's index, the batch's ids on the model's device, summed NLL, predicted tokens) for each batch of
    `batch_size` blocks of `blocks` [N, T], in order: the loop every token-weighted perplexity sums. Under torchrun
    (`accelerator`) only this rank's batches (batch k on rank k mod P, `parallel.shares`): the caller sums them over
    the ranks. A sharded model runs as many forwards on every rank (a filler batch is run and not yielded)."""
    device = input_device(model)
    for k, counted in shares(-(-blocks.shape[0] // batch_size), accelerator, lockstep=is_sharded(model)):
        start = k * batch_size
        ids = blocks[start:start + batch_size].to(device)
        nll, count = nll_sum(model, ids)
        if counted:
            yield start, ids, nll, count


def lm_loss(model: nn.Module, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy, equal to `model(input_ids=ids, labels=ids).loss` (unpadded blocks)."""
    total, count = nll_sum(model, ids, chunk)
    return total / count


def kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head, teacher_head: Head,
           temperature: float = 1.0, chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum over positions of KL(teacher || student) of the next-token distributions at `temperature`,
    scaled by temperature^2 as in Hinton et al. 2015 so gradients keep their size, number of positions)."""
    d = student_hidden.shape[-1]
    hs, ht = student_hidden.reshape(-1, d), teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()

    def kl(hs_c, ht_c):
        log_q = F.log_softmax(student_head.logits(hs_c) / temperature, dim=-1)
        with torch.no_grad():
            log_p = F.log_softmax(teacher_head.logits(ht_c) / temperature, dim=-1).to(log_q.device)
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature ** 2

    return _chunk_sums(kl, hs, ht, chunk=chunk or chunk_for(student_head)), hs.shape[0]
