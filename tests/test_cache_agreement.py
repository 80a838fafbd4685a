"""Under torchrun every rank makes the stage cache's decision the main rank makes (`recipes.common.main_rank_looks`):
two gloo processes with a stage cache each (as nodes with node-local caches) reuse or recompute the trained
replacement (and the least-squares fit before it) and LoRA adapters together, whatever the other rank's cache
holds. Before the main rank decided, the rank whose cache lacked an entry went into the fit's all-reduce while the
other loaded and went on: a collective never joined (here a 20 s timeout; 6 h in a run)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from test_distributed import _torchrun  # noqa: E402


def test_ranks_with_different_stage_caches_take_the_main_ranks_branch(tmp_path):
    """Four passes over the same stages (fresh; entries in rank 0's cache only; rank 1's copy damaged; rank 0's
    damaged): both ranks train in the first and last, load in the two others, and end with the same weights every
    time. Rank 1 never reads its cache (its damaged copy is not even moved aside)."""
    with socket.socket() as s:  # a free port: a fixed one collides with the same test run elsewhere on the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _torchrun(port, [str(HERE / "cache_agree_worker.py"), str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # the same branch, weights, training and healing logs on both ranks
    fresh = r0["fresh"]
    trained = {"fresh": True, "rank0_only": False, "damaged_on_rank1": False, "damaged_on_rank0": True}
    for name, retrained in trained.items():
        assert r0[name]["trained"] == (["train_mse", "train_lora"] if retrained else []), name
        assert {k: v for k, v in r0[name].items() if k != "trained"} == \
            {k: v for k, v in fresh.items() if k != "trained"}, name  # loaded or trained again: the same bytes
    assert fresh["train"]["steps"] == 2 and fresh["heal"]["steps"] >= 1
    aside = sorted(p.name.split(".corrupt-")[0] for p in (tmp_path / "stages0").iterdir() if ".corrupt-" in p.name)
    assert len(aside) == 2 and aside[0] == "lora-agree" and aside[1].startswith("train-")
    assert not any(".corrupt-" in p.name for p in (tmp_path / "stages1").iterdir())
