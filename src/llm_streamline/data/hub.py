"""Hub datasets, streamed with ``datasets.load_dataset(..., streaming=True)`` and read only as far as the
requested blocks need; the blocks built from a stream are cached, so a rerun (or a sweep of many jobs)
streams nothing.

Presets: ``slimpajama`` (``DKYoon/SlimPajama-6B``, the paper's data), ``wikitext2`` (``Salesforce/wikitext``,
the canonical id the legacy ``wikitext`` redirects to) and ``c4`` (``allenai/c4``, ``en``).
``data.hub_path`` / ``hub_name`` / ``hub_split`` / ``text_field`` override a preset's dataset id, config,
calibration/training split and text column.

How their blocks become disjoint splits:

* ``wikitext2`` (small, read whole): as the embedded corpus, a ``torch.randperm`` seeded with ``data.seed``
  orders the blocks. It takes validation from its ``validation`` split and calibration and training from
  ``train`` (its ``test`` split is left for evaluation); indices then count the validation split's blocks
  first and the train split's blocks after them.
* ``slimpajama`` and ``c4`` (large, streamed): the stream is shuffled with a seeded buffer
  (``SHUFFLE_BUFFER`` documents), then consumed in order: validation blocks first, then calibration, then
  training; each segment starts on a fresh document (the rest of the document that completed the
  previous segment is dropped), so splits share no document. ``c4`` takes validation from its
  ``validation`` split (SlimPajama-6B uses ``train`` for all three, as in the paper's setup).

Texts of the reported perplexity read from the hub (``hub_text_ids``): ``wikitext2``'s ``test`` split,
rows joined as they come (the literature's standard: LLM-Pruner, SliceGPT, SLEB report it so), never read
by ``data=``; ``c4``'s ``en`` ``validation``, the first documents in file order (SparseGPT/Wanda's C4
evaluation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llm_streamline import assets, stages
from llm_streamline.config import ConfigError, DataConfig
from llm_streamline.data import tokens
from llm_streamline.data.splits import TokenBlocks, as_blocks, permuted_blocks, permuted_split
from llm_streamline.data.tokens import TOKENIZE_BATCH, batched, encode, separator, tokenizer_fingerprint

log = logging.getLogger(__name__)

BLOCKS_VERSION = 1
SHUFFLE_BUFFER = 10_000          # documents held by the seeded shuffle buffer of a streamed hub dataset


@dataclass(frozen=True)
class HubPreset:
    path: str
    name: str | None
    train_split: str                 # calibration + training
    val_split: str | None         # None: validation comes from the train split's stream too
    whole: bool                      # small dataset: read whole splits and permute blocks (no shuffle)


HUB_PRESETS: dict[str, HubPreset] = {
    "slimpajama": HubPreset("DKYoon/SlimPajama-6B", None, "train", None, whole=False),
    "wikitext2": HubPreset("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "validation", whole=True),
    "c4": HubPreset("allenai/c4", "en", "train", "validation", whole=False),
}

# the texts of the reported perplexity that come from the hub: (path, config, split)
PPL_HUB = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
           "c4": ("allenai/c4", "en", "validation")}


class HubUnavailable(RuntimeError):
    """A hub preset was asked for without network access to the Hugging Face hub."""


# ---------------------------------------------------------------------------------------------- network
def _offline_msg(name: str, why: str) -> str:
    why = " ".join(str(why).split())
    if len(why) > 160:
        why = why[:157] + "..."
    if name.startswith("eval.perplexity_text="):  # the reported perplexity's text, not the training data
        return f"{name} needs network access to the Hugging Face hub; use eval.perplexity_text=heldout ({why})"
    return f"data={name} needs network access to the Hugging Face hub; use data=offline ({why})"


def _offline_flag() -> bool:
    return assets.offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0", "false")


def preflight(name: str) -> None:
    """Fail fast when the hub cannot be reached, instead of ~25 s of HTTP retries.

    Only a DNS lookup of the hub endpoint, and skipped when a proxy is configured (the proxy may
    resolve names the machine cannot).
    """
    if _offline_flag():
        raise HubUnavailable(_offline_msg(name, "offline mode is set: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/"
                                                "LLM_STREAMLINE_OFFLINE"))
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise HubUnavailable(_offline_msg(name, f"cannot resolve {host}: {e}")) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub cannot be reached" (datasets wraps its own in ConnectionError;
    errors raised while a stream is being read come from the HTTP client underneath)."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for mod, names in (("httpx", ("TransportError",)), ("requests.exceptions", ("ConnectionError", "Timeout")),
                       ("aiohttp", ("ClientConnectionError",))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        errs += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(errs)


def open_stream(name: str, path: str, hub_name: str | None, split: str, text_field: str,
                shuffle_seed: int | None) -> Iterator[str]:
    """Texts of one split, streamed; shuffled with a seeded buffer when shuffle_seed is not None."""
    import datasets

    net_errors = _network_errors()
    try:
        ds = datasets.load_dataset(path, hub_name, split=split, streaming=True)
    except net_errors as e:
        raise HubUnavailable(_offline_msg(name, f"{type(e).__name__}: {e}")) from e
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except net_errors as e:
            raise HubUnavailable(_offline_msg(name, f"while streaming {path}: {type(e).__name__}: {e}")) from e
        if text_field not in row:
            raise ConfigError(f"data={name}: {path} ({hub_name}, {split}) has no column {text_field!r}; "
                              f"columns: {sorted(row)}; set data.text_field")
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


# ---------------------------------------------------------------------------------------------- streams
def _fill_segments(texts: Iterator[str], tokenizer: Any, seq_len: int, counts: list[int],
                   desc: str) -> tuple[list[torch.Tensor], int, int]:
    """Consume documents in order until each segment holds counts[k] blocks.

    Each segment starts with a fresh document; the unused tail of the document that completes a segment is
    dropped, so two segments share no document. Returns (segments, tokens read, documents read).
    """
    sep = separator(tokenizer)
    segments: list[torch.Tensor] = []
    k, buf, have = 0, [], 0
    n_tokens = n_docs = 0
    with tqdm(total=sum(counts) * seq_len, desc=desc, unit="tok", unit_scale=True, mininterval=1.0) as bar:
        # small batches: a hub stream should be read no further than needed
        for batch in batched(texts, 32):
            for ids in encode(tokenizer, batch):
                if k == len(counts):
                    break
                ids = list(ids) + ([sep] if sep is not None else [])
                n_docs += 1
                n_tokens += len(ids)
                need = counts[k] * seq_len
                take = ids[: need - have]
                buf.append(np.asarray(take, dtype=np.int64))
                have += len(take)
                bar.update(len(take))
                if have == need:
                    segments.append(torch.from_numpy(np.concatenate(buf)).view(counts[k], seq_len))
                    k, buf, have = k + 1, [], 0
            if k == len(counts):
                break
    if k < len(counts):
        got = sum(s.shape[0] for s in segments) + have // seq_len
        raise ValueError(f"stream ended after {got} blocks")
    return segments, n_tokens, n_docs


def _whole_split_stream(texts: Iterator[str], tokenizer: Any, desc: str) -> tuple[np.ndarray, int]:
    """A small split read whole: rows tokenised and concatenated as they come (wikitext rows are lines of
    articles that carry their own newlines, so no separator is inserted between rows)."""
    parts, n_docs = [], 0
    with tqdm(desc=desc, unit="row", mininterval=1.0) as bar:
        for batch in batched(texts, TOKENIZE_BATCH):
            for ids in encode(tokenizer, batch):
                parts.append(np.asarray(ids, dtype=np.int64))
            n_docs += len(batch)
            bar.update(len(batch))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids, n_docs


def _first_documents(texts: Iterator[str], tokenizer: Any, need: int) -> np.ndarray:
    """Documents in file order, EOS after each, until the stream holds at least `need` tokens."""
    parts, total = [], 0
    sep = separator(tokenizer)
    for batch in batched(texts, TOKENIZE_BATCH):
        for doc_ids in encode(tokenizer, batch):
            parts.append(np.asarray(doc_ids + ([sep] if sep is not None else []), dtype=np.int64))
            total += parts[-1].size
        if total >= need:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- blocks cache
def _cache_path(cfg: DataConfig, preset: HubPreset, path: str, hub_name: str | None, split: str,
                tokenizer: Any) -> Path:
    key = json.dumps({"v": BLOCKS_VERSION, "name": cfg.name, "path": path, "hub_name": hub_name,
                      "split": split, "val_split": preset.val_split, "whole": preset.whole,
                      "field": cfg.text_field, "seq_len": cfg.seq_len, "seed": cfg.seed,
                      "calib": cfg.calib_samples, "train": cfg.train_samples, "val": cfg.val_samples,
                      "shuffle_buffer": SHUFFLE_BUFFER, "tok": tokenizer_fingerprint(tokenizer)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return tokens.cache_dir("blocks") / f"{cfg.name}-{digest}.safetensors"


def _load_cached_blocks(path: Path) -> TokenBlocks | None:
    if not stages.sealed(path, path.name):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return TokenBlocks(calib=t["calib"], train=t["train"], val=t["val"], seq_len=int(meta["seq_len"]),
                           token_counts=json.loads(meta["token_counts"]), source=meta["source"],
                           calib_idx=t["calib_idx"], train_idx=t["train_idx"], val_idx=t["val_idx"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # corrupt: rebuild, never trust
        log.warning("blocks cache %s is unreadable (%s); rebuilding", path, e)
        return None


def _save_cached_blocks(path: Path, b: TokenBlocks) -> None:
    from safetensors.torch import save_file

    tensors = {"calib": b.calib, "train": b.train, "val": b.val,
               "calib_idx": b.calib_idx, "train_idx": b.train_idx, "val_idx": b.val_idx}
    meta = {"seq_len": str(b.seq_len), "token_counts": json.dumps(b.token_counts), "source": b.source}
    stages.write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=meta))
    stages.seal(path, path.name)


# ---------------------------------------------------------------------------------------------- splits
@dataclass
class _Source:
    """What one run reads: the dataset, its calibration/training split, and how to open a split's stream."""
    cfg: DataConfig
    preset: HubPreset
    path: str
    hub_name: str | None
    split: str

    @property
    def label(self) -> str:
        return self.path + (f"/{self.hub_name}" if self.hub_name else "")

    def stream(self, split: str, shuffle: bool) -> Iterator[str]:
        c = self.cfg
        return open_stream(c.name, self.path, self.hub_name, split, c.text_field, c.seed if shuffle else None)


