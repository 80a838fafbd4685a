"""FastHFLM: lm-eval's HFLM with shared-context scoring of multiple-choice options.

Stock HFLM scores every (context, option) pair as its own sequence, so an item with K options runs
its context K times, and it applies the LM head (576 x 49152 for SmolLM2, a fifth of the model's
FLOPs per token) to every position. Here, per forward pass:

* Requests with the same context tokens form a group. A group is laid out ONCE as
  ``context + option_1[:-1] + ... + option_K[:-1]`` (an option's last token is only a target),
  with position ids restarting after the context for each option, and a 4-D attention mask that
  lets each option see the whole context and its own earlier tokens only. Several groups are packed
  into one row (block-diagonal mask), so there is no padding either.
* The LM head runs only at the positions whose predictions are read: those that predict continuation
  tokens, and once per context those that predict the context's own tokens (NLL(context), which the
  stability metric's option_mean_nll needs; skipped when ``score_context_nll`` is off, as for a compressed
  model, whose option_mean_nll nothing reads) (``logits_to_keep`` given as a 1-D index tensor, transformers v5).

Every option thus sees exactly the tokens and positions it sees in stock HFLM; the scores differ
only by float summation order (checked: within 1e-3 of stock, same accuracy). Tasks, requests,
metrics and the tokenisation are lm-eval's. Requests this layout cannot serve exactly go through
stock HFLM: sequences that stock HFLM would left-truncate (longer than ``max_length``), models whose
attention implementation takes no custom 4-D mask (only "sdpa" and "eager" are used) or whose
forward lacks ``position_ids``/``logits_to_keep``, sliding-window models whose window is shorter than
the group, and non-causal backends. Checked equal to stock (max difference 1.5e-5) on tiny Llama,
Mistral, Qwen2, Qwen3, Gemma2, Gemma3, OPT, GPT-NeoX and Phi-3 models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llm_streamline.evaluate.recording import RecordingHFLM
from llm_streamline.models.devices import input_device

_MASKABLE = ("sdpa", "eager")
LSE_ELEMENTS = 1 << 24  # logits per logsumexp call (64 MiB in fp32)


@dataclass
class _Group:
    """Requests (by index) sharing one context; ``length`` = tokens it occupies in a packed row."""

    context: list[int]
    members: list[int]
    length: int


class FastHFLM(RecordingHFLM):
    """HFLM whose loglikelihood runs each shared context once (see module docstring).

    ``batch_size`` bounds the requests per forward pass; ``pack_tokens`` bounds the packed row length
    (the attention mask is dense, so very long rows cost quadratic attention).
    """

    def __init__(self, *args, pack_tokens: int = 1024, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pack_tokens = int(pack_tokens)
        # what went where, summed over calls (for tests and benchmarks)
        self.fast_stats = {"shared_requests": 0, "stock_requests": 0, "packs": 0, "oversize_groups": 0,
                           "packed_tokens": 0}

    # ------------------------------------------------------------------ eligibility

    def _fast_supported(self) -> bool:
        impl = getattr(self.model.config, "_attn_implementation", None)
        params = inspect.signature(self.model.forward).parameters
        takes = all(k in params for k in ("position_ids", "attention_mask", "logits_to_keep"))
        return self.backend == "causal" and impl in _MASKABLE and takes

    def _group_fits(self, context: list[int], conts: list[list[int]]) -> bool:
        longest = len(context) + max(len(c) for c in conts)
        if longest > self.max_length + 1:  # stock HFLM would left-truncate: let it
            return False
        window = getattr(self.model.config, "sliding_window", None)
        return not (window and longest - 1 > window)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):  # type: ignore[override]
        self.record_continuation_lengths(requests)
        stock = super(RecordingHFLM, self)._loglikelihood_tokens  # HFLM's own, unrecorded
        if not self._fast_supported() or override_bs is not None:  # rolling windows: stock
            out = stock(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            if override_bs is None and self.score_context_nll:
                self.score_contexts([ctx for _, ctx, _ in requests])
            return out

        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            assert len(ctx) > 0 and len(cont) > 0
            by_context.setdefault(tuple(ctx), []).append(i)
        groups: list[_Group] = []
        slow: list[int] = []
        for ctx, members in by_context.items():
            conts = [requests[i][2] for i in members]
            if self._group_fits(list(ctx), conts):
                groups.append(_Group(list(ctx), members, len(ctx) + sum(len(c) - 1 for c in conts)))
            else:
                slow.extend(members)

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if slow:
            for i, ans in zip(slow, stock([requests[i] for i in slow], disable_tqdm=disable_tqdm)):
                results[i] = ans
            if self.score_context_nll:
                self.score_contexts([requests[i][1] for i in slow])
        packs = self._packs(groups)
        self.fast_stats["stock_requests"] += len(slow)
        self.fast_stats["shared_requests"] += len(requests) - len(slow)
        self.fast_stats["packs"] += len(packs)
        self.fast_stats["oversize_groups"] += sum(g.length > self.pack_tokens for g in groups)
        self.fast_stats["packed_tokens"] += sum(g.length for g in groups)
        pbar = tqdm(total=len(requests) - len(slow), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests (shared context)")
        for pack in packs:
            for i, ans in self._score_pack(pack, requests):
                results[i] = ans
                self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
                pbar.update(1)
        pbar.close()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _packs(self, groups: list[_Group]) -> list[list[_Group]]:
        """Longest groups first (as stock HFLM orders work); greedy fill under both limits."""
        max_requests = self.batch_size if isinstance(self.batch_size, int) else 64
        packs: list[list[_Group]] = []
        cur: list[_Group] = []
        tokens = reqs = 0
        for g in sorted(groups, key=lambda g: -g.length):
            if cur and (tokens + g.length > self.pack_tokens or reqs + len(g.members) > max_requests):
                packs.append(cur)
                cur, tokens, reqs = [], 0, 0
            cur.append(g)
            tokens += g.length
            reqs += len(g.members)
        if cur:
            packs.append(cur)
        return packs

    def _score_pack(self, pack: list[_Group], requests) -> list[tuple[int, tuple[float, bool]]]:
        ids: list[int] = []
        pos: list[int] = []
        seg: list[int] = []  # 0 = context of its group, k > 0 = option k; unique across the pack
        grp: list[int] = []
        # per request: (request index, logit row indices in the packed row, target tokens)
        wanted: list[tuple[int, list[int], list[int]]] = []
        next_seg = 1
        # per group: (context tokens, logit rows predicting its tokens 1.., those tokens) -> NLL(context)
        contexts: list[tuple[tuple[int, ...], list[int], list[int]]] = []
        for g_idx, g in enumerate(pack):
            start = len(ids)
            n_ctx = len(g.context)
            ids += g.context
            pos += range(n_ctx)
            seg += [0] * n_ctx
            grp += [g_idx] * n_ctx
            last_ctx = start + n_ctx - 1
            if self.score_context_nll and tuple(g.context) not in self.context_nll:
                contexts.append((tuple(g.context), list(range(start, last_ctx)), g.context[1:]))
            for i in g.members:
                cont = requests[i][2]
                s0 = len(ids)
                body = cont[:-1]  # the last option token is a target only
                ids += body
                pos += range(n_ctx, n_ctx + len(body))
                seg += [next_seg] * len(body)
                grp += [g_idx] * len(body)
                next_seg += 1
                wanted.append((i, [last_ctx] + list(range(s0, s0 + len(body))), list(cont)))

        device = input_device(self.model)  # under a device_map the embedding's card; the logits come off the head's
        t_ids = torch.tensor([ids], dtype=torch.long, device=device)
        t_pos = torch.tensor([pos], dtype=torch.long, device=device)
        mask = self._mask(torch.tensor(pos, device=device), torch.tensor(seg, device=device),
                          torch.tensor(grp, device=device))
        keep = sorted({j for _, rows, _ in wanted + contexts for j in rows})
        where = {j: k for k, j in enumerate(keep)}
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            logits = self.model(input_ids=t_ids, position_ids=t_pos, attention_mask=mask, use_cache=False,
                                logits_to_keep=torch.tensor(keep, device=device)).logits[0]
        # log p(target) = logit(target) - logsumexp(logits): only the normaliser is computed over the vocabulary,
        # in row chunks, so no second [len(keep), vocab] tensor (a log-softmax) is formed: with Gemma 3's 262k
        # vocabulary 1024 kept rows are 1 GiB of fp32 logits already
        dtype = self.softmax_dtype or logits.dtype
        out_device = logits.device  # the head's card under a device_map
        step = max(1, LSE_ELEMENTS // logits.shape[-1])
        lse = torch.cat([torch.logsumexp(logits[r:r + step].to(dtype), dim=-1) for r in range(0, len(keep), step)])

        def scored(rows: list[int], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            """log p of each target at its row, and the rows (indices into the kept logits)."""
            r = torch.tensor([where[j] for j in rows], dtype=torch.long, device=out_device)
            target = torch.tensor(targets, dtype=torch.long, device=out_device)
            return logits[r, target].to(dtype) - lse[r], r

        for ctx, rows, targets in contexts:
            nll = -float(scored(rows, targets)[0].sum()) if rows else 0.0
            self.context_nll[ctx] = (nll, len(rows))
        out = []
        for i, rows, cont in wanted:
            lp, r = scored(rows, cont)
            greedy = bool((logits[r].argmax(-1) == torch.tensor(cont, device=out_device)).all())
            out.append((i, (float(lp.sum()), greedy)))
        return out

    def _mask(self, pos: torch.Tensor, seg: torch.Tensor, grp: torch.Tensor) -> torch.Tensor:
        """Additive 4-D mask [1, 1, T, T]: attend within the group, causally by position, to the
        context or to one's own option segment. Additive floats work for both sdpa and eager."""
        allowed = (
            (grp[:, None] == grp[None, :])
            & (pos[None, :] <= pos[:, None])
            & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
        )
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]
