"""Save and load pruned models.

`none`, `layer`, `layers`: every slot holds the family's own decoder-layer class, so the pruned model is a
standard checkpoint: stock `AutoModelForCausalLM.from_pretrained(dir)` loads it, no project code, no
trust_remote_code (its config's num_hidden_layers and per-layer arrays already cut to match).

`ffn`, `swiglu`: transformers has no class for a layer list with a foreign module in it. We save
  - `streamline_config.json`: the pruned model's config (with the slot counted as a layer), the slot's
    position and the replacement's recipe; deliberately NOT named config.json, so that stock
    `from_pretrained` fails loudly instead of silently loading a random layer into the slot;
  - `model.safetensors`: every weight, the slot's under its own keys;
  - the tokenizer files.
`llm_streamline.load_pruned(dir)` rebuilds it. (`replace.export_stock()` turns a swiglu slot into an exactly
equivalent standard decoder layer, so the result loads with stock transformers.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llm_streamline.config import ReplacementConfig
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.layers import find_decoder_stack, splice
from llm_streamline.replace import build_replacement, needs_anatomy
from llm_streamline.stages import atomic_dir

STREAMLINE_CONFIG = "streamline_config.json"


def save_pruned(model: PreTrainedModel, tokenizer, dest: Path, replacement: ReplacementConfig,
                slot_start: int, record: dict) -> str:
    """Write the pruned model to `dest` atomically; returns the format written ("stock" or "streamline")."""
    with atomic_dir(dest) as tmp:
        if replacement.type in ("none", "layer", "layers"):
            model.save_pretrained(tmp, safe_serialization=True)
            fmt = "stock"
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            # tied weights appear twice in state_dict; keep one copy (the model re-ties on load)
            seen, unique = {}, {}
            for k, v in state.items():
                key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else (k,)
                if key not in seen:
                    seen[key] = k
                    unique[k] = v
            save_file(unique, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = model.config.to_dict()
            payload = {"model_config": cfg, "slot_start": slot_start,
                       "replacement": {k: getattr(replacement, k) for k in replacement.__dataclass_fields__},
                       "returns_tuple": bool(getattr(find_decoder_stack(model).layers[slot_start],
                                                     "returns_tuple", False)),
                       "record": record}
            (tmp / STREAMLINE_CONFIG).write_text(json.dumps(payload, indent=2, default=str))
            fmt = "streamline"
        tokenizer.save_pretrained(tmp)
        (tmp / "llm_streamline.json").write_text(json.dumps({"format": fmt, **record}, indent=2, default=str))
    return fmt


def place(model: PreTrainedModel, device: str = "cpu", device_map: str | None = None) -> PreTrainedModel:
    """Put a model built here (a replacement slot or per-layer widths, which transformers' own device_map
    loading cannot build) on `device`, or spread it as `device_map` says: a device ("cuda:1") or one of
    accelerate's strategies ("auto", "balanced", "balanced_low_0", "sequential")."""
    if not device_map:
        return model.to(device)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return dispatch_model(model, device_map={"": device_map})
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    return dispatch_model(model, device_map=infer_auto_device_map(model, max_memory=max_memory,
                                                                  no_split_module_classes=no_split))


def load_pruned(path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                device_map: str | None = None) -> PreTrainedModel:
    """Load any model this project saved (stock checkpoints too) in `dtype`, on `device` or spread over
    devices by `device_map` (see `place`)."""
    path = Path(path)
    if (path / "llm_pruner_config.json").exists():  # LLM-Pruner baseline: per-layer widths
        from llm_streamline.baselines.llm_pruner import load

        return place(load(path, dtype=dtype, device="cpu"), device, device_map).eval()
    if (path / "config.json").exists():
        from llm_streamline.models.loading import require_safetensors

        require_safetensors(path)
        if device_map:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                        device_map=device_map).eval()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    meta_file = path / STREAMLINE_CONFIG
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: neither config.json nor {STREAMLINE_CONFIG}; not a saved model")
    meta = json.loads(meta_file.read_text())
    cfg_dict = dict(meta["model_config"])
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stack = find_decoder_stack(model)
    start = meta["slot_start"]
    rep_cfg = ReplacementConfig(**meta["replacement"])
    # which parts the replacement copied: probed on the freshly built layer, any tokens do
    anatomy = anatomy_of(model, start) if needs_anatomy(rep_cfg) else None
    slot = build_replacement(rep_cfg, [stack.layers[start]], stack.config, meta.get("returns_tuple", False),
                             anatomy)
    splice(model, start, slot)
    return place(load_weights_checked(model, path), device, device_map).eval()


def load_weights_checked(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """Load `path/model.safetensors` into a model built to the saved shapes; every weight must match
    (tied weights excepted). A truncated file or a shape mismatch fails with one line."""
    try:
        state = load_file(str(Path(path) / "model.safetensors"))
    except Exception as e:  # truncated / corrupt file: say so in one line
        raise ValueError(f"{Path(path) / 'model.safetensors'}: cannot read safetensors ({e})") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the saved config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path):
    """The checkpoint's tokenizer. A missing or unreadable one is named with its directory (transformers'
    own message names neither the directory nor which file is missing)."""
    d = Path(path)
    if not any((d / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{d}: no tokenizer in the checkpoint directory (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{d}: the tokenizer cannot be loaded: {first}") from e
