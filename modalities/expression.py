"""Expression/omics preprocessing lives in :mod:`slidefm.data.expression` (fitted data state, not a model);
re-exported here for the names the modalities package has always offered."""

from slidefm.data.expression import UNITS, ExpressionTransform, GeneMismatchWarning, preprocess

__all__ = ["UNITS", "ExpressionTransform", "GeneMismatchWarning", "preprocess"]
