"""A generated corpus and cloze task for the tiny presets (``data=tiny``, ``eval=tiny``): no download at all.

The text is made here, by a small seeded grammar over word lists written for this module: stories of four to
eight sentences about named characters ("Cora carried the dusty lantern beside the mill."). It is not anyone's
writing and says nothing about a real model; it exists so that a smoke run and the tests on tiny random models
exercise the whole pipeline (blocks, held-out perplexity, an lm-eval multiple-choice task through both scorers)
with nothing fetched. Real measurements use ``data=offline`` and the benchmark suites.

Deterministic: numpy's PCG64 seeded with fixed seeds, so every machine generates the same documents (a change to
the grammar bumps ``SYNTHETIC_VERSION``, which keys the token caches). The held-out perplexity documents are split
off as the embedded corpus's are (``splits.split_heldout``), and the cloze items come from another seed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from llm_streamline.config import DataConfig
from llm_streamline.data import tokens
from llm_streamline.data.splits import HELDOUT_EVERY, TokenBlocks, split_heldout, stream_blocks

SYNTHETIC_VERSION = 1
DOCUMENTS = 1000                 # ~240k characters: a smoke run needs ~800 tokens, its perplexity text ~2k
CLOZE_ITEMS = 200
_CORPUS_SEED, _CLOZE_SEED = 1234, 5678

_NAMES = ("Ada", "Bram", "Cora", "Dev", "Elin", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo",
          "Nia", "Otto", "Pia", "Quin", "Rosa", "Sami", "Tove", "Uma", "Vik", "Wren", "Yara", "Zeb")
_ADJECTIVES = ("red", "small", "quiet", "old", "bright", "heavy", "green", "tired", "clever", "round", "cold",
               "sleepy", "tall", "brave", "soft", "loud", "narrow", "warm", "empty", "shiny", "gentle", "dusty",
               "wooden", "silver", "curious", "hungry", "patient", "wild", "tiny", "proud")
_NOUNS = ("fox", "lamp", "river", "teacher", "kettle", "garden", "window", "baker", "horse", "letter", "bridge",
          "drum", "cat", "boat", "farmer", "candle", "hill", "clock", "sailor", "basket", "owl", "road", "painter",
          "bell", "forest", "coat", "miller", "stone", "kite", "village", "rabbit", "ladder", "tower", "mirror",
          "goat", "wagon", "pilot", "shell", "orchard", "lantern", "mill")
_VERBS = ("found", "painted", "carried", "watched", "fixed", "followed", "lifted", "opened", "cleaned", "pushed",
          "counted", "visited", "chased", "built", "dropped", "borrowed", "hid", "mended", "sold", "noticed",
          "washed", "pulled", "kept", "passed", "climbed", "measured", "guarded", "packed", "named", "traded")
_PREPOSITIONS = ("near", "behind", "under", "beside", "across", "inside", "above", "past", "around", "beyond",
                 "along", "below")
_TIMES = ("in the morning", "at noon", "after the rain", "before dinner", "on Sunday", "at dusk", "every day",
          "last winter", "during the fair", "once again")
_CONNECTIVES = ("Then", "Later", "Meanwhile", "Soon", "After that", "Still", "At last", "That evening")


class _Grammar:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, words: tuple[str, ...]) -> str:
        return words[int(self.rng.integers(len(words)))]

    def place(self) -> str:
        """`<preposition> the <noun>`: where a sentence ends (the cloze task hides its noun)."""
        return f"{self.pick(_PREPOSITIONS)} the {self.pick(_NOUNS)}"

    def sentence(self, who: str) -> str:
        a, n, v = self.pick(_ADJECTIVES), self.pick(_NOUNS), self.pick(_VERBS)
        form = int(self.rng.integers(4))
        if form == 0:
            return f"{who} {v} the {a} {n} {self.place()}."
        if form == 1:
            return f"{self.pick(_CONNECTIVES)}, {who} {v} a {a} {n} {self.pick(_TIMES)}."
        if form == 2:
            return f"The {n} was {a}, so {who} {v} it {self.place()}."
        return f"{who} and {self.pick(_NAMES)} {v} the {n} {self.pick(_TIMES)}."

    def document(self) -> str:
        who = self.pick(_NAMES)
        return " ".join(self.sentence(who) for _ in range(int(self.rng.integers(4, 9))))


@functools.lru_cache(maxsize=1)
def synthetic_corpus() -> tuple[str, ...]:
    """The generated documents, in a fixed order (the same on every machine)."""
    g = _Grammar(_CORPUS_SEED)
    return tuple(g.document() for _ in range(DOCUMENTS))


@functools.lru_cache(maxsize=1)
def synthetic_split_docs() -> tuple[list[str], list[str]]:
    """(documents the splits are cut from, held-out documents), as for the embedded corpus."""
    return split_heldout(list(synthetic_corpus()))


def kept_stream(tokenizer: Any) -> np.ndarray:
    docs, _ = synthetic_split_docs()
    return tokens.cached_token_stream(docs, tokenizer, corpus_tag=f"synthetic-v{SYNTHETIC_VERSION}-kept{HELDOUT_EVERY}")


def synthetic_blocks(cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    docs, _ = synthetic_split_docs()
    return stream_blocks(cfg, kept_stream(tokenizer), len(docs), "the generated corpus",
                         f"synthetic-v{SYNTHETIC_VERSION}: generated in code (data/synthetic.py)")


def heldout_stream(tokenizer: Any) -> tuple[np.ndarray, str]:
    """Token ids of the held-out generated documents, and a description of the text."""
    _, held = synthetic_split_docs()
    ids = tokens.cached_token_stream(held, tokenizer,
                                     corpus_tag=f"synthetic-v{SYNTHETIC_VERSION}-heldout{HELDOUT_EVERY}")
    return ids, (f"heldout: 1/{HELDOUT_EVERY} of the generated corpus's documents ({len(held)}), "
                 f"excluded from calibration/training/validation")


def cloze_items() -> list[dict[str, Any]]:
    """Sentences of the grammar with their last noun to choose among four (lm-eval `synthetic_cloze`)."""
    g = _Grammar(_CLOZE_SEED)
    items = []
    for _ in range(CLOZE_ITEMS):
        who, v, a, n = g.pick(_NAMES), g.pick(_VERBS), g.pick(_ADJECTIVES), g.pick(_NOUNS)
        options = [str(w) for w in g.rng.choice(_NOUNS, size=4, replace=False)]
        label = int(g.rng.integers(4))
        items.append({"context": f"{who} {v} the {a} {n} {g.pick(_PREPOSITIONS)} the",
                      "choices": options, "label": label})
    return items


def cloze_dataset(**_: Any):
    """The `synthetic_cloze` task's data (its YAML's `custom_dataset`; lm-eval passes the task's metadata)."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(cloze_items())})
