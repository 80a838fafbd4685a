"""Replacement networks that stand in for a pruned block of decoder layers.

Every replacement is called exactly like the decoder layer whose slot it takes: the model's loop passes
(hidden_states, attention_mask=..., position_embeddings=..., ...) and expects the same kind of output the
family's layers return. FFN-type replacements ignore the attention arguments; decoder-layer replacements
are the family's own class, so they use them (causal mask, rotary embeddings, sliding window, KV cache).

Types:
  none    plain pruning, nothing in the slot
  ffn     Linear(d, w) -> act -> Linear(w, d), optionally residual (y = x + f(x)); the residual variant's
          output layer starts at zero, so training starts from plain pruning and can only improve on it.
          `pre_norm`: f reads norm(x), a copy of the first pruned layer's pre-MLP norm (the model's own
          class), found by probing the layer (`models.anatomy`): the un-normalised residual stream carries a few
          tokens with massive activations that would otherwise dominate what f sees
  swiglu  pre-norm MLP initialised from the first pruned layer: y = x + [post_norm](mlp(norm(x))), the layer's
          pre-MLP norm, MLP and post-MLP norm (Gemma) as its anatomy finds them; for families whose MLP is
          SwiGLU (Llama, Mistral, Qwen, Gemma, Phi-3) it is a SwiGLU; for OPT and GPT-NeoX it is their own
          (ReLU/GELU) MLP, copied the same way
  layer   one decoder layer of the model's own class, initialised from the first pruned layer
  layers  k decoder layers, initialised from the first k pruned layers
  linear        ReplaceMe: nothing in the slot; a d x d map fused into the previous layer's MLP output map
                (`linear_map`), so the checkpoint is stock with plain pruning's parameter count
  linear_patch  LinearPatch: y = x P, one d x d matrix (`PatchReplacement`), set by `linear_map`
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch
from torch import nn
from transformers.cache_utils import Cache

from llm_streamline.config import ConfigError, ReplacementConfig
from llm_streamline.models.anatomy import Anatomy, anatomy_of
from llm_streamline.models.checkpoints import NeedsWeights, register_builder
from llm_streamline.models.devices import input_device
from llm_streamline.models.layers import count_params, find_decoder_stack, run_layers, splice

# Attributes some model loops read from the layer object itself (older families index masks by them).
_LAYER_ATTRS = ("attention_type", "is_sliding", "sliding_window", "layer_type")
_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "gelu_new": lambda: nn.GELU(approximate="tanh")}


class _SlotMixin:
    """Makes a module callable like a decoder layer: extra positional/keyword arguments are accepted, and the
    KV cache keeps its length through the slot."""

    returns_tuple: bool = False
    layer_idx: int = 0  # the slot's index in the layer list (renumbered with the others after pruning)

    def _wrap(self, y: torch.Tensor):
        return (y,) if self.returns_tuple else y

    def _keep_cache_length(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """An MLP has no keys or values, but transformers reads the cached length from one layer (the first:
        `Cache.get_seq_length(layer_idx=0)`, the masks' sizes too), so the slot's cache layer would stay
        empty and a slot at layer 0 would break cached generation. It gets a placeholder instead: one head of
        width 1 per token (B x T floats), growing with the sequence exactly as an attention layer's entry."""
        # found by type: the keyword differs by family and version (cache, past_key_values, layer_past)
        cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)


class FFNReplacement(nn.Module, _SlotMixin):
    def __init__(self, hidden_size: int, width: int, activation: str = "silu", residual: bool = True,
                 norm: nn.Module | None = None):
        super().__init__()
        self.residual = residual
        self.norm = norm if norm is not None else nn.Identity()
        self.fc_in = nn.Linear(hidden_size, width)
        self.act = _ACTIVATIONS[activation]()
        self.fc_out = nn.Linear(width, hidden_size)
        if residual:  # start as the identity = plain pruning
            nn.init.zeros_(self.fc_out.weight)
            nn.init.zeros_(self.fc_out.bias)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._keep_cache_length(hidden_states, kwargs)
        y = self.fc_out(self.act(self.fc_in(self.norm(hidden_states))))
        return self._wrap(hidden_states + y if self.residual else y)


