"""Checkpoint formats (models/checkpoints.py): every format a method registers loads in a fresh interpreter
(the registering module is imported on demand) and a directory of no format fails in one line. (That models/
imports nothing above it: tests/test_imports.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm_streamline
from llm_streamline.baselines import llm_pruner
from llm_streamline.config import LLMPrunerConfig, ReplacementConfig, RunConfig
from llm_streamline.models import checkpoints
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.layers import find_decoder_stack, remove_block
from llm_streamline.models.loading import tiny_model
from llm_streamline.replace import build_replacement, slot_checkpoint

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
X = torch.arange(3, 27).unsqueeze(0)


def _streamline(dest: Path) -> torch.Tensor:
    model = tiny_model("gemma2", 512, special_ids=SPECIAL).eval()
    stack = find_decoder_stack(model)
    rcfg = ReplacementConfig(type="ffn", pre_norm=True)
    slot = build_replacement(rcfg, list(stack.layers[2:5]), stack.config, anatomy=anatomy_of(model, 2))
    with torch.no_grad():
        for p in slot[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    remove_block(model, 2, 3, slot)
    assert checkpoints.save_checkpoint(model, None, dest, {"t": 1}, *slot_checkpoint(rcfg, model, 2)) == "streamline"
    with torch.no_grad():
        return model(X).logits


def _llm_pruner(dest: Path) -> torch.Tensor:
    model = tiny_model("llama", 512, seed=0, special_ids=SPECIAL).eval()
    cfg = RunConfig(method=LLMPrunerConfig(first_layer=1, last_layers_kept=1, grad_samples=2,
                                        grad_seq_len=16, width_ratio=0.5))
    res = llm_pruner.apply(model, torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0)), 2, cfg)
    assert checkpoints.save_checkpoint(res.model, None, dest, {"t": 2}, *res.checkpoint) == "llm_pruner"
    with torch.no_grad():
        return res.model.eval()(X).logits


def test_every_registered_format_loads_in_a_fresh_interpreter(tmp_path):
    want = {"streamline": _streamline(tmp_path / "streamline"), "llm_pruner": _llm_pruner(tmp_path / "llm_pruner")}
    assert set(want) == set(checkpoints.FORMATS)
    script = (
        "import sys, torch\n"
        "from llm_streamline.models.checkpoints import FORMATS, format_of, load_pruned\n"
        "for d in sys.argv[1:]:\n"
        "    fmt = format_of(d)\n"
        "    assert FORMATS[fmt].registered_by not in sys.modules, 'registered before a checkpoint needed it'\n"
        "    torch.save(load_pruned(d)(torch.arange(3, 27).unsqueeze(0)).logits.detach(), d + '.pt')\n")
    dirs = [str(tmp_path / fmt) for fmt in want]
    done = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for fmt, logits in want.items():
        assert torch.equal(torch.load(tmp_path / f"{fmt}.pt"), logits), fmt
        meta = json.loads((tmp_path / fmt / checkpoints.FORMATS[fmt].meta_file).read_text())
        assert list(meta)[0] == "model_config" and list(meta)[-1] == "record"
        assert json.loads((tmp_path / fmt / "llm_streamline.json").read_text())["format"] == fmt


def test_a_directory_of_no_format_fails_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved model") as e:
        llm_streamline.load_pruned(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoints.register_builder("mine", lambda model, meta: None)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoints.save_checkpoint(None, None, tmp_path / "x", {}, "mine")
    assert not (tmp_path / "x").exists()


def _shards(d: Path) -> list[str]:
    index = json.loads((d / checkpoints.WEIGHTS_INDEX).read_text())
    assert not (d / checkpoints.WEIGHTS_FILE).exists()
    return sorted(set(index["weight_map"].values()))


@pytest.mark.parametrize("kind", ["streamline", "llm_pruner", "stock"])
def test_sharded_round_trip_in_its_dtype_without_random_init(kind, tmp_path, monkeypatch):
    """A tiny shard size forces several shards and an index: the same logits after reloading; bf16 weights stay
    bf16 on disk and back (bit for bit); the custom formats are rebuilt with parameters on the meta device (no
    random init)."""
    if kind == "stock":
        model = tiny_model("llama", 512, special_ids=SPECIAL).eval()
        remove_block(model, 2, 2, [])
        fmt, fields = checkpoints.STOCK, {}
    else:
        (_streamline if kind == "streamline" else _llm_pruner)(tmp_path / "plain")
        model = checkpoints.load_pruned(tmp_path / "plain")
        fmt = kind
        meta = json.loads((tmp_path / "plain" / checkpoints.FORMATS[fmt].meta_file).read_text())
        fields = {k: v for k, v in meta.items() if k not in ("model_config", "record")}
    built_on = []
    if kind != "stock":
        fmt_builder = checkpoints._builder(kind)
        monkeypatch.setitem(checkpoints._BUILDERS, kind,
                            lambda m, meta: (built_on.append(next(m.parameters()).device.type), fmt_builder(m, meta)))
    checkpoints.save_checkpoint(model, None, tmp_path / "fp32", {}, fmt, fields, max_shard_size=200_000)
    assert len(_shards(tmp_path / "fp32")) >= 3
    with torch.no_grad():
        assert torch.equal(checkpoints.load_pruned(tmp_path / "fp32")(X).logits, model(X).logits)
    assert built_on == ([] if kind == "stock" else ["meta"])
    half = model.to(torch.bfloat16)
    checkpoints.save_checkpoint(half, None, tmp_path / "bf16", {}, fmt, fields, max_shard_size=100_000)
    assert all(t.dtype == torch.bfloat16 for s in _shards(tmp_path / "bf16")
               for t in checkpoints.load_file(str(tmp_path / "bf16" / s)).values())
    loaded = checkpoints.load_pruned(tmp_path / "bf16", dtype=None).state_dict()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == torch.bfloat16
               for k, v in half.state_dict().items() if v.is_floating_point() and k in loaded
               and "rotary" not in k)


def test_a_checkpoint_without_its_anatomy_still_loads(tmp_path):
    """Saved before the anatomy was kept: its builder probes a model built with weights."""
    ref = _streamline(tmp_path / "m")
    meta_file = tmp_path / "m" / checkpoints.STREAMLINE_CONFIG
    meta = json.loads(meta_file.read_text())
    del meta["anatomy"]
    meta_file.write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.allclose(checkpoints.load_pruned(tmp_path / "m")(X).logits, ref, atol=1e-5)