def _whole_blocks(src: _Source, tokenizer: Any) -> TokenBlocks:
    """Small dataset: whole splits, blocks ordered by a seeded permutation (as the embedded corpus)."""
    cfg, split = src.cfg, src.split
    L, V, C, T = cfg.seq_len, cfg.val_samples, cfg.calib_samples, cfg.train_samples
    val_split = src.preset.val_split or split
    v_ids, v_docs = _whole_split_stream(src.stream(val_split, False), tokenizer, f"tokenising {val_split}")
    if val_split == split:
        t_ids, t_docs = v_ids, 0
        blocks = as_blocks(t_ids, L)
        val_idx, calib_idx, train_idx = permuted_blocks(blocks, cfg, f"{src.label} [{split}]", int(t_ids.size))
        val_b, calib_b, train_b = blocks[val_idx], blocks[calib_idx], blocks[train_idx]
        n_blocks = blocks.shape[0]
    else:
        t_ids, t_docs = _whole_split_stream(src.stream(split, False), tokenizer, f"tokenising {split}")
        vb, tb = as_blocks(v_ids, L), as_blocks(t_ids, L)
        if vb.shape[0] < V:
            raise ConfigError(f"data={cfg.name}: {src.label} [{val_split}] gives {vb.shape[0]} blocks of "
                              f"seq_len={L} but val_samples={V} were requested; lower val_samples or seq_len")
        if tb.shape[0] < C + T:
            raise ConfigError(f"data={cfg.name}: {src.label} [{split}] gives {tb.shape[0]} blocks of "
                              f"seq_len={L} but calib_samples={C} + train_samples={T} = {C + T} were "
                              f"requested; lower the sample counts or seq_len")
        (val_idx,) = permuted_split(vb.shape[0], [V], cfg.seed)
        calib_i, train_i = permuted_split(tb.shape[0], [C, T], cfg.seed)
        val_b, calib_b, train_b = vb[val_idx], tb[calib_i], tb[train_i]
        # one numbering: validation split's blocks first, then the train split's
        calib_idx, train_idx = calib_i + vb.shape[0], train_i + vb.shape[0]
        n_blocks = vb.shape[0] + tb.shape[0]
    corpus_tokens = int(v_ids.size + (t_ids.size if val_split != split else 0))
    split_label = f"{split}" + (f"+{val_split}" if val_split != split else "")
    return _blocks(src, split_label, (val_b, calib_b, train_b), (val_idx, calib_idx, train_idx),
                   corpus_tokens, v_docs + t_docs, n_blocks)


