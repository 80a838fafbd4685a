"""Checks that need the machine or the model's config (never its weights), run before the model loads:
the device exists, the token lengths fit the model's positions, the layers removed leave some. Raise ConfigError
with one line. The block's size (`resolve_block_size`, `check_start`) is decided here, from the model's structure,
for these checks and for the recipes alike; `meta_model` builds the model without weights (the plan prices it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from llm_streamline import stages
from llm_streamline.config import ConfigError, ModelConfig, RunConfig
from llm_streamline.models.layers import count_params
from llm_streamline.precision import torch_dtype
from llm_streamline.replace import replacement_param_count

log = logging.getLogger("llm_streamline")

SPEED_DECODE_TOKENS = 32  # tokens the speed measurement decodes after its `eval.speed_tokens` prompt


def check_device(m: ModelConfig) -> None:
    if m.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={m.device}: CUDA is not available on this machine (use model.device=cpu)")


# config.json (architecture only, never weights) of the GPU presets and the embedded model, shipped in the package so
# that the plan and these checks work offline: <hub id with "/" as "--">/config.json
PACKAGED_CONFIGS = Path(__file__).parent / "models" / "configs"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default embedded model (models/loading.py EMBEDDED)


def packaged_config_dir(hub_id: str | None) -> Path | None:
    """The packaged config folder of a hub id (e.g. meta-llama/Llama-2-7b-hf), or None."""
    if not hub_id:
        return None
    d = PACKAGED_CONFIGS / hub_id.replace("/", "--")
    return d if (d / "config.json").is_file() else None


def model_config(m: ModelConfig) -> PretrainedConfig | None:
    """The model's config (config.json only, no weights): a GPU preset's from the package (no network, no token
    for gated repos), the embedded model's from its converted checkpoint or else the package."""
    if m.source == "tiny":
        from llm_streamline.models.loading import TINY_CONFIGS

        model_type, kwargs = TINY_CONFIGS[m.family]
        return AutoConfig.for_model(model_type, **{**kwargs, **dict(m.tiny)})
    if m.source == "embedded":
        from llm_streamline.models.loading import embedded_path, embedded_spec

        path = embedded_path(m.name_or_path)
        return AutoConfig.from_pretrained(str(path if (path / "config.json").exists() else
                                              packaged_config_dir(embedded_spec(m.name_or_path).hub_id)))
    if m.source == "local" and not Path(m.name_or_path).is_dir():
        raise ConfigError(f"model.name_or_path={m.name_or_path}: no such directory (model.source=local)")
    # a path, not a hub id (<org>/<name>): the hub client would answer "Repo id must be in the form ..."
    looks_like_path = m.name_or_path.startswith(("/", "./", "../", "~")) or Path(m.name_or_path).exists()
    if m.source == "hub" and looks_like_path and not Path(m.name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path={m.name_or_path}: no such directory (a hub id is <org>/<name>)")
    packaged = packaged_config_dir(m.name_or_path) if m.source == "hub" and not m.revision else None
    if packaged is not None:
        return AutoConfig.from_pretrained(str(packaged))
    kwargs = {"revision": m.revision} if m.revision else {}
    try:
        return AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:  # missing, offline, or a config.json that is not valid JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name_or_path={m.name_or_path}: cannot read its config.json ({first})") from e


def check_positions(cfg: RunConfig, config: PretrainedConfig | None) -> None:
    positions = getattr(config, "max_position_embeddings", None)  # attribute_map covers n_positions & co
    if not positions:
        return
    if cfg.data.seq_len > positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: the model has {positions} positions")
    need = cfg.eval.speed_tokens + SPEED_DECODE_TOKENS
    if cfg.eval.speed and need > positions:
        raise ConfigError(f"eval.speed_tokens={cfg.eval.speed_tokens} + {SPEED_DECODE_TOKENS} decoded tokens: "
                          f"the model has {positions} positions")


def check_layers(cfg: RunConfig, config: PretrainedConfig | None) -> None:
    """``sparsity.layers`` must leave at least one layer (``count=net`` removes more, checked after loading)."""
    total = getattr(config, "num_hidden_layers", None)
    if total and cfg.sparsity.layers is not None and cfg.sparsity.layers >= total:
        raise ConfigError(f"sparsity.layers={cfg.sparsity.layers}: model {cfg.model.name} has only {total} layers")


def meta_model(cfg: RunConfig) -> nn.Module:
    """The model built from its config on the meta device: shapes only, no weights read, no memory taken."""
    from transformers import AutoModelForCausalLM

    config = model_config(cfg.model)
    if config is None:
        raise ConfigError(f"model {cfg.model.name}: no config.json to plan from")
    if cfg.model.source == "tiny" and "vocab_size" not in cfg.model.tiny:
        # a tiny model's vocabulary is its tokenizer's (models.loading.tiny_preset)
        from llm_streamline.models.tiny_tokenizer import tiny_tokenizer

        config.vocab_size = len(tiny_tokenizer())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.model.dtype, cfg.model.device),
                                                trust_remote_code=cfg.model.trust_remote_code)


