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
Weights are written in their own dtype (no upcast), in safetensors shards of at most `max_shard_size` with an index
as transformers writes them (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`; one file
`model.safetensors` when they fit in one): a 70B model is not one 140 GB file, and a shard at a time is copied to
the host when the model is on accelerators.

A format other than stock is loaded as: the model built from the saved config WITHOUT weights (parameters on the
meta device, `accelerate.init_empty_weights`: no random init, no memory), reshaped by the format's builder (the
slot put back, the layers cut to their widths), then the saved weights put in place shard by shard
(`load_state_dict(assign=True)`, read straight onto `device`), every one of which must fit: reloading needs the
weights' memory once, not the 2-3x of a random init plus a copy. A builder that must probe real weights (an older
checkpoint without what it would probe) raises `NeedsWeights` and the model is built with weights as before. A
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

from llm_streamline.stages import atomic_dir, kill_point

STOCK = "stock"
RECORD_FILE = "llm_streamline.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"   # transformers' name: stock from_pretrained reads it too
MAX_SHARD_SIZE = "5GB"


class NeedsWeights(Exception):
    """Raised by a builder that cannot shape a model built without weights (see the module docstring)."""


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
# Files that carry a checkpoint's terms of use: whoever passes the model (or a model derived from it) on must pass
# them on too (Gemma's Terms of Use, section 3.1: a NOTICE file reading "Gemma is provided under and subject to
# the Gemma Terms of Use ..."; Llama's license and use policy; an Apache-2.0 NOTICE).
TERMS_FILES = ("NOTICE", "NOTICE.md", "NOTICE.txt", "LICENSE", "LICENSE.md", "LICENSE.txt", "GEMMA_TERMS.html",
               "USE_POLICY.md")


def copy_terms(sources: list[Path | None], dest: Path) -> list[str]:
    """Copy the terms files (`TERMS_FILES`) of the first source directory holding each into `dest`, without
    replacing one already there. Returns the names copied."""
    import shutil

    copied = []
    for name in TERMS_FILES:
        src = next((d / name for d in sources if d is not None and (d / name).is_file()), None)
        if src is not None and not (dest / name).exists():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def save_weights(model: torch.nn.Module, directory: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> list[str]:
    """The model's weights (tied ones once, each in its own dtype) into `directory` as safetensors shards of at most
    `max_shard_size` (bytes, or "5GB"), split as transformers splits them (huggingface_hub), with the index when
    there are several; each shard's tensors are copied to the host only while it is written. Returns the files."""
    from huggingface_hub import split_torch_state_dict_into_shards

    seen, state = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else (k,)
        if key not in seen:
            seen.add(key)
            state[k] = v
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k].detach().contiguous().cpu() for k in keys}, str(directory / name),
                  metadata={"format": "pt"})
    if split.is_sharded:
        (directory / WEIGHTS_INDEX).write_text(json.dumps({"metadata": split.metadata,
                                                           "weight_map": split.tensor_to_filename}, indent=2))
    return list(split.filename_to_tensors)


def save_checkpoint(model: PreTrainedModel, tokenizer, dest, record: dict, fmt: str = STOCK,
                    fields: dict | None = None, max_shard_size: int | str = MAX_SHARD_SIZE,
                    terms_from: Path | None = None) -> str:
    """Write `model` (and `tokenizer`, if any) to `dest` atomically in format `fmt`, weights in their dtype in
    shards of at most `max_shard_size`; `fields` are what the format's builder needs to rebuild the model (saved in
    its JSON file between the model config and the record); `terms_from`: the source checkpoint's directory, whose
    terms files (NOTICE, license) go with the model (`copy_terms`). Returns `fmt`. A sharded model
    (`model.shard=fsdp`): every rank calls it, the first writes (`models.sharded.save_sharded_weights`)."""
    from llm_streamline.models.devices import is_sharded
    from llm_streamline.models.sharded import save_sharded_weights

    if fmt != STOCK and fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: stock or one of {sorted(FORMATS)}")
    sharded = is_sharded(model)  # every rank calls: each tensor gathered in turn, the first rank writes
    if sharded and torch.distributed.get_rank() != 0:
        save_sharded_weights(model, None, max_shard_size)
        return fmt
    with atomic_dir(dest) as tmp:
        if sharded:
            save_sharded_weights(model, tmp, max_shard_size)
        if fmt == STOCK:
            if sharded:  # the weights are written: the config files save_pretrained puts beside them
                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        else:
            if not sharded:
                save_weights(model, tmp, max_shard_size)
            meta = {"model_config": model.config.to_dict(), **(fields or {}), "record": record}
            (tmp / FORMATS[fmt].meta_file).write_text(json.dumps(meta, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_terms([terms_from], tmp)
        kill_point("save")  # a test kills the process here: the half-written `.tmp-model*` it leaves
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


def load_pruned(path, dtype: torch.dtype | None = torch.float32, device: str = "cpu",
                device_map: str | None = None) -> PreTrainedModel:
    """Load any model this project saved (stock checkpoints too) in `dtype` (None: as saved), on `device` or spread
    over devices by `device_map` (see `place`)."""
    path = Path(path)
    fmt = format_of(path)
    if fmt == STOCK:
        from llm_streamline.models.loading import require_safetensors

        require_safetensors(path)
        kw = {"dtype": dtype if dtype is not None else "auto", "use_safetensors": True}
        if device_map:
            return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **kw).eval()
        return AutoModelForCausalLM.from_pretrained(path, device_map=device, **kw).eval()
    meta = json.loads((path / FORMATS[fmt].meta_file).read_text())
    cfg_dict = dict(meta["model_config"])
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed as usual
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _builder(fmt)(model, meta)
    except NeedsWeights:  # an older checkpoint: its builder probes real weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _builder(fmt)(model, meta)
    # straight onto the one device asked for; spread over several after loading
    target = "cpu" if device_map else device
    return place(load_weights_checked(model, path, dtype, target), device, device_map).eval()


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


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: its index's shards, or the one model.safetensors."""
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        return [path / n for n in names]
    return [path / WEIGHTS_FILE]


def load_weights_checked(model: PreTrainedModel, path: Path, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> PreTrainedModel:
    """Put the weights of `path` (one file or an index's shards) into a model built to the saved shapes, with or
    without weights (meta), shard by shard and in place (`assign=True`: the loaded tensors become the parameters,
    read onto `device` and cast to `dtype`; None: as saved). Every weight must match (tied weights excepted);
    a truncated file, a shape mismatch or a weight left unloaded fails with one line."""
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in weight_files(path):
        try:
            state = load_file(str(file), device=str(device))
        except Exception as e:  # missing, truncated or corrupt file: say so in one line
            raise ValueError(f"{file}: cannot read safetensors ({e})") from e
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        unexpected += [k for k in state if k not in expected]
        try:
            model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
        except RuntimeError as e:
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()  # torch's message: the shapes
            raise ValueError(f"{path}: weights do not match the saved config ({last})") from e
        loaded.update(state)
        del state
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in expected - loaded if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the saved config "
                         f"(missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_empty:
        raise ValueError(f"{path}: no saved weight for {still_empty[:3]}")
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
