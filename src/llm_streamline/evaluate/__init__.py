"""Evaluation: offline lm-eval tasks (`tasks`), scoring with per-item rows (`harness`), the stability
metric (`stability`), token perplexity (`perplexity`), FLOPs and throughput (`speed`), and the two
scorers: stock HFLM that records what the rows need (`recording`) and the prefix-sharing one built on it
(`fast_hflm`). Submodules are imported on demand (lm-eval is slow to import)."""
