"""Sharded weights under torchrun (`model.shard=fsdp`): a model whose bf16 replica does not fit one card (70B on
8 x 80 GB) held as torch's FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer and the root (the
embeddings, final norm and head) are sharded on dim 0 over the ranks; a forward all-gathers one layer at a time
and frees it after (the root's stay gathered between forwards, FSDP2's default), a backward reduce-scatters the
gradients of what trains.

Loading (`load_sharded`): the model is built on the meta device (buffers such as rotary frequencies computed for
real, they are small and in no checkpoint), wrapped, materialised empty, and each rank reads ONLY its own rows of
each parameter from the safetensors files (`safe_open(...).get_slice(name)[a:b]`): no rank ever holds a whole
tensor, let alone the whole model. torch.distributed.checkpoint's `set_model_state_dict(..., broadcast_from_rank0)`
was the other way: it needs the full state dict on rank 0 (131 GiB for 70B in bf16, in host RAM), so not here.

What must hold while a model is sharded: every forward is a collective, so every rank runs the same layers in the
same order the same number of times (`parallel.shares(..., lockstep=True)`: a rank short of batches runs a
repeated one and drops its result); a forward stopped early by an exception (`layers.run_layers`) resets
FSDP's iteration state on every rank alike (`models.devices.after_stopped_forward`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llm_streamline.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards of a sharded model (FSDP's padding excluded), everything of
    a replicated one."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def checkpoint_dir(cfg: ModelConfig) -> Path:
    """The local directory of the safetensors checkpoint `cfg` names (a hub id: its snapshot, fetched once)."""
    if cfg.source == "tiny":
        raise ConfigError("model.shard=fsdp loads each rank's rows from safetensors files; model.source=tiny has "
                          "none (save it with save_pretrained and use model.source=local)")
    if cfg.source == "embedded":
        from llm_streamline.models.loading import embedded_dir

        return embedded_dir(cfg.name_or_path)
    path = Path(str(cfg.name_or_path)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or an index over several)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    if not out:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (model.shard=fsdp reads safetensors only)")
    return out


def save_sharded_weights(model: nn.Module, directory: Path | None, max_shard_size: int | str) -> list[str]:
    """A sharded model's weights (tied ones once) as safetensors files of at most `max_shard_size` with their index,
    named as transformers names them. Every rank calls it: each sharded tensor is gathered whole in turn (a
    collective; one tensor on the card at a time), and the rank given a `directory` (the main one) brings one
    file's tensors to the host at a time and writes them; the others pass None. Returns the files."""
    from huggingface_hub import constants
    from huggingface_hub.serialization._base import parse_size_to_int
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    seen, state = set(), {}
    for k, v in model.state_dict().items():  # the same order on every rank
        if id(v) not in seen:
            seen.add(id(v))
            state[k] = v
    groups, size = [[]], 0  # consecutive tensors up to the limit (a larger one alone), as the files will hold them
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, keys in zip(names, groups):
        tensors = {}
        for k in keys:
            v = state[k].detach()
            whole = v.full_tensor() if isinstance(v, DTensor) else v
            if directory is not None:
                tensors[k] = whole.contiguous().cpu()
            del whole
        if directory is not None:
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
    if directory is not None and len(groups) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        (directory / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer beside the checkpoint `cfg` names (a pad token set where it has none, as `load_model` does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint_dir(cfg)), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[a, b): the rows of a dim-0 length `rows` that FSDP2 gives `rank` of `world` (torch.chunk's split: ceil(rows
    / world) each, the last ranks fewer or none)."""
    chunk = -(-rows // world)
    a = min(rank * chunk, rows)
    return a, min(a + chunk, rows)


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2 over `model`: each decoder layer a unit of its own, the root (embeddings, final norm, head) the last."""
    from torch.distributed.fsdp import fully_shard

    from llm_streamline.models.layers import find_decoder_stack

    for layer in find_decoder_stack(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _meta_model(cfg: ModelConfig, directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, dict]:
    """The model of `directory`'s config with its parameters on the meta device, and its buffers (rotary
    frequencies: small, in no checkpoint) computed for real, by name."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model, {name: b.clone() for name, b in model.named_buffers()}


@torch.no_grad()
def load_layers(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                indices: list[int]) -> list[nn.Module]:
    """Decoder layers `indices` of the checkpoint `cfg` names as plain modules (not sharded), read whole on this rank:
    a replicated copy of the block a `layer` replacement starts from, where the sharded model's own layers cannot be
    deep-copied (their parameters are shards)."""
    from safetensors import safe_open

    from llm_streamline.models.layers import find_decoder_stack

    directory = checkpoint_dir(cfg)
    model, buffers = _meta_model(cfg, directory, dtype)
    layers = find_decoder_stack(model).layers
    prefix = next(name for name, m in model.named_modules() if m is layers)
    files = _tensor_files(directory)
    out = []
    for i in indices:
        layer = layers[i].to_empty(device=device)
        for name, b in layer.named_buffers():
            b.copy_(buffers[f"{prefix}.{i}.{name}"])
        for name, p in layer.named_parameters():
            key = f"{prefix}.{i}.{name}"
            if key not in files:
                raise ConfigError(f"model.shard=fsdp: {key} is not in {directory}'s safetensors files")
            with safe_open(str(files[key]), "pt", device="cpu") as h:
                p.copy_(h.get_tensor(key).to(dtype))
        out.append(layer.eval())
    return out


@torch.no_grad()
def load_sharded(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, world: int,
                 rank: int) -> PreTrainedModel:
    """The model `cfg` names, sharded over the `world` ranks of the default process group, each rank reading only
    its rows of each parameter (see the module's docstring)."""
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    directory = checkpoint_dir(cfg)
    device = torch.device(device)
    model, buffers = _meta_model(cfg, directory, dtype)
    mesh = init_device_mesh(device.type, (world,))
    shard_model(model, mesh)
    model.to_empty(device=device)  # this rank's shards only, uninitialised: every row is read below
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    files = _tensor_files(directory)
    handles: dict[Path, object] = {}
    try:
        for name, p in model.named_parameters():  # tied weights once (named_parameters skips the second name)
            if name not in files:
                raise ConfigError(f"model.shard=fsdp: {name} is not in {directory}'s safetensors files (a "
                                  "checkpoint whose tensor names transformers converts on load cannot be read "
                                  "sharded); use model.shard=none")
            if files[name] not in handles:
                handles[files[name]] = safe_open(str(files[name]), "pt", device="cpu")
            local = p.to_local() if isinstance(p, DTensor) else p
            a, b = shard_rows(p.shape[0], world, rank) if isinstance(p, DTensor) else (0, p.shape[0])
            if local.shape[0] != b - a:
                raise RuntimeError(f"{name}: FSDP gave rank {rank} {local.shape[0]} rows, expected {b - a}")
            if b > a:
                local.copy_(handles[files[name]].get_slice(name)[a:b].to(dtype))
    finally:
        handles.clear()
    model.eval()
    log.info("model sharded over %d ranks (FSDP2): %.1f MiB of parameters on rank %d", world,
             local_param_bytes(model) / 2**20, rank)
    return model
