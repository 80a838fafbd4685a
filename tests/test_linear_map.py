"""Training-free linear replacements (ReplaceMe, LinearPatch) and the linear init of trained ones, on tiny
random-weight models: closed forms against dense solves, fusion against the unfused map, bounded memory."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from llm_streamline import linear_map
from llm_streamline.config import ReplacementConfig
from llm_streamline.linear_map import Gram, hadamard
from llm_streamline.models.checkpoints import load_pruned, save_checkpoint
from llm_streamline.models.layers import count_params, find_decoder_stack, remove_block, run_layers
from llm_streamline.models.loading import tiny_model
from llm_streamline.replace import build_replacement, replacement_param_count, slot_checkpoint

VOCAB = 512
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
START, N = 3, 3


def make(family="llama", **over):
    return tiny_model(family, VOCAB, overrides=over or None, special_ids=SPECIAL).eval()


def ids(n=8, t=24, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def dense_boundary(model, blocks):
    """M, Z, x_(s+n) for all calibration tokens at once (what the streamed code must not do)."""
    return linear_map._Boundary(model, START, N)(blocks)


class _Tok:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_replaceme_closed_form_equals_a_dense_solve_and_fusion_equals_the_unfused_map(family, tmp_path):
    model = make(family)
    calib = ids()
    t, log = linear_map.replaceme_map(model, calib, START, N, ReplacementConfig(type="linear"), batch_size=3)
    m, z, y = dense_boundary(model, calib)
    dense = torch.linalg.lstsq(m.double(), (y - z).double()).solution
    assert torch.allclose(t, dense, rtol=1e-6, atol=1e-8 * float(dense.abs().max()))
    assert log["mse_map"] < log["mse_pruned"] and log["calibration_tokens"] == calib.numel()
    assert abs(log["mse_map"] - float(((m.double() @ dense - (y - z).double()) ** 2).mean())) < 1e-6 * log["mse_map"]
    assert abs(log["mse_pruned"] - float(((m - (y - z)) ** 2).mean())) < 1e-4 * log["mse_pruned"]

    fused, hooked, plain = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    linear_map.fuse_into_mlp_output(fused, START - 1, t)
    unfused = linear_map.MapAfter(linear_map.mlp_output_map(hooked, START - 1), t)
    for mdl in (fused, hooked, plain):
        remove_block(mdl, START, N, [])
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        a, b, c = fused(x).logits, hooked(x).logits, plain(x).logits
    unfused.remove()
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-3  # the map is there, and fused exactly
    assert count_params(fused) == count_params(plain)
    fmt, meta = slot_checkpoint(ReplacementConfig(type="linear"), fused, START)
    assert fmt == "stock" and replacement_param_count(ReplacementConfig(type="linear"), model) == 0
    save_checkpoint(fused, _Tok(), tmp_path / "ckpt", {}, fmt, meta)
    loaded = load_pruned(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, a, atol=1e-5)


def test_ridge_shrinks_and_the_cosine_objective_lowers_its_distance():
    model = make()
    calib = ids()
    t0, _ = linear_map.replaceme_map(model, calib, START, N, ReplacementConfig(type="linear"), 4)
    t1, _ = linear_map.replaceme_map(model, calib, START, N, ReplacementConfig(type="linear", ridge=1.0), 4)
    assert t1.norm() < t0.norm()
    excl = ReplacementConfig(type="linear", first_token="exclude")
    t2, log2 = linear_map.replaceme_map(model, calib, START, N, excl, 4)
    m, z, y = linear_map._Boundary(model, START, N, "exclude")(calib)
    assert log2["calibration_tokens"] == calib.shape[0] * (calib.shape[1] - 1) == len(m)
    assert torch.allclose(t2, torch.linalg.lstsq(m.double(), (y - z).double()).solution, atol=1e-6)
    cfg = ReplacementConfig(type="linear", objective="cosine", fit_epochs=3, fit_lr=1e-2, fit_batch_tokens=64)
    t, log = linear_map.replaceme_map(model, calib, START, N, cfg, 4)
    assert log["cos_last_pass"] < log["cos_pruned"] and not torch.equal(t, torch.eye(t.shape[0], dtype=t.dtype))


@pytest.mark.parametrize("objective", ["lstsq", "cosine"])
def test_streamed_fit_holds_one_batch_of_activations_whatever_the_calibration_size(objective, monkeypatch):
    """Memory must not grow with the calibration samples: at every call of the boundary, at most the previous
    batch's activations are still alive, none at the end; the normal equations have a fixed size."""
    model = make()
    alive: list[weakref.ref] = []
    most = []
    real = linear_map._boundary_rows

    def watched(boundaries, ids):
        most.append(sum(r() is not None for r in alive))
        out = real(boundaries, ids)
        alive.extend(weakref.ref(x) for rows in out for x in rows)
        return out

    monkeypatch.setattr(linear_map, "_boundary_rows", watched)
    cfg = ReplacementConfig(type="linear", objective=objective, fit_epochs=2)
    linear_map.replaceme_map(model, ids(16), START, N, cfg, batch_size=2)
    assert len(most) >= 8 and max(most) <= 3  # one batch: M, Z, x_(s+n)
    assert sum(r() is not None for r in alive) == 0
    g = Gram(64, 64)
    g.add(torch.randn(100, 64), torch.randn(100, 64))
    size = g.xtx.numel() + g.xty.numel()
    assert size == 2 * 64 * 64
    for _ in range(4):
        g.add(torch.randn(100, 64), torch.randn(100, 64))
    assert g.xtx.numel() + g.xty.numel() == size and g.rows == 500


