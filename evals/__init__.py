"""Evaluation suite: linear/few-shot/k-NN/zero-shot probes, Cox survival, retrieval, site robustness, reports.

``evaluate(embeddings, cohort, tasks=None, out=None, config=EvalConfig(), text_encoder=None)`` runs every
protocol on the embeddings and on the mean-pool baseline; see docs/evaluation.md.
"""

from .config import PROTOCOLS, EvalConfig
from .evaluate import COLUMNS, EvalResult, evaluate

__all__ = ["evaluate", "EvalConfig", "EvalResult", "COLUMNS", "PROTOCOLS"]
