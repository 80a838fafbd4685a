"""The tiny presets' tokenizer: 256 byte tokens and three special tokens, built in code (no file, no download).

A tiny random-weight model (conf/model/tiny-*.yaml) predicts nothing worth a real vocabulary; what the tests and
smoke runs need is a real fast tokenizer that lm-eval, our data blocks and `save_pretrained` treat like any other.
Byte-level (every UTF-8 byte is one token, GPT-2's byte-to-printable mapping, no merges) encodes any text
losslessly, so the corpus and the benchmark prompts need no unknown token, and the context / continuation split
lm-eval makes for log-likelihoods is exact (a continuation's tokens are its bytes whatever precedes it).

Like SmolLM2's tokenizer it prepends no BOS (`data.tokens.bos_prefix` answers None): the tiny models stand in for
it in tests. Ids: bytes 0..255 are ids 0..255, then BOS, EOS, PAD; the vocabulary is 259 (the tiny models'
embedding size; SmolLM2's 49152 made tiny-llama 6.6M parameters, 95% of them embedding and LM head; now 0.33M).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
NAME = "llm-streamline/tiny-bytes"  # the tokenizer's name_or_path (a hub id that does not exist: nothing fetches it)


def _backend() -> Tokenizer:
    # ByteLevel's alphabet maps each byte to a printable character; in byte order, so id == byte value
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed without merges; add_prefix_space=False: " a" and "a" differ,
    # as in SmolLM2's tokenizer (lm-eval's continuations carry their leading space)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    return tok


def _byte_of(ch: str) -> int:
    """The byte GPT-2's byte-level mapping sends to `ch` (printable bytes map to themselves, the rest to 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A new byte-level tokenizer (microseconds to build); `save_pretrained` writes it beside an exported model and
    `AutoTokenizer.from_pretrained` reads it back."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  name_or_path=NAME)
    # checked once per build: the ids the module docstring promises are the ones the tiny models are sized for
    assert len(tok) == 259 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    return tok