def test_post_norm_mlp_is_refused_with_one_line():
    with pytest.raises(linear_map.LinearMapError, match="normalises its MLP output"):
        linear_map.replaceme_map(make("gemma3"), ids(2), START, N, ReplacementConfig(type="linear"), 2)
    with pytest.raises(linear_map.LinearMapError, match="there is none"):
        linear_map._Boundary(make(), 0, N)


@pytest.mark.parametrize("d", [64, 576, 640, 20])
def test_hadamard_is_orthonormal_with_plus_minus_entries(d):
    h = hadamard(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=h.dtype), atol=1e-10)
    assert torch.allclose(h.abs() * d ** 0.5, torch.ones_like(h))


def test_hadamard_refuses_a_size_it_cannot_build():
    with pytest.raises(linear_map.LinearMapError, match="hidden size 9"):
        hadamard(9)


def test_linear_patch_scales_in_the_hadamard_basis_and_round_trips(tmp_path):
    model = make()
    calib = ids(4)
    p, log = linear_map.linear_patch_matrix(model, calib, START, N, batch_size=4)
    cap = run_layers(model, calib, inputs_at=(START,), outputs_at=(START + N - 1,))
    h = hadamard(64)
    c = ((cap.outputs[START + N - 1].reshape(-1, 64).double() @ h).abs().mean(0)
         / (cap.inputs[START].reshape(-1, 64).double() @ h).abs().mean(0))
    assert torch.allclose(p, h @ torch.diag(c) @ h.T, atol=1e-5) and torch.allclose(p, p.T)
    pruned = copy.deepcopy(model)
    rcfg = ReplacementConfig(type="linear_patch")
    tuple_out = run_layers(model, calib[:1], outputs_at=(START,)).output_is_tuple
    slot = build_replacement(rcfg, list(find_decoder_stack(pruned).layers[START:START + N]),
                             find_decoder_stack(pruned).config, tuple_out)
    with torch.no_grad():
        slot[0].weight.copy_(p.float())
    remove_block(pruned, START, N, slot)
    assert count_params(pruned) == count_params(model) - N * count_params(find_decoder_stack(model).layers[0]) + 64 ** 2
    save_checkpoint(pruned, _Tok(), tmp_path / "ckpt", {}, *slot_checkpoint(rcfg, pruned, START))
    x = ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path / "ckpt")(x).logits, pruned(x).logits, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_ffn_init_linear_equals_the_least_squares_map_at_step_0(pre_norm):
    model = make()
    calib = ids()
    stack = find_decoder_stack(model)
    rcfg = ReplacementConfig(type="ffn", pre_norm=pre_norm, init="linear")
    anatomy = linear_map.anatomy_of(model, START) if pre_norm else None
    slot = build_replacement(rcfg, list(copy.deepcopy(stack.layers[START:START + N])), stack.config, True, anatomy)
    linear_map.init_ffn_linear(slot[0], model, calib, START, N, batch_size=3)
    cap = run_layers(model, calib, inputs_at=(START,), outputs_at=(START + N - 1,))
    x, y = cap.inputs[START], cap.outputs[START + N - 1]
    with torch.no_grad():
        f_in = slot[0].norm(x).reshape(-1, 64).double()
        f_in = torch.cat([f_in, f_in.new_ones(len(f_in), 1)], 1)
        sol = torch.linalg.lstsq(f_in, (y - x).reshape(-1, 64).double()).solution
        want = x + (f_in @ sol).float().reshape(x.shape)
        got = slot[0](x)[0]
    assert (got - want).abs().max() < 1e-4
    small = ReplacementConfig(type="ffn", hidden_size=100, init="linear")
    narrow = build_replacement(small, list(stack.layers[START:START + N]), stack.config, True)
    with pytest.raises(linear_map.LinearMapError, match="width >= 2 x hidden"):
        linear_map.init_ffn_linear(narrow[0], model, calib, START, N, 3)


