"""benchmarks/gpu_scale.py stays runnable: its --tiny mode runs every stage on the CPU here (a few seconds), and on a
CUDA machine (`pytest -m cuda`) the same tiny model runs in bf16 on the GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"
STAGES = {"load_model", "importance", "perplexity_dense", "train_online", "teacher_pairs", "train",
          "perplexity_pruned", "speed", "save"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(result: dict, out: Path) -> None:
    assert set(result["stages"]) == STAGES
    assert all(r["seconds"] > 0 for r in result["stages"].values())
    priced = {k for k, r in result["stages"].items() if "plan_seconds" in r}
    assert priced == STAGES - {"load_model", "speed"}
    # online and cached pairs are the same batches: the same trained replacement (fp32 on the CPU)
    if result["dtype"] == "float32":
        assert result["train"]["online_best_val_loss"] == pytest.approx(result["train"]["best_val_loss"], rel=1e-5)
    assert result["train"]["steps"] == 16 and result["train"]["best_val_loss"] <= result["train"]["initial_val_loss"]
    assert result["removed"][1] - result["removed"][0] == 2  # --tiny removes 2 of 4 layers
    assert result["dense_params"] > result["params"]  # the plan priced the dense model, not the pruned one
    assert json.loads((out / "gpu_scale.json").read_text())["stages"].keys() == result["stages"].keys()
    assert "| train |" in (out / "gpu_scale.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith("gpu_scale-")]  # the scratch folder is removed


def test_gpu_scale_tiny_runs_every_stage_on_cpu(tmp_path):
    result = _module().main(["--tiny", "--out", str(tmp_path)])
    _check(result, tmp_path)
    assert result["params"] < 1e6 and result["dtype"] == "float32"


def test_gpu_scale_help_works_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        _module().main(["--help"])
    assert e.value.code == 0 and "--tiny" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_scale_tiny_on_cuda_in_bf16(tmp_path):
    result = _module().main(["--tiny", "--device", "cuda", "--out", str(tmp_path)])
    _check(result, tmp_path)
    assert result["dtype"] == "bfloat16" and all("peak_gib" in r for r in result["stages"].values())
