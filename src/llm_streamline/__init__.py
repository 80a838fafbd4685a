"""llm-streamline: prune a redundant block of decoder layers and train a lightweight replacement."""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a model saved by llm-streamline (any format). See `llm_streamline.models.checkpoints`."""
    from llm_streamline.models.checkpoints import load_pruned as _load

    return _load(path, **kwargs)
