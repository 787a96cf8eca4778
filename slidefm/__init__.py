"""slidefm: train multi-modal slide- and patient-level foundation models on precomputed patch features."""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# pyproject.toml maps these top-level folders of the repository into the namespace (PyPI already has
# packages called `modalities` and `evals`).
MAPPED_SUBPACKAGES = ("modalities", "objectives", "recipes", "evals")


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    """Resolves ``slidefm.<mapped>`` to ``<repo>/<mapped>`` when slidefm is imported from a source checkout.

    ``python -m slidefm`` run from the repository root imports ./slidefm rather than the installed package,
    and there the mapped folders sit beside the package instead of inside it.
    """

    def __init__(self, root: str):
        self.dirs = {f"{__name__}.{n}": os.path.join(root, n) for n in MAPPED_SUBPACKAGES}

    def find_spec(self, name, path=None, target=None):
        d = self.dirs.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                      submodule_search_locations=[d])


def _source_checkout_finder() -> "_SourceCheckoutFinder | None":
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "evals")):  # installed layout: the mapped packages are inside
        return None
    if not all(os.path.isfile(os.path.join(root, n, "__init__.py")) for n in MAPPED_SUBPACKAGES):
        return None
    return _SourceCheckoutFinder(root)


_finder = _source_checkout_finder()
if _finder is not None and not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(_finder)


def load(checkpoint, device="cpu", weights="student"):
    """Load a trained checkpoint as an :class:`slidefm.api.Encoder` (see ``slidefm.api``); ``weights="teacher"``
    takes masked self-distillation's EMA teacher as the slide encoder."""
    from slidefm.api import Encoder

    return Encoder.load(checkpoint, device=device, weights=weights)


__all__ = ["__version__", "load"]
