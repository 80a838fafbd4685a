"""Token counts of the offline evaluation tasks, as `plan.TASK_TOKENS` holds them: per task, over its whole offline
split, the items, options per item, distinct contexts per item, and the mean context / continuation tokens (the
embedded SmolLM2 tokenizer), from lm-eval's own requests (no model runs).

    python benchmarks/task_tokens.py piqa hellaswag winogrande arc_easy arc_challenge boolq openbookqa mmlu \
        synthetic_cloze
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def main(names: list[str]) -> None:
    from llm_streamline.evaluate.tasks import build_tasks, leaf_tasks
    from llm_streamline.models.loading import embedded_tokenizer

    tok = embedded_tokenizer()
    for name, task in leaf_tasks(build_tasks(names, offline=True)).items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        by_doc = defaultdict(list)
        for inst in task.instances:
            ctx, cont = inst.arguments[0], inst.arguments[1]
            by_doc[inst.doc_id].append((len(tok(ctx)["input_ids"]), len(tok(cont)["input_ids"]), ctx))
        docs = list(by_doc.values())
        row = (len(docs), statistics.mean(len(d) for d in docs), statistics.mean(len({c[2] for c in d}) for d in docs),
               statistics.mean(statistics.mean(c[0] for c in d) for d in docs),
               statistics.mean(statistics.mean(c[1] for c in d) for d in docs))
        print(f'    "{name}": ({row[0]}, {row[1]:.3g}, {row[2]:.3g}, {row[3]:.1f}, {row[4]:.1f}),', flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"])
