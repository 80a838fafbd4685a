"""Stability of two runs on the items both scored, with a paired bootstrap interval of the difference (b - a).

Each run's stability is against its own dense model (its samples_dense.jsonl); doc ids are resampled per task
with replacement, the same draw for both runs. Usage: python stability_paired.py RUN_A RUN_B [ITERS]
"""

import json
import sys
from pathlib import Path

import numpy as np

from llm_streamline.evaluate.stability import stability


def rows(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[(r["task"], int(r["doc_id"]))] = r
    return out


def subset(dense: dict, pruned: dict, keys: list) -> tuple[list, list]:
    d, p = [], []
    for k, (task, doc) in enumerate(keys):  # a resampled item gets a fresh doc id in both runs
        d.append({**dense[(task, doc)], "doc_id": k})
        p.append({**pruned[(task, doc)], "doc_id": k})
    return d, p


def main(a: str, b: str, iters: int = 1000) -> None:
    runs = [(rows(Path(r) / "samples_dense.jsonl"), rows(Path(r) / "samples_pruned.jsonl")) for r in (a, b)]
    shared = sorted(set(runs[0][0]) & set(runs[0][1]) & set(runs[1][0]) & set(runs[1][1]))
    by_task: dict[str, list] = {}
    for key in shared:
        by_task.setdefault(key[0], []).append(key)

    def both(keys):
        return [stability(*subset(dense, pruned, keys))["average"]["stability"] for dense, pruned in runs]

    point = both(shared)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(iters):
        keys = [ks[i] for ks in by_task.values() for i in rng.integers(0, len(ks), len(ks))]
        sa, sb = both(keys)
        diffs.append(sb - sa)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"items per task: {({t: len(k) for t, k in by_task.items()})}")
    print(f"stability (7-task mean) a {point[0]:.3f}, b {point[1]:.3f}, b - a {point[1] - point[0]:+.3f} "
          f"[{lo:+.3f}, {hi:+.3f}] (paired bootstrap, {iters} draws): "
          f"{'significant' if not lo <= 0 <= hi else 'not significant'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:]))