def test_layer_init_linear_refits_the_mlp_output_map_to_the_least_squares_optimum():
    model = make()
    calib = ids()
    stack = find_decoder_stack(model)
    rcfg = ReplacementConfig(type="layer", init="linear")
    copied = build_replacement(rcfg, list(stack.layers[START:START + N]), stack.config, True)[0]
    layer = copy.deepcopy(copied)
    linear_map.init_layer_linear(layer, model, calib, START, N, batch_size=3)
    cap = run_layers(model, calib, inputs_at=(START,), kwargs_at=(START,), outputs_at=(START + N - 1,))
    x, kw, y = cap.inputs[START], cap.call_kwargs[START], cap.outputs[START + N - 1]

    def mse(m):
        with torch.no_grad():
            return float(((linear_map._call(m, x, kw) - y) ** 2).mean())

    before, after = mse(copied), mse(layer)
    assert after < before
    # the optimum over the output map: perturbing it only raises the error
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(1e-3 * torch.randn_like(layer.mlp.down_proj.weight))
    assert mse(layer) > after


def test_layer_init_linear_through_gemmas_post_mlp_norm_fits_the_direction_the_norm_lets_through():
    """Gemma normalises its MLP output (N(v) = s * v / rms(v), s = 1 + w): the refit output map's direction is the
    dense least-squares solution for the closest rms-1 input per token (`through_rms_norm`), its scale the
    copied map's; the layer's output error falls. This model was refused before (a map cannot be *fused* there)."""
    model = make("gemma3")
    stack = find_decoder_stack(model)
    with torch.no_grad():  # non-trivial scales (random weights start at w = 0, s = 1), some of them negative
        for layer in stack.layers:
            layer.post_feedforward_layernorm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    calib = ids()
    rcfg = ReplacementConfig(type="layer", init="linear")
    copied = build_replacement(rcfg, list(stack.layers[START:START + N]), stack.config, True)[0]
    layer = copy.deepcopy(copied)
    log = linear_map.init_layer_linear(layer, model, calib, START, N, batch_size=3)
    assert log["through_norm"] == "post_feedforward_layernorm"
    cap = run_layers(model, calib, inputs_at=(START,), kwargs_at=(START,), outputs_at=(START + N - 1,))
    x, kw, y = cap.inputs[START], cap.call_kwargs[START], cap.outputs[START + N - 1]
    caught = {}
    hooks = [copied.mlp.down_proj.register_forward_hook(lambda m, a, out: caught.update(h=a[0], v=out)),
             copied.post_feedforward_layernorm.register_forward_hook(lambda m, a, out: caught.update(o=out))]
    with torch.no_grad():
        out = linear_map._call(copied, x, kw)
    for hook in hooks:
        hook.remove()
    s = linear_map.rms_scale(copied.post_feedforward_layernorm, 64)
    assert torch.allclose(s, 1 + copied.post_feedforward_layernorm.weight, rtol=1e-5)
    t = linear_map.through_rms_norm((y - out + caught["o"]).reshape(-1, 64), s)
    h = caught["h"].reshape(-1, caught["h"].shape[-1]).double()
    dense = torch.linalg.lstsq(h, t).solution.T
    got = layer.mlp.down_proj.weight.detach().double()
    assert torch.nn.functional.cosine_similarity(got.flatten(), dense.flatten(), dim=0) > 1 - 1e-6
    assert abs(float((h @ got.T).pow(2).sum() / caught["v"].double().pow(2).sum()) - 1) < 1e-4

    def mse(m):
        with torch.no_grad():
            return float(((linear_map._call(m, x, kw) - y) ** 2).mean())

    assert mse(layer) < mse(copied)
    with pytest.raises(linear_map.LinearMapError, match="not an RMS norm"):
        linear_map.rms_scale(torch.nn.LayerNorm(64), 64)


def test_through_rms_norm_is_the_closest_normalised_output():
    """w has rms 1 and s * w is nearer r than any other rms-1 input's output (perturbations; the naive r / s)."""
    g = torch.Generator().manual_seed(0)
    r = 3 * torch.randn(50, 16, generator=g, dtype=torch.float64)
    s = torch.randn(16, generator=g, dtype=torch.float64)
    s[0] = 1e-3  # a near-zero scale: r / s would put the whole direction there
    w = linear_map.through_rms_norm(r, s)
    assert torch.allclose(w.pow(2).mean(-1), torch.ones(50, dtype=torch.float64))

    def err(v):
        v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
        return ((s * v - r) ** 2).sum(-1)

    best = err(w)
    for _ in range(20):
        assert (best <= err(w + 0.05 * torch.randn(50, 16, generator=g, dtype=torch.float64)) + 1e-9).all()
    assert (best <= err(r / s) + 1e-9).all() and (best < err(r / s)).any()


