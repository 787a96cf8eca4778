"""slidefm: train multi-modal slide- and patient-level foundation models on precomputed patch features."""

__version__ = "0.1.0"


def load(checkpoint, device="cpu"):
    """Load a trained checkpoint as an :class:`slidefm.api.Encoder` (see ``slidefm.api``)."""
    from slidefm.api import Encoder

    return Encoder.load(checkpoint, device=device)


__all__ = ["__version__", "load"]
