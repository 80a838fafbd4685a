"""The anatomy probe (models/anatomy.py) on tiny random-weight models of every family: it finds each layer's
norms, attention and MLP without knowing the family, a post-norm layer is refused in one line, and the swiglu
replacement built from it copies exactly the MLP path of the layer (same output on the same input)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_streamline.config import ReplacementConfig
from llm_streamline.models.anatomy import AnatomyError, anatomy_of
from llm_streamline.models.layers import find_decoder_stack, run_layers
from llm_streamline.models.loading import TINY_CONFIGS, tiny_model
from llm_streamline.replace import build_replacement, replacement_param_count

VOCAB = 512
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# what the parts are called in each family's code (the probe does not know these names; the test does)
LLAMA = dict(attention_norm="input_layernorm", attention="self_attn",
             attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             attention_output="self_attn.o_proj", mlp_norm="post_attention_layernorm", mlp=("mlp",),
             mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj", mlp_post_norm=None)
GEMMA = dict(LLAMA, mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm")
EXPECTED = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma2": GEMMA, "gemma3": GEMMA,
    "phi3": dict(LLAMA, attention_inputs=("self_attn.qkv_proj",), mlp_inputs=("mlp.gate_up_proj",)),
    "opt": dict(attention_norm="self_attn_layer_norm", attention="self_attn",
                attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                attention_output="self_attn.out_proj", mlp_norm="final_layer_norm",
                mlp=("fc1", "activation_fn", "fc2"), mlp_inputs=("fc1",), mlp_output="fc2", mlp_post_norm=None),
    "gptneox": dict(attention_norm="input_layernorm", attention="attention",
                    attention_inputs=("attention.query_key_value",), attention_output="attention.dense",
                    mlp_norm="post_attention_layernorm", mlp=("mlp",), mlp_inputs=("mlp.dense_h_to_4h",),
                    mlp_output="mlp.dense_4h_to_h", mlp_post_norm=None),
}


def make(family: str, **over):
    return tiny_model(family, VOCAB, overrides=over or None, special_ids=SPECIAL).eval()


def ids(n=2, t=12, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_probe_finds_every_part_of_every_family(family):
    anatomy = anatomy_of(make(family), 3)
    assert vars(anatomy) == EXPECTED[family]


def test_probe_tokens_do_not_matter():
    model = make("gemma2")
    assert anatomy_of(model, 1) == anatomy_of(model, 1, ids(1, 20, seed=3)) == anatomy_of(model, 5)


def test_a_parallel_block_with_one_shared_norm_is_split_by_child():
    cfg = AutoConfig.for_model("gptj", vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, rotary_dim=8)
    a = anatomy_of(AutoModelForCausalLM.from_config(cfg).eval(), 1)
    assert a.attention_norm == a.mlp_norm == "ln_1"
    assert a.attention_inputs == ("attn.q_proj", "attn.k_proj", "attn.v_proj") and a.attention_output == "attn.out_proj"
    assert a.mlp == ("mlp",) and a.mlp_inputs == ("mlp.fc_in",) and a.mlp_output == "mlp.fc_out"


def test_a_post_norm_layer_is_refused_in_one_line():
    with pytest.raises(AnatomyError, match="OPTDecoderLayer: no norm whose output a Linear map reads") as e:
        anatomy_of(make("opt", do_layer_norm_before=False), 2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "gptneox", "phi3"])
def test_swiglu_slot_computes_the_layers_own_mlp_path(family):
    """With the attention's output map zeroed, the layer is x + [post](mlp(norm(x))): exactly what the swiglu
    slot copied from it computes; and the parameters it adds are what replacement_param_count says."""
    model = make(family)
    stack = find_decoder_stack(model)
    anatomy = anatomy_of(model, 2)
    slot = build_replacement(ReplacementConfig(type="swiglu"), [stack.layers[2]], stack.config, anatomy=anatomy)[0]
    assert sum(p.numel() for p in slot.parameters()) == replacement_param_count(ReplacementConfig(type="swiglu"), model)
    layer = copy.deepcopy(stack.layers[2])
    out = layer.get_submodule(anatomy.attention_output)
    with torch.no_grad():
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
        cap = run_layers(model, ids(), inputs_at=(2,), kwargs_at=(2,))
        x, kw = cap.inputs[2], cap.call_kwargs[2]
        got = layer(x, **kw)
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(slot(x, **kw), got, rtol=0, atol=1e-6)


def seven_b_without_weights(family: str):
    """`family` at a 7B-like shape, built from its config on the meta device as the plan and the checks before
    loading build a hub preset (`preflight.meta_model`): shapes only, no weights."""
    model_type, kwargs = TINY_CONFIGS[family]
    shape = {"opt": dict(ffn_dim=16384, word_embed_proj_dim=4096), "gptneox": dict(intermediate_size=16384)}.get(
        family, dict(intermediate_size=11008, num_key_value_heads=8, head_dim=128))
    config = AutoConfig.for_model(model_type, **{**kwargs, **SPECIAL, **shape, "vocab_size": 32000,
                                                 "hidden_size": 4096, "num_attention_heads": 32,
                                                 "num_hidden_layers": 32})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def mlp_replacement_runs():
    """Runs that remove 8 layers net from layer 20 with an MLP replacement: swiglu and a pre-norm FFN."""
    from test_pipeline import compose_run

    return [compose_run("experiment=smoke", f"replacement={preset}", "sparsity.count=net", "sparsity.layers=8",
                        "sparsity.start=20") for preset in ("swiglu", "ffn_prenorm")]


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_a_model_without_weights_is_probed_and_its_mlp_replacements_sized_from_its_shapes(family,
                                                                                          mlp_replacement_runs):
    """On the meta device transformers' mask code asked the data `.item()`: the probe failed for every family but
    OPT, and with it `check_block` for replacement=swiglu or a pre-norm FFN with sparsity.count=net on a hub
    preset. The anatomy is the one found with weights, the model's attention implementation is left as it was,
    and the block is sized with the parameters of the replacement the run builds."""
    from llm_streamline import preflight
    from llm_streamline.models.layers import count_params

    model = seven_b_without_weights(family)
    implementation = model.config._attn_implementation
    anatomy = anatomy_of(model, 3)
    assert vars(anatomy) == EXPECTED[family] and model.config._attn_implementation == implementation
    stack = find_decoder_stack(model)
    for cfg in mlp_replacement_runs:
        [slot] = build_replacement(cfg.replacement, [stack.layers[0]], stack.config, anatomy=anatomy)
        params = replacement_param_count(cfg.replacement, model)
        assert params == count_params(slot) > 90e6  # an MLP of a 7B model, in both forms
        preflight.check_block(cfg, model)
        assert preflight.run_block_size(cfg, model) == 8 + round(params / count_params(stack.layers[0]))
