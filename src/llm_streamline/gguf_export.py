"""A stock-layout pruned model as one GGUF file (llama.cpp / Ollama), fp32 or fp16, with the `gguf` package.

Names and metadata follow what readers expect, taken from the readers themselves rather than restated:
tensor names from gguf-py's own HF -> GGUF name map (`gguf.get_tensor_name_map`, the map transformers'
`modeling_gguf_pytorch_utils.get_gguf_hf_weights_map` reads back with), metadata keys from transformers'
`integrations/ggml.py` GGUF_CONFIG_MAPPING["llama"]. Llama's q/k projections are stored in llama.cpp's
rotary layout (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py), which transformers'
LlamaTensorProcessor reverses on load. 1-D tensors (norms) stay fp32, as llama.cpp's converter keeps them.
The tokenizer (a GPT-2-style byte-level BPE, e.g. SmolLM2's) goes in as tokenizer.ggml.* (gguf.vocab).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

# architectures whose layer maps one-to-one onto a gguf-py architecture without extra tensors; the value
# says whether q/k are stored in llama.cpp's rotary layout
SUPPORTED = {"llama": True}


class GGUFExportError(ValueError):
    """A model this exporter cannot write exactly: one line saying why."""


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout (convert_hf_to_gguf.py, LlamaModel.permute): per head, the two rotary
    halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_supported(config) -> None:
    if config.model_type not in SUPPORTED:
        raise GGUFExportError(f"format=gguf: model_type {config.model_type!r} is not supported yet "
                              f"(supported: {sorted(SUPPORTED)})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"format=gguf: rope_type {rope['rope_type']!r} is not written yet (default only)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("format=gguf: attention/MLP biases are not written yet")


def _add_metadata(writer, config, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf
    from gguf.vocab import BpeVocab

    try:
        vocab = BpeVocab(Path(tokenizer_dir))
    except FileNotFoundError as e:
        raise GGUFExportError(f"format=gguf: {tokenizer_dir}: only GPT-2-style BPE tokenizers are written ({e})") from e
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_gguf(model: PreTrainedModel, tokenizer_dir: Path, dest: Path, name: str | None = None) -> Path:
    """Write `model` (stock layout; its parameters' dtype, fp32 or fp16) and the tokenizer in
    `tokenizer_dir` to the GGUF file `dest`."""
    import gguf

    config = model.config
    _check_supported(config)
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16):
        raise GGUFExportError(f"format=gguf: {dtype} weights; export float32 or float16")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config.model_type)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[arch])
    _add_metadata(writer, config, name or Path(dest).stem)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, tokenizer_dir, config.vocab_size)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the reader ties the head when output.weight is absent
    kv_heads = config.num_key_value_heads
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise GGUFExportError(f"format=gguf: no GGUF name for {hf_name}")
        data = tensor.detach().cpu().numpy()
        if SUPPORTED[config.model_type] and base.endswith("self_attn.q_proj"):
            data = _permute_qk(data, config.num_attention_heads)
        elif SUPPORTED[config.model_type] and base.endswith("self_attn.k_proj"):
            data = _permute_qk(data, kv_heads)
        if data.ndim == 1:
            data = data.astype(np.float32)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dest)
