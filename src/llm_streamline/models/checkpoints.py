"""The formats of a saved model: writing them, and loading any of them.

  stock       config.json + model.safetensors: every layer is of the family's own class (replacements none,
              layer, layers; the layer-removal baselines). Stock `AutoModelForCausalLM.from_pretrained(dir)` loads
              it, no project code, no trust_remote_code (config's num_hidden_layers and per-layer arrays are cut).
  streamline  streamline_config.json + model.safetensors: a slot transformers has no class for (replacements ffn,
              swiglu). The JSON holds the pruned model's config (the slot counted as a layer), the slot's position
              and the replacement's recipe; deliberately NOT named config.json, so that stock `from_pretrained`
              fails loudly instead of silently loading a random layer into the slot.
  llm_pruner  llm_pruner_config.json + model.safetensors: per-layer widths (the LLM-Pruner baseline); the JSON
              holds the dense model's config and each layer's kept sizes.
Each also holds the tokenizer files and llm_streamline.json ({"format": ..., **the run's record}).

A format other than stock is loaded as: the model built from the saved config, reshaped by the format's builder
(the slot put back, the layers cut to their widths), then the saved weights, every one of which must fit. A
builder knows the method's shapes, so the method registers it (`register_builder`) and models/ imports nothing
above it: `FORMATS` names the module that registers each builder, imported when a checkpoint of that format is
first loaded (so `load_pruned` works in a fresh interpreter).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llm_streamline import faults
from llm_streamline.stages import atomic_dir

STOCK = "stock"
RECORD_FILE = "llm_streamline.json"


@dataclass(frozen=True)
class Format:
    meta_file: str        # the JSON file that marks a checkpoint of this format (config, builder fields, record)
    registered_by: str    # the module whose import registers the format's builder


FORMATS = {
    "streamline": Format("streamline_config.json", "llm_streamline.replace"),
    "llm_pruner": Format("llm_pruner_config.json", "llm_streamline.baselines.llm_pruner"),
}
STREAMLINE_CONFIG = FORMATS["streamline"].meta_file

# builder(model, meta): reshape `model`, freshly built from the saved config, in place into the saved architecture;
# `meta` is the format's JSON file (model_config, the fields given at saving, record)
Builder = Callable[[PreTrainedModel, dict], None]
_BUILDERS: dict[str, Builder] = {}


def register_builder(fmt: str, build: Builder) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: add it to models.checkpoints.FORMATS")
    _BUILDERS[fmt] = build


def _builder(fmt: str) -> Builder:
    if fmt not in _BUILDERS:
        importlib.import_module(FORMATS[fmt].registered_by)  # registers it
    return _BUILDERS[fmt]


# ------------------------------------------------------------------------------------------------ saving
def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU with tied weights once (the first key; the model re-ties them on load)."""
    seen, unique = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else (k,)
        if key not in seen:
            seen.add(key)
            unique[k] = v.detach().contiguous().cpu()
    return unique


def save_checkpoint(model: PreTrainedModel, tokenizer, dest, record: dict, fmt: str = STOCK,
                    fields: dict | None = None) -> str:
    """Write `model` (and `tokenizer`, if any) to `dest` atomically in format `fmt`; `fields` are what the format's
    builder needs to rebuild the model (saved in its JSON file between the model config and the record).
    Returns `fmt`."""
    if fmt != STOCK and fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: stock or one of {sorted(FORMATS)}")
    with atomic_dir(dest) as tmp:
        if fmt == STOCK:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_file(unique_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            meta = {"model_config": model.config.to_dict(), **(fields or {}), "record": record}
            (tmp / FORMATS[fmt].meta_file).write_text(json.dumps(meta, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        faults.kill_point("save")  # a test kills the process here: the half-written `.tmp-model*` it leaves
        (tmp / RECORD_FILE).write_text(json.dumps({"format": fmt, **record}, indent=2, default=str))
    return fmt


# ------------------------------------------------------------------------------------------------ loading
def format_of(path) -> str:
    """A directory holding a format's own JSON file is of that format; otherwise config.json makes it stock."""
    path = Path(path)
    fmt = next((name for name, f in FORMATS.items() if (path / f.meta_file).exists()), None)
    if fmt is None and (path / "config.json").exists():
        fmt = STOCK
    if fmt is None:
        files = ", ".join(["config.json", *(f.meta_file for f in FORMATS.values())])
        raise FileNotFoundError(f"{path}: not a saved model (none of {files})")
    return fmt


def load_pruned(path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                device_map: str | None = None) -> PreTrainedModel:
    """Load any model this project saved (stock checkpoints too) in `dtype`, on `device` or spread over
    devices by `device_map` (see `place`)."""
    path = Path(path)
    fmt = format_of(path)
    if fmt == STOCK:
        from llm_streamline.models.loading import require_safetensors

        require_safetensors(path)
        if device_map:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                        device_map=device_map).eval()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    meta = json.loads((path / FORMATS[fmt].meta_file).read_text())
    cfg_dict = dict(meta["model_config"])
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _builder(fmt)(model, meta)
    return place(load_weights_checked(model, path), device, device_map).eval()


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