def skeleton(cfg: RunConfig, config: PretrainedConfig | None):
    """The model's modules without its weights, to size the block from: `meta_model` (the meta device, no
    memory); a tiny model is built for real (kilobytes), as `load_model` builds it. None when it cannot be built
    this way (a remote-code model, an architecture that needs more than its config): the checks then run after
    loading."""
    m = cfg.model
    if config is None or m.trust_remote_code:
        return None
    try:
        if m.source != "tiny":
            return meta_model(cfg)
        from llm_streamline.models.loading import tiny_preset

        return tiny_preset(m)[0]
    except Exception:  # checked after loading instead
        return None


def resolve_block_size(cfg: RunConfig, model, stack, extra: int | None = None) -> int:
    """n from `sparsity.layers` (plus the replacement's size in layers, rounded, with `sparsity.count=net`), or
    the n whose net parameter reduction is closest to `sparsity.target`. `extra`: the replacement's parameters
    when already counted (`replace.replacement_param_count`: the plan has them)."""
    L = stack.num_layers
    s, r = cfg.sparsity, cfg.replacement
    min_n = r.num_layers if r.type == "layers" else 1
    layer_params = count_params(stack.layers[0])
    extra = replacement_param_count(r, model) if extra is None else extra
    if s.layers is not None:
        n = s.layers + (int(extra / layer_params + 0.5) if s.count == "net" else 0)
        if n >= L:
            raise ConfigError(f"sparsity.layers={s.layers} ({n} removed): the model has only {L} layers")
        if n < min_n:
            raise ConfigError(f"sparsity.layers={s.layers} is less than replacement.num_layers={min_n}")
        if n * layer_params - extra <= 0:
            raise ConfigError(f"sparsity.layers={s.layers}: {n} layer(s) replaced by replacement={r.type} "
                              f"({extra:,} parameters) remove {n * layer_params - extra:,} parameters net; remove "
                              "more layers or use a smaller replacement")
        return n
    denom = count_params(model) if s.basis == "all" else L * layer_params
    best = min(range(min_n, L), key=lambda n: abs((n * layer_params - extra) / denom - s.target))
    log.info("sparsity.target=%.3f (%s params) -> n=%d layers (net %.4f)", s.target, s.basis, best,
             (best * layer_params - extra) / denom)
    if best * layer_params - extra <= 0:  # e.g. one layer replaced by one trained layer: nothing removed net
        raise ConfigError(f"sparsity.target={s.target}: the closest block, {best} layer(s) replaced by "
                          f"replacement={r.type} ({extra:,} parameters), removes {best * layer_params - extra:,} "
                          "parameters net; raise sparsity.target or use a smaller replacement")
    return best


def check_start(cfg: RunConfig, n: int, num_layers: int) -> None:
    """`sparsity.start`, if given, must start a block of n layers inside the model."""
    start = cfg.sparsity.start
    if start is not None and not 0 <= start <= num_layers - n:
        raise ConfigError(f"sparsity.start={start}: a block of {n} layers must start in [0, {num_layers - n}]")


def run_block_size(cfg: RunConfig, model, extra: int | None = None) -> int:
    """The n the run's recipe will remove, from the model's structure alone: a baseline is sized as the row it is
    matched to (`method.match_replacement`), LLM-Streamline with its replacement (`extra` parameters if given)."""
    from dataclasses import replace

    from llm_streamline.config import ReplacementConfig
    from llm_streamline.models.layers import find_decoder_stack
    if cfg.method.name != "streamline":
        cfg, extra = replace(cfg, replacement=ReplacementConfig(type=cfg.method.match_replacement or "none")), None
    return resolve_block_size(cfg, model, find_decoder_stack(model), extra)


def check_block(cfg: RunConfig, model) -> None:
    """The block the run would remove: its size n (`sparsity.layers` or `target`; `resolve_block_size` refuses
    one that removes nothing net) and `sparsity.start` in [0, L - n]."""
    from llm_streamline.models.layers import find_decoder_stack

    check_start(cfg, run_block_size(cfg, model), find_decoder_stack(model).num_layers)


def check_hub_text(cfg: RunConfig) -> None:
    """The reported perplexity's hub text (wikitext2, c4) is read from the hub on every run: without network
    access the run is refused now, not after the dense model's evaluation."""
    if cfg.eval.perplexity and cfg.eval.perplexity_text != "heldout":
        from llm_streamline.data import hub

        hub.preflight(f"eval.perplexity_text={cfg.eval.perplexity_text}")


def check_run(cfg: RunConfig) -> None:
    stages.cache_dir()  # every run caches its corpus and token ids there: a cache root that is a file, in one line
    check_device(cfg.model)
    check_hub_text(cfg)
    config = model_config(cfg.model)
    check_positions(cfg, config)
    check_layers(cfg, config)
    model = skeleton(cfg, config)
    if model is not None:
        check_block(cfg, model)
