"""Hydra configs. Installed as the package `llm_streamline.conf` (see pyproject.toml); Hydra's pkg:// search path
needs this file to import it."""
