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
          class), found by probing the layer: the un-normalised residual stream carries a few tokens with
          massive activations that would otherwise dominate what f sees
  swiglu  pre-norm MLP initialised from the first pruned layer: y = x + [post_norm](mlp(norm(x))); for
          families whose MLP is SwiGLU (Llama, Mistral, Qwen, Gemma, Phi-3) it is a SwiGLU; for OPT and
          GPT-NeoX it is their own (ReLU/GELU) MLP, copied the same way
  layer   one decoder layer of the model's own class, initialised from the first pruned layer
  layers  k decoder layers, initialised from the first k pruned layers
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.cache_utils import Cache

from llm_streamline.config import ReplacementConfig

# Attributes some model loops read from the layer object itself (older families index masks by them).
_LAYER_ATTRS = ("attention_type", "is_sliding", "sliding_window", "layer_type")
_MLP_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "final_layer_norm", "ln_2")
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


def mlp_from_layer(layer: nn.Module) -> MLPReplacement:
    norm = next((copy.deepcopy(getattr(layer, n)) for n in _MLP_NORM_NAMES if hasattr(layer, n)), None)
    if norm is None:
        raise ValueError(f"{type(layer).__name__}: no pre-MLP norm found (looked for {_MLP_NORM_NAMES})")
    if hasattr(layer, "mlp"):
        mlp = copy.deepcopy(layer.mlp)
    elif hasattr(layer, "fc1") and hasattr(layer, "fc2"):
        mlp = _TwoLayerMLP(copy.deepcopy(layer.fc1), copy.deepcopy(layer.activation_fn), copy.deepcopy(layer.fc2))
    else:
        raise ValueError(f"{type(layer).__name__}: no MLP found to initialise a swiglu replacement from")
    post = copy.deepcopy(layer.post_feedforward_layernorm) if hasattr(layer, "post_feedforward_layernorm") else None
    return MLPReplacement(norm, mlp, post)


def _norm_like(module: nn.Module, hidden_size: int) -> bool:
    """A leaf module whose parameters are per-channel vectors of the hidden size (RMSNorm, LayerNorm)."""
    params = list(module.parameters(recurse=False))
    return (not list(module.children()) and bool(params)
            and all(p.dim() == 1 and p.numel() == hidden_size for p in params))


@torch.no_grad()
def find_pre_mlp_norm(layer: nn.Module, hidden: torch.Tensor, call_kwargs: dict) -> str:
    """The attribute path (in `layer`) of the norm whose output feeds the MLP, found by running the layer once.

    Generic over families: record which norm-like modules run, in order, and which tensors enter a Linear
    map; the norms whose output enters a Linear are the pre-attention one (feeding q/k/v) and the pre-MLP one
    (feeding the MLP's first maps), and the MLP runs after the attention. So the pre-MLP norm is the LAST
    norm whose output a Linear reads (Gemma's post-attention norm feeds no Linear and is skipped)."""
    d = hidden.shape[-1]
    names = {m: n for n, m in layer.named_modules() if n and _norm_like(m, d)}
    # the tensors themselves are kept (compared by identity): a freed one's memory could be reused
    order, norm_out, linear_in, handles = [], {}, [], []

    def on_norm(module, args, output):
        order.append(names[module])
        norm_out[names[module]] = output

    def on_linear(module, args):
        linear_in.append(args[0])

    for m in names:
        handles.append(m.register_forward_hook(on_norm))
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_linear))
    try:
        layer(hidden, **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    feeding = [n for n in order if any(norm_out[n] is t for t in linear_in)]
    if not feeding:
        raise ValueError(f"{type(layer).__name__}: no norm whose output a Linear map reads (norm-like modules "
                         f"run: {order})")
    return feeding[-1]


def pre_mlp_norm_of(model: nn.Module, index: int, input_ids: torch.Tensor) -> str:
    """`find_pre_mlp_norm` for decoder layer `index` of `model`, called as the model calls it on `input_ids`."""
    from llm_streamline.models.layers import find_decoder_stack, run_layers

    stack = find_decoder_stack(model)
    cap = run_layers(model, input_ids, inputs_at=(index,), kwargs_at=(index,), stack=stack)
    return find_pre_mlp_norm(stack.layers[index], cap.inputs[index], cap.call_kwargs[index])


def needs_norm_probe(cfg: ReplacementConfig) -> bool:
    return cfg.type == "ffn" and cfg.pre_norm


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
                      returns_tuple: bool = False, norm_path: str | None = None) -> list[nn.Module]:
    """Modules that take the block's slot (empty for `none`). `pruned_layers` are the removed layers in order;
    `norm_path` (from `find_pre_mlp_norm`) names the norm a pre-norm FFN copies from the first of them."""
    if cfg.type == "none":
        return []
    first = pruned_layers[0]
    if cfg.type in ("layer", "layers"):
        k = 1 if cfg.type == "layer" else cfg.num_layers
        if k > len(pruned_layers):
            raise ValueError(f"replacement.num_layers={k} is more than the {len(pruned_layers)} layers pruned")
        mods = [copy.deepcopy(pruned_layers[j]) for j in range(k)]
        for m in mods:
            m.requires_grad_(True)
        return mods
    if cfg.type == "ffn":
        norm = None
        if cfg.pre_norm:
            if norm_path is None:
                raise ValueError("replacement.pre_norm needs the pruned layer's pre-MLP norm (find_pre_mlp_norm)")
            norm = copy.deepcopy(first.get_submodule(norm_path))
        module = FFNReplacement(config.hidden_size, cfg.hidden_size or mlp_width(config), cfg.activation,
                                cfg.residual, norm)
    elif cfg.type == "swiglu":
        module = mlp_from_layer(first)
    else:
        raise ValueError(f"unknown replacement type {cfg.type!r}")
    p = next(first.parameters())
    module = module.to(device=p.device, dtype=p.dtype)
    module.returns_tuple = returns_tuple
    module.layer_idx = next((m.layer_idx for m in first.modules() if isinstance(getattr(m, "layer_idx", None), int)), 0)
    _copy_layer_attrs(first, module)
    module.requires_grad_(True)
    return [module]


def replacement_param_count(cfg: ReplacementConfig, layer_params: int, config, sample_layer: nn.Module) -> int:
    """Parameters a replacement adds, without building it on the device (used to pick n from a target)."""
    if cfg.type == "none":
        return 0
    if cfg.type == "layer":
        return layer_params
    if cfg.type == "layers":
        return cfg.num_layers * layer_params
    if cfg.type == "ffn":
        d, w = config.hidden_size, cfg.hidden_size or mlp_width(config)
        # a layer's norms share one class: any of them counts what the copied pre-MLP norm adds
        norm = max((sum(p.numel() for p in m.parameters()) for m in sample_layer.modules() if _norm_like(m, d)),
                   default=0) if cfg.pre_norm else 0
        return 2 * d * w + w + d + norm
    parts = [getattr(sample_layer, n) for n in ("mlp", "fc1", "fc2", "post_feedforward_layernorm")
             if hasattr(sample_layer, n)]
    parts += [next(getattr(sample_layer, n) for n in _MLP_NORM_NAMES if hasattr(sample_layer, n))]
    return sum(p.numel() for m in parts for p in m.parameters())
