"""llm-streamline: prune a redundant block of decoder layers and train a lightweight replacement."""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a model saved by llm-streamline (any format). See `llm_streamline.models.checkpoints`."""
    from llm_streamline.models.checkpoints import load_pruned as _load

    return _load(path, **kwargs)


def compose(overrides=()):
    """The run's config (a validated `RunConfig`) from the command line's overrides. See `llm_streamline.api`."""
    from llm_streamline.api import compose as _compose

    return _compose(overrides)


def run(cfg, out_dir=None):
    """Run a composed config, as `llm-streamline` does; returns its record (`record.RunRecord`). See `api`."""
    from llm_streamline.api import run as _run

    return _run(cfg, out_dir)