class PatchReplacement(nn.Module, _SlotMixin):
    """y = x P with one d x d matrix (LinearPatch); the identity (= plain pruning) until `linear_map` sets P."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(hidden_size))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._keep_cache_length(hidden_states, kwargs)
        return self._wrap(hidden_states @ self.weight)


class _TwoLayerMLP(nn.Module):
    """The MLP of families that keep fc1/fc2 on the layer itself (OPT)."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MLPReplacement(nn.Module, _SlotMixin):
    """y = x + post_norm(mlp(norm(x))), every part copied from the first pruned layer."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, post_norm: nn.Module | None = None):
        super().__init__()
        self.norm, self.mlp = norm, mlp
        self.post_norm = post_norm if post_norm is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._keep_cache_length(hidden_states, kwargs)
        return self._wrap(hidden_states + self.post_norm(self.mlp(self.norm(hidden_states))))


def mlp_from_layer(layer: nn.Module, anatomy: Anatomy) -> MLPReplacement:
    """Copies of the layer's pre-MLP norm, MLP and post-MLP norm (if any), where `anatomy` found them."""
    norm = copy.deepcopy(layer.get_submodule(anatomy.mlp_norm))
    parts = [copy.deepcopy(layer.get_submodule(p)) for p in anatomy.mlp]
    if len(parts) == 1:
        mlp = parts[0]
    elif len(parts) == 3:  # map, activation, map on the layer itself (OPT)
        mlp = _TwoLayerMLP(*parts)
    else:
        raise ValueError(f"{type(layer).__name__}: no MLP to copy (its parts in call order: {anatomy.mlp})")
    post = copy.deepcopy(layer.get_submodule(anatomy.mlp_post_norm)) if anatomy.mlp_post_norm else None
    return MLPReplacement(norm, mlp, post)


def needs_anatomy(cfg: ReplacementConfig) -> bool:
    """Whether building this replacement needs to know where the layer's parts are (`models.anatomy`)."""
    return cfg.type == "swiglu" or (cfg.type == "ffn" and cfg.pre_norm)


def mlp_width(config) -> int:
    for k in ("intermediate_size", "ffn_dim", "n_inner"):
        if getattr(config, k, None):
            return int(getattr(config, k))
    return 4 * config.hidden_size


def _copy_layer_attrs(src: nn.Module, dst: nn.Module) -> None:
    for a in _LAYER_ATTRS:
        if hasattr(src, a) and not hasattr(dst, a):
            setattr(dst, a, getattr(src, a))


def build_replacement(cfg: ReplacementConfig, pruned_layers: list[nn.Module], config,
                      returns_tuple: bool = False, anatomy: Anatomy | None = None) -> list[nn.Module]:
    """Modules that take the block's slot (empty for `none`). `pruned_layers` are the removed layers in order;
    `anatomy` (`models.anatomy.anatomy_of`, needed when `needs_anatomy`) says where their parts are."""
    if needs_anatomy(cfg) and anatomy is None:
        raise ValueError(f"replacement {cfg.type} (pre_norm={cfg.pre_norm}) copies parts of the pruned layer: "
                         "pass its anatomy (models.anatomy.anatomy_of)")
    if cfg.type in ("none", "linear"):  # linear: the map is fused into a kept layer (`linear_map`)
        return []
    first = pruned_layers[0]
    if cfg.type in ("layer", "layers"):
        k = 1 if cfg.type == "layer" else cfg.num_layers
        if k > len(pruned_layers):
            raise ConfigError(f"replacement.num_layers={k} is more than the {len(pruned_layers)} layers pruned")
        mods = [copy.deepcopy(pruned_layers[j]) for j in range(k)]
        for m in mods:
            m.requires_grad_(True)
        return mods
    if cfg.type == "ffn":
        norm = copy.deepcopy(first.get_submodule(anatomy.mlp_norm)) if cfg.pre_norm else None
        module = FFNReplacement(config.hidden_size, cfg.hidden_size or mlp_width(config), cfg.activation,
                                cfg.residual, norm)
    elif cfg.type == "swiglu":
        module = mlp_from_layer(first, anatomy)
    elif cfg.type == "linear_patch":
        module = PatchReplacement(config.hidden_size)
    else:
        raise ValueError(f"unknown replacement type {cfg.type!r}")
    p = next(first.parameters())
    module = module.to(device=p.device, dtype=p.dtype)
    module.returns_tuple = returns_tuple
    module.layer_idx = next((m.layer_idx for m in first.modules() if isinstance(getattr(m, "layer_idx", None), int)), 0)
    _copy_layer_attrs(first, module)
    module.requires_grad_(True)
    return [module]


def slot_checkpoint(cfg: ReplacementConfig, model: nn.Module, slot_start: int) -> tuple[str, dict]:
    """The checkpoint format of a pruned model with this replacement (`models.checkpoints`) and the fields its
    builder needs: stock when every slot is a decoder layer of the family's class, else the streamline format
    (the slot's position and the replacement's recipe)."""
    if cfg.type in ("none", "layer", "layers", "linear"):
        return "stock", {}
    stack = find_decoder_stack(model)
    slot = stack.layers[slot_start]
    fields = {"slot_start": slot_start, "replacement": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "returns_tuple": bool(getattr(slot, "returns_tuple", False))}
    if needs_anatomy(cfg):  # kept, so that the builder needs no weights to probe (any decoder layer but the slot)
        other = next(i for i in range(stack.num_layers) if i != slot_start)
        fields["anatomy"] = asdict(anatomy_of(model, other))
    return "streamline", fields


