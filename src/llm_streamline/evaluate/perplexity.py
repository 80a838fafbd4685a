"""Token-level perplexity of a causal LM on fixed-length token blocks.

Every block [T tokens] predicts its tokens 1..T-1 from their prefixes (T-1 predictions per block; the
first token of a block has no context and is not scored). ppl = exp(total NLL / predicted tokens),
a token-weighted mean over all blocks, so the batch size does not change the result. The LM head and the
log-softmax run on chunks of positions (`losses.nll_batches`): no [batch, seq, vocab] fp32 tensor is formed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_streamline.losses import nll_batches
from llm_streamline.parallel import ranks, sum_over_ranks


@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, batch_size: int, desc: str = "perplexity",
               accelerator=None) -> dict[str, float]:
    """{"ppl", "nll" (mean per predicted token, nats), "tokens" (predicted tokens)} over ``blocks``.

    ``blocks`` is a LongTensor [N, T] of token ids (no padding). The model runs in eval mode on its
    own device; each chunk's logits are upcast to fp32 for the log-softmax. Under torchrun (``accelerator``)
    batch k runs on rank k mod P and the float64 sums of NLL and tokens are added up over the ranks
    (`parallel.sum_over_ranks`): every rank gets the one-process value (up to the order of the additions).
    A non-finite batch raises on the rank that ran it (torchrun then stops the others).
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, T] with T >= 2, got {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    world, rank = ranks(accelerator)
    mine = len(range(rank, math.ceil(blocks.shape[0] / batch_size), world))  # this rank's batches
    try:
        for start, ids, nll, predicted in tqdm(nll_batches(model, blocks, batch_size, accelerator), desc=desc,
                                               unit="batch", total=mine, disable=rank != 0):
            if not torch.isfinite(nll):
                from llm_streamline.faults import NumericalFault, diagnose

                raise NumericalFault(desc, f"batch {start // batch_size} (blocks {start}..{start + ids.shape[0] - 1})",
                                     f"negative log-likelihood {float(nll)}", diagnose(model, ids[:1]))
            total_nll += float(nll)
            total_tokens += predicted
    finally:
        model.train(was_training)
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        total_nll, total_tokens = summed(torch.tensor([total_nll, total_tokens], dtype=torch.float64)).tolist()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": float(total_tokens)}
