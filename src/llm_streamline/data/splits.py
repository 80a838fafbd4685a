"""Token blocks and how a source's blocks become disjoint, seeded splits.

A token stream is cut into blocks of exactly ``seq_len`` tokens; the tail shorter than a block is dropped. So
there is no padding and no BOS anywhere: a block usually starts in the middle of a document (models that
need BOS at position 0 must add it themselves).

Validation is drawn first, calibration next, training last, so validation does not change when
``train_samples`` or ``calib_samples`` change, and calibration does not change when ``train_samples``
changes (stages keyed on the earlier splits stay valid). Too few blocks for the request is an error
(``ValueError``, one line with the numbers), for every split, training included: silently training on fewer
blocks than configured would make runs incomparable.

The held-out perplexity text is split off by document, before any blocks are cut (:func:`split_heldout`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from llm_streamline.config import DataConfig

# Bump when the blocks a data config gives change: stages keyed on the data config are keyed by it too
# (2: the held-out perplexity documents are out of the offline stream).
SPLIT_LAYOUT = 2
HELDOUT_SHINGLE = 8              # held-out documents share no run of this many words with kept ones
HELDOUT_EVERY = 20              # 1 document in 20 (by content hash) is held out for the reported perplexity


@dataclass
class TokenBlocks:
    """Disjoint token blocks. Each tensor is a LongTensor [N, seq_len] with no padding.

    ``*_idx`` are the blocks' indices in the source's block numbering (see the source's module); the
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


def as_blocks(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """The stream cut into [N, seq_len] blocks; the tail shorter than a block is dropped."""
    n = ids.size // seq_len
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)


def permuted_split(n_blocks: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """Consecutive runs of `sizes` indices of a permutation of the blocks seeded with `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_blocks, generator=g)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s].clone())
        start += s
    return out


def too_few(name: str, have: int, cfg: DataConfig, what: str, tokens: int) -> ValueError:
    need = cfg.val_samples + cfg.calib_samples + cfg.train_samples
    return ValueError(
        f"data={name}: {what} gives {have} blocks of seq_len={cfg.seq_len} ({tokens:,} tokens) but "
        f"val_samples={cfg.val_samples} + calib_samples={cfg.calib_samples} + "
        f"train_samples={cfg.train_samples} = {need} were requested; lower the sample counts or seq_len"
    )


def permuted_blocks(blocks: torch.Tensor, cfg: DataConfig, what: str, tokens: int) -> tuple[torch.Tensor, ...]:
    """(val, calib, train) index tensors of one source's blocks ordered by the seeded permutation."""
    n = blocks.shape[0]
    if n < cfg.val_samples + cfg.calib_samples + cfg.train_samples:
        raise too_few(cfg.name, n, cfg, what, tokens)
    return tuple(permuted_split(n, [cfg.val_samples, cfg.calib_samples, cfg.train_samples], cfg.seed))


def stream_blocks(cfg: DataConfig, ids: np.ndarray, documents: int, what: str, source: str) -> TokenBlocks:
    """The seeded splits of a whole tokenised corpus (the embedded or the generated one)."""
    blocks = as_blocks(ids, cfg.seq_len)
    val_idx, calib_idx, train_idx = permuted_blocks(blocks, cfg, what, int(ids.size))
    return TokenBlocks(
        calib=blocks[calib_idx].contiguous(), train=blocks[train_idx].contiguous(),
        val=blocks[val_idx].contiguous(), seq_len=cfg.seq_len,
        token_counts={"corpus": int(ids.size), "blocks": blocks.shape[0], "documents": documents,
                      "calib": cfg.calib_samples * cfg.seq_len, "train": cfg.train_samples * cfg.seq_len,
                      "val": cfg.val_samples * cfg.seq_len},
        source=source, calib_idx=calib_idx, train_idx=train_idx, val_idx=val_idx,
    )


# ---------------------------------------------------------------------------- the held-out perplexity text
def is_heldout(doc: str) -> bool:
    """Whether an embedded-corpus document belongs to the held-out perplexity text (by content hash, so
    independent of the seed, of the document order and of the tokenizer)."""
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def _shingles(doc: str, n: int = HELDOUT_SHINGLE) -> set[int]:
    words = doc.split()
    return {hash(tuple(words[i:i + n])) for i in range(max(len(words) - n + 1, 0))}


def split_heldout(docs: list[str]) -> tuple[list[str], list[str]]:
    """(documents the splits are cut from, held-out documents). A hash-selected document that shares any run
    of HELDOUT_SHINGLE words with a kept document (the embedded corpus has overlapping passages: LAMBADA
    excerpts of one book, CoQA stories in two variants, DROP's census boilerplate) stays in the kept stream,
    so the held-out text shares no such run with the text anything trains or selects on."""
    kept = [d for d in docs if not is_heldout(d)]
    seen: set[int] = set()
    for d in kept:
        seen |= _shingles(d)
    held = [d for d in docs if is_heldout(d) and not (_shingles(d) & seen)]
    held_set = set(held)
    return [d for d in docs if d not in held_set], held