def _streamed_blocks(src: _Source, tokenizer: Any) -> TokenBlocks:
    """Large dataset: a seeded shuffled stream consumed in order, validation first (see the module docstring)."""
    cfg, split, val_split = src.cfg, src.split, src.preset.val_split
    L, V, C, T = cfg.seq_len, cfg.val_samples, cfg.calib_samples, cfg.train_samples
    try:
        if val_split and val_split != split:
            (val_b,), v_tok, v_docs = _fill_segments(src.stream(val_split, True), tokenizer, L, [V],
                                                     f"streaming {val_split}")
            (calib_b, train_b), t_tok, t_docs = _fill_segments(src.stream(split, True), tokenizer, L, [C, T],
                                                               f"streaming {split}")
            split_label = f"{split}+{val_split}"
        else:
            (val_b, calib_b, train_b), t_tok, t_docs = _fill_segments(
                src.stream(split, True), tokenizer, L, [V, C, T], f"streaming {split}")
            v_tok = v_docs = 0
            split_label = split
    except ValueError as e:
        if str(e).startswith("stream ended"):
            raise ConfigError(f"data={cfg.name}: {src.label} [{split}] {e} of seq_len={L}; "
                              f"val_samples={V} + calib_samples={C} + train_samples={T} = {V + C + T} "
                              f"were requested; lower the sample counts or seq_len") from None
        raise
    idx = (torch.arange(V), torch.arange(V, V + C), torch.arange(V + C, V + C + T))
    return _blocks(src, split_label, (val_b, calib_b, train_b), idx, v_tok + t_tok, v_docs + t_docs, V + C + T)