def rebuild_slot(model: nn.Module, meta: dict) -> None:
    """The streamline format's builder: in a model built from the saved (pruned) config, the replacement
    back in its slot, built from its recipe (the weights are loaded afterwards)."""
    stack = find_decoder_stack(model)
    start = meta["slot_start"]
    cfg = ReplacementConfig(**meta["replacement"])
    # which parts the replacement copied: saved with the checkpoint; an older one has it probed on the freshly
    # built layer (any tokens do), which needs weights
    anatomy = None
    if needs_anatomy(cfg):
        if meta.get("anatomy") is not None:
            anatomy = Anatomy(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["anatomy"].items()})
        elif next(model.parameters()).is_meta:
            raise NeedsWeights("the checkpoint holds no anatomy: probed on a model with weights")
        else:
            anatomy = anatomy_of(model, start)
    splice(model, start, build_replacement(cfg, [stack.layers[start]], stack.config, meta.get("returns_tuple", False),
                                           anatomy))


register_builder("streamline", rebuild_slot)


def replacement_param_count(cfg: ReplacementConfig, model: nn.Module) -> int:
    """Parameters a replacement of `model`'s layers adds, without building it (used to pick n from a target)."""
    stack = find_decoder_stack(model)
    layer = stack.layers[0]
    layer_params = count_params(layer)
    if cfg.type in ("none", "linear"):
        return 0
    if cfg.type == "linear_patch":
        return stack.config.hidden_size ** 2
    if cfg.type == "layer":
        return layer_params
    if cfg.type == "layers":
        return cfg.num_layers * layer_params
    anatomy = anatomy_of(model, 0) if needs_anatomy(cfg) else None
    if cfg.type == "ffn":
        d, w = stack.config.hidden_size, cfg.hidden_size or mlp_width(stack.config)
        norm = count_params(layer.get_submodule(anatomy.mlp_norm)) if cfg.pre_norm else 0
        return 2 * d * w + w + d + norm
    parts = [anatomy.mlp_norm, *anatomy.mlp, *([anatomy.mlp_post_norm] if anatomy.mlp_post_norm else [])]
    return sum(count_params(layer.get_submodule(p)) for p in parts)


def export_stock(model: nn.Module, slot_start: int, reference_layer: nn.Module) -> nn.Module:
    """Replace a swiglu slot by an equivalent decoder layer of the family's class, in place, so that stock
    transformers loads the model.

    The layer is a copy of `reference_layer` (a decoder layer of this model's class) whose attention output map is
    zero, so its attention adds nothing, and whose pre-MLP norm, MLP and post-MLP norm are the slot's (found by the
    layer's anatomy). That is exact for pre-norm layers computed as h = x + attn(..); y = h + [post](mlp(norm(h)))
    (or x + attn(..) + mlp(..) in parallel): it is checked by running both on the slot's input, and a layer for
    which it does not hold fails with one line."""
    stack = find_decoder_stack(model)
    slot = stack.layers[slot_start]
    if not isinstance(slot, MLPReplacement):
        raise ValueError(f"layer {slot_start} is a {type(slot).__name__}: export_stock handles swiglu slots only")
    like = next((i for i, m in enumerate(stack.layers) if type(m) is type(reference_layer)), None)
    if like is None:
        raise ValueError(f"{type(reference_layer).__name__} is not the class of this model's decoder layers")
    anatomy = anatomy_of(model, like)
    layer = copy.deepcopy(reference_layer)
    out = layer.get_submodule(anatomy.attention_output)
    with torch.no_grad():
        out.weight.zero_()
        if getattr(out, "bias", None) is not None:
            out.bias.zero_()
    parts = [layer.get_submodule(p) for p in anatomy.mlp]
    if len(parts) == 1:
        parts[0].load_state_dict(slot.mlp.state_dict())
    else:  # map, activation, map on the layer itself (OPT), as `mlp_from_layer` copied them
        parts[0].load_state_dict(slot.mlp.fc1.state_dict())
        parts[-1].load_state_dict(slot.mlp.fc2.state_dict())
    layer.get_submodule(anatomy.mlp_norm).load_state_dict(slot.norm.state_dict())
    if anatomy.mlp_post_norm:
        layer.get_submodule(anatomy.mlp_post_norm).load_state_dict(slot.post_norm.state_dict())
    _check_same_output(model, slot_start, slot, layer)
    splice(model, slot_start, [layer])
    return model


@torch.no_grad()
def _check_same_output(model: nn.Module, index: int, slot: nn.Module, layer: nn.Module) -> None:
    stack = find_decoder_stack(model)
    device = input_device(model)
    ids = (torch.arange(16, device=device) * 7919 % stack.config.vocab_size).unsqueeze(0)
    cap = run_layers(model, ids, inputs_at=(index,), kwargs_at=(index,), stack=stack)
    x, kwargs = cap.inputs[index], cap.call_kwargs[index]
    want, got = slot(x, **kwargs), layer(x, **kwargs)
    want, got = (want[0] if isinstance(want, tuple) else want), (got[0] if isinstance(got, tuple) else got)
    got = got.to(want.device)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise ValueError(f"{type(layer).__name__}: no exact stock layer for this slot (with its attention silenced "
                         f"the layer differs from the slot by up to {float((got - want).abs().max()):.3g})")
