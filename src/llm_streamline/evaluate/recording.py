"""RecordingHFLM: lm-eval's stock HFLM that also keeps, per request, what the per-item rows need (the
continuation's token count as HFLM encoded it, and its context's NLL); the option scores are HFLM's own.
The stock scorer of `harness`, and the base of the prefix-sharing `fast_hflm.FastHFLM`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from llm_streamline.models.devices import input_device


class RecordingHFLM(HFLM):
    """Stock HFLM that remembers, per request, its continuation token count and its context's NLL
    (the option scores themselves are stock HFLM's, untouched). ``score_context_nll = False`` skips the
    context scoring: only the dense model's option_mean_nll enters stability, so a compressed model's
    evaluation need not pay for it (its rows then have no ``option_mean_nll``)."""

    score_context_nll: bool = True

    def share_over(self, accelerator) -> None:
        """Score under torchrun with lm-eval's own data parallel: lm-eval shards each task's documents by rank
        (document d on rank d mod P), pads the ranks' requests to equal counts, gathers the per-item metrics and
        samples on rank 0 and aggregates there (`lm_eval.evaluator.evaluate`). HFLM sets this up only for a model
        it loads itself from a name; for a model handed over as an object it assumes one process, so the ranks are
        set here (the global rank: HFLM's own setup takes the node-local one, which would repeat documents across
        nodes)."""
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator

    def gather_object(self, obj, dst=0):
        """lm-eval's gather of the per-rank samples and per-item metrics, put back in one process's order:
        lm-eval concatenates them rank after rank, and its stderr (a sum over the items, or a bootstrap that
        draws by position) then differs from one process's in the last digits."""
        gathered = super().gather_object(obj, dst)
        if self.world_size <= 1 or self.rank != dst:
            return gathered
        return [one_process_order(gathered)]

    def record_continuation_lengths(self, requests: Iterable[Any]) -> None:
        lengths = self.__dict__.setdefault("continuation_tokens", {})
        contexts = self.__dict__.setdefault("request_contexts", {})
        for strings, ctx_enc, cont_enc in requests:
            if strings is not None:  # rolling-window requests carry no strings
                lengths[tuple(strings)] = len(cont_enc)
                contexts[tuple(strings)] = tuple(ctx_enc)

    @property
    def context_nll(self) -> dict[tuple[int, ...], tuple[float, int]]:
        """{context tokens: (summed NLL of its tokens 1.., number of those tokens)}."""
        return self.__dict__.setdefault("_context_nll", {})

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # type: ignore[override]
        self.record_continuation_lengths(requests)
        out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if override_bs is None and self.score_context_nll:  # rolling-window (perplexity) requests: none
            self.score_contexts([ctx for _, ctx, _ in requests])
        return out

    @torch.no_grad()
    def score_contexts(self, contexts: Iterable[Sequence[int]]) -> None:
        """NLL of each distinct context's tokens 1.. from their prefixes, batched and right-padded.
        A context longer than the model's window is scored on its last ``max_length`` tokens, as stock
        HFLM left-truncates what it feeds the model."""
        todo = sorted({tuple(c) for c in contexts} - set(self.context_nll), key=len, reverse=True)
        for c in todo:
            if len(c) < 2:
                self.context_nll[c] = (0.0, 0)
        todo = [c for c in todo if len(c) >= 2]
        bs = self.batch_size if isinstance(self.batch_size, int) else 16
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            windows = [c[-self.max_length:] for c in chunk]
            width = max(len(w) for w in windows)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, w in enumerate(windows):
                ids[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = 1
            device = input_device(self.model)  # the embedding's card; the logits come off the head's
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                use_cache=False).logits[:, :-1]
            logp = torch.nn.functional.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            ids, mask = ids.to(logp.device), mask.to(logp.device)
            token_nll = -logp.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            for r, (c, w) in enumerate(zip(chunk, windows)):
                self.context_nll[c] = (float(token_nll[r].sum()), len(w) - 1)


def _interleave(parts: list[list]) -> list:
    """Rank r's items are documents r, r+P, r+2P, ... (lm-eval's `create_iterator`): round robin restores 0, 1, 2."""
    return [p[i] for i in range(max(map(len, parts), default=0)) for p in parts if i < len(p)]


def one_process_order(per_rank: list[dict]) -> dict:
    """{task: ...} gathered from every rank, as one process lists it: per-item metrics ({(metric, filter): values
    by document}) interleaved back into document order; logged samples (a list per task, filter after filter,
    documents in order within each) sorted by (filter, document)."""
    out: dict = {}
    for task in per_rank[0]:
        parts = [r.get(task) for r in per_rank]
        if isinstance(parts[0], dict):
            keys = dict.fromkeys(k for p in parts for k in p)
            out[task] = {k: _interleave([p.get(k, []) for p in parts]) for k in keys}
        else:
            filters = list(dict.fromkeys(s["filter"] for p in parts for s in p))
            out[task] = sorted(itertools.chain(*parts), key=lambda s: (filters.index(s["filter"]), s["doc_id"]))
    return out
