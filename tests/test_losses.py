"""Chunked vocabulary losses equal the unchunked computation from `model(...).logits` on every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_streamline.config import TINY_FAMILIES
from llm_streamline.losses import head_of, kl_sum, lm_loss, nll_batches, nll_sum
from llm_streamline.models.loading import tiny_model

VOCAB = 300
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _tiny(family, overrides=None, seed=0):
    return tiny_model(family, VOCAB, overrides, seed=seed, special_ids=SPECIAL)


def _ids(seed=0, shape=(2, 24)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chunked_nll_equals_full_logits(family):
    model = _tiny(family, {"final_logit_softcapping": 2.0} if family.startswith("gemma") else None)
    ids = _ids()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        ref = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = nll_sum(model, ids, chunk=7)  # 46 positions: 7 chunks, the last one short
    assert count == ids[:, 1:].numel()
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, ids, chunk=5), model(input_ids=ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-5)


def test_softcap_is_applied():
    """Gemma's softcap changes the loss: a head without it would not match (the test above can fail)."""
    model = _tiny("gemma2", {"final_logit_softcapping": 0.5})
    assert head_of(model).softcap == 0.5
    ids = _ids()
    with torch.no_grad():
        capped, _ = nll_sum(model, ids)
        model.config.final_logit_softcapping = None
        uncapped, _ = nll_sum(model, ids)
    assert abs(float(capped - uncapped)) > 1e-2


def test_chunked_gradient_equals_full():
    model = _tiny("llama")
    ids = _ids(1)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.model.layers[3].parameters()]
    model.zero_grad()
    lm_loss(model, ids, chunk=6).backward()
    for g, r in zip((p.grad for p in model.model.layers[3].parameters()), ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_kl_equals_full_and_is_zero_for_the_teacher():
    teacher, student = _tiny("qwen3", seed=0), _tiny("qwen3", seed=1)
    ids = _ids(2)
    with torch.no_grad():
        ht = teacher.model(input_ids=ids).last_hidden_state
        hs = student.model(input_ids=ids).last_hidden_state
        t, s = teacher(input_ids=ids).logits / 2.0, student(input_ids=ids).logits / 2.0
        ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") * 4.0
        got, n = kl_sum(hs, ht, head_of(student), head_of(teacher), temperature=2.0, chunk=9)
        self_kl, _ = kl_sum(ht, ht, head_of(teacher), head_of(teacher))
    assert n == ids.numel()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert float(self_kl) == pytest.approx(0.0, abs=1e-4)


def test_nll_batches_cover_the_blocks_in_order():
    model = _tiny("llama")
    ids = _ids(shape=(5, 16))
    got = list(nll_batches(model, ids, 2))
    assert [(start, b.shape[0], count) for start, b, _, count in got] == [(0, 2, 30), (2, 2, 30), (4, 1, 15)]
    with torch.no_grad():
        whole, count = nll_sum(model, ids)
        assert sum(float(nll) for _, _, nll, _ in got) == pytest.approx(float(whole), rel=1e-5) and count == 75


def test_chunk_shrinks_with_the_vocabulary():
    """One head call's fp32 logits stay within the budget: SmolLM2's 49k vocabulary keeps 1024 positions,
    Gemma 3's 262k gets 192 (1024 would form 1 GiB of logits, twice with the loss's log-softmax)."""
    from torch import nn

    from llm_streamline.losses import LOGITS_BUDGET, Head, chunk_for

    assert chunk_for(Head(nn.Linear(8, 49152, bias=False, device="meta"))) == 1024
    assert chunk_for(Head(nn.Linear(8, 262144, bias=False, device="meta"))) == 192
    assert 192 * 262144 * 4 <= LOGITS_BUDGET
