"""RankMe (Garrido et al. 2023): smooth effective rank of an embedding matrix, a label-free collapse monitor."""

from __future__ import annotations

import torch


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy of normalised singular values); 1 = collapsed, min(n, d) = full rank."""
    z = embeddings.detach().float()
    if z.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals(z)
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
