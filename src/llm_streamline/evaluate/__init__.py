"""Evaluation: offline lm-eval tasks (`tasks`), scoring with per-item rows (`harness`), the stability
metric (`stability`), token perplexity (`perplexity`), FLOPs and throughput (`speed`), and the
prefix-sharing scorer (`fast_hflm`). Submodules are imported on demand (lm-eval is slow to import)."""
