"""The built-in baseline: each slide's mean patch feature ("mean_pool"), cached as an .h5ad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.io_utils import atomic_path


def mean_pool_adata(cohort, cache: str | Path | None = None):
    """AnnData (obs = slide_id, obs.patient_id, uns.level = 'slide') of mean-pooled patch features.

    A cache file is reused when it lists exactly the cohort's slides with its feature width.
    """
    import anndata

    slide_ids = [str(s) for s in cohort.slide_ids]
    if cache is not None and Path(cache).exists():
        ad = anndata.read_h5ad(cache)
        if list(ad.obs_names) == slide_ids and ad.n_vars == cohort.feature_dim:
            return ad
    X = np.stack([np.asarray(cohort.read_slide(s).features, np.float64).mean(axis=0) for s in slide_ids])
    obs = pd.DataFrame({"patient_id": cohort.slides.loc[slide_ids, "patient_id"].astype(str).to_numpy()},
                       index=pd.Index(slide_ids, name="slide_id"))
    ad = anndata.AnnData(X=X.astype(np.float32), obs=obs)
    ad.uns["level"] = "slide"
    ad.uns["model"] = "mean_pool"
    if cache is not None:
        with atomic_path(cache) as tmp:
            ad.write_h5ad(tmp)
    return ad
