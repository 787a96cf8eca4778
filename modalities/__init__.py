"""Non-slide modalities: report-text encoder, omics transforms (expression, mutations, proteins) and
their encoders, all registered in ``MODALITY_ENCODERS``.

Heavy libraries (transformers, scanpy) are imported only when a model is loaded or a transform is
fitted, so importing this package stays cheap.
"""

from slidefm.modalities.base import MODALITY_ENCODERS, build_modality_encoder
from slidefm.modalities.expression import UNITS, ExpressionTransform, GeneMismatchWarning, preprocess
from slidefm.modalities.tabular import (
    GenesetTransformerConfig,
    GenesetTransformerEncoder,
    MLPEncoder,
    MLPEncoderConfig,
    SNNEncoder,
    SNNEncoderConfig,
)
from slidefm.modalities.text import (
    TextEmbeddingCache,
    TextEncoder,
    TextEncoderConfig,
    check_text_model_dir,
    default_text_model_dir,
    find_encoder_layers,
    model_dir_identity,
)

__all__ = [
    "MODALITY_ENCODERS", "build_modality_encoder",
    "ExpressionTransform", "GeneMismatchWarning", "UNITS", "preprocess",
    "MLPEncoder", "MLPEncoderConfig", "SNNEncoder", "SNNEncoderConfig",
    "GenesetTransformerEncoder", "GenesetTransformerConfig",
    "TextEncoder", "TextEncoderConfig", "TextEmbeddingCache", "check_text_model_dir", "default_text_model_dir",
    "find_encoder_layers", "model_dir_identity",
]