def test_presets_compose_and_bad_options_are_refused_before_work():
    from hydra import compose, initialize_config_dir

    from llm_streamline.cli import CONF_DIR, to_run_config
    from llm_streamline.config import ConfigError, validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        grid = compose(config_name="config", overrides=["experiment=block_x_replacement"], return_hydra_config=True)
        nc = compose(config_name="config", overrides=["experiment=block_x_replacement_noncontiguous"],
                     return_hydra_config=True)
        cos = to_run_config(compose(config_name="config", overrides=["replacement=linear",
                                                                     "replacement.objective=cosine"]))
        patch = to_run_config(compose(config_name="config", overrides=["replacement=linear_patch"]))
        bad = [to_run_config(compose(config_name="config", overrides=o)) for o in (
            ["replacement=swiglu", "replacement.init=linear"],
            ["replacement=linear", "replacement.finetune=true"], ["replacement=linear", "method=laco"])]
        with pytest.raises(Exception, match="replacement.objective=l1") as err:  # an Enum: refused at composition
            compose(config_name="config", overrides=["replacement=linear", "replacement.objective=l1"])
        assert "expected one of [lstsq, cosine]" in str(err.value.__cause__)
    params = grid.hydra.sweeper.params
    assert set(params["replacement"].split(",")) == {"none", "linear", "linear_patch", "ffn", "layer"}
    assert set(params["sparsity.importance"].split(",")) == {"cosine", "angular", "perplexity"}
    assert grid.eval.name == "signal" and grid.sparsity.count == "net"
    assert nc.hydra.sweeper.params["replacement"] == "none,linear" and nc.eval.name == "signal"
    validate(cos)
    validate(patch)
    for cfg, msg in zip(bad, ("initialises an ffn or a layer", "finetune=true trains a linear_patch",
                                "method=laco removes none")):
        with pytest.raises(ConfigError, match=msg):
            validate(cfg)


def test_baseline_gets_one_fused_map_per_removed_run_each_equal_to_its_unfused_map(monkeypatch):
    """A non-contiguous choice (ShortGPT, SLEB) with replacement=linear: layers 1, 2 and 5 removed -> the maps of
    [1, 3) and [5, 6) fused into layers 0 and 4 (indices 0 and 2 after pruning)."""
    from types import SimpleNamespace

    from llm_streamline.models.layers import remove_layers
    from llm_streamline.recipes.baseline import fuse_linear_maps
    from llm_streamline.recipes.common import Compressed, Timings

    model = make()
    calib = ids()
    r = ReplacementConfig(type="linear")
    ctx = SimpleNamespace(model=model, blocks=SimpleNamespace(calib=calib), timings=Timings(), accelerator=None,
                          cfg=SimpleNamespace(train=SimpleNamespace(batch_size=4), seed=0, mode="run",
                                              model=SimpleNamespace(infer_batch_size=None),
                                              method=SimpleNamespace(name="shortgpt")))
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [1, 2, 5])
    c = Compressed(pruned, "k", 1, [1, 2, 5], {}, baseline={})
    passes = []  # one forward of the dense model per calibration batch for both maps, not one per map
    real = linear_map.run_layers
    monkeypatch.setattr(linear_map, "run_layers", lambda *a, **k: passes.append(k["outputs_at"]) or real(*a, **k))
    fuse_linear_maps(ctx, c, r)
    assert passes == [(0, 2, 4, 5)] * 2  # 8 blocks in batches of 4; the outputs of layers 0, 2 and 4, 5
    assert [f["block"] for f in c.baseline["linear_maps"]] == [[1, 3], [5, 6]] and c.key != "k"
    hooked = copy.deepcopy(model)
    hooks = [linear_map.MapAfter(linear_map.mlp_output_map(hooked, s - 1),
                                 linear_map.replaceme_map(model, calib, s, e - s, r, 4)[0])
             for s, e in ((1, 3), (5, 6))]
    remove_layers(hooked, [1, 2, 5])
    x = ids(2, 16, seed=7)
    with torch.no_grad():
        assert (c.model(x).logits - hooked(x).logits).abs().max() < 1e-4
    for h in hooks:
        h.remove()


def test_gram_sums_stay_on_the_activations_device_and_the_solution_comes_to_the_host():
    """The X^T X products are the fit's whole cost: they run where the activations are (meta stands in for a
    GPU here: any copy to the host would fail on it), and only the d x d solution reaches the host."""
    g = Gram(8, 8)
    g.add(torch.empty(10, 8, device="meta"), torch.empty(10, 8, device="meta"))
    assert g.xtx.device.type == "meta" and g.xty.device.type == "meta" and g.rows == 10
    h = Gram(8, 8)
    x = torch.randn(50, 8, dtype=torch.float64)
    h.add(x, x @ torch.eye(8, dtype=torch.float64) * 2)
    assert h.solve().device.type == "cpu"
    torch.testing.assert_close(h.solve(), 2 * torch.eye(8, dtype=torch.float64))
