"""llm-streamline: prune a redundant block of decoder layers and train a lightweight replacement."""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a model saved by llm-streamline (any replacement type). See `llm_streamline.models.saving`."""
    from llm_streamline.models.saving import load_pruned as _load

    return _load(path, **kwargs)