def _blocks(src: _Source, split_label: str, split_blocks: tuple[torch.Tensor, ...], idx: tuple[torch.Tensor, ...],
            corpus_tokens: int, n_docs: int, n_blocks: int) -> TokenBlocks:
    cfg, (val_b, calib_b, train_b), (val_idx, calib_idx, train_idx) = src.cfg, split_blocks, idx
    L = cfg.seq_len
    return TokenBlocks(
        calib=calib_b.contiguous(), train=train_b.contiguous(), val=val_b.contiguous(), seq_len=L,
        token_counts={"corpus": corpus_tokens, "blocks": int(n_blocks), "documents": n_docs,
                      "calib": cfg.calib_samples * L, "train": cfg.train_samples * L, "val": cfg.val_samples * L},
        source=f"hub:{src.label}[{split_label}]", calib_idx=calib_idx, train_idx=train_idx, val_idx=val_idx,
    )


def hub_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    """A hub preset's disjoint blocks: from the blocks cache, or streamed now and cached."""
    preset = HUB_PRESETS[cfg.name]
    src = _Source(cfg, preset, cfg.hub_path or preset.path,
                  cfg.hub_name if cfg.hub_path or cfg.hub_name else preset.name, cfg.hub_split or preset.train_split)
    cache = _cache_path(cfg, preset, src.path, src.hub_name, src.split, tokenizer)
    cached = _load_cached_blocks(cache)
    if cached is not None:
        log.info("data=%s: blocks from cache %s", cfg.name, cache)
        return cached
    preflight(cfg.name)
    t0 = time.perf_counter()
    out = _whole_blocks(src, tokenizer) if preset.whole else _streamed_blocks(src, tokenizer)
    _save_cached_blocks(cache, out)
    log.info("data=%s: %d documents, %d tokens read in %.1f s; blocks cached in %s",
             cfg.name, out.token_counts["documents"], out.token_counts["corpus"], time.perf_counter() - t0, cache)
    return out


def hub_text_ids(name: str, tokenizer: Any, seq_len: int, max_blocks: int | None) -> tuple[np.ndarray, str]:
    """Token ids of a reported-perplexity text from the hub (``PPL_HUB``), and a description of the text."""
    preflight(f"eval.perplexity_text={name}")
    path, hub_name, split = PPL_HUB[name]
    texts = open_stream(name, path, hub_name, split, "text", shuffle_seed=None)
    if name == "wikitext2":
        ids, _ = _whole_split_stream(texts, tokenizer, f"tokenising {path} {split}")
    else:  # C4 validation is large: read only as far as the blocks need
        ids = _first_documents(texts, tokenizer, (max_blocks or 256) * seq_len)
    return ids, f"{name}: {path} {hub_name} {split}"
