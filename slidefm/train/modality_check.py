"""Fit a recipe to the modalities a cohort actually has, before anything is built or written.

A recipe names towers (report, expression, other omics) and contrastive pairs. A modality that is
absent from the *whole* cohort cannot feed them: its tower and every pair that names it are
dropped with one info line each, so the house recipe runs on a features-only cohort; a case
transformer that no remaining objective would train is replaced by pooling the slides. Patients
that miss a modality the cohort does have keep working as before (masked per pair). A recipe left
with no objective at all is refused, naming the files it would need.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from slidefm.errors import SlidefmError

log = logging.getLogger("slidefm.train")


def cohort_modalities(cohort) -> dict[str, bool]:
    """Which non-slide modalities the cohort provides (a table that exists and has rows)."""
    reports = cohort.reports
    present = {"report": reports is not None and len(reports) > 0, "expression": cohort.expression is not None}
    for name in cohort.omics:
        present[name] = True
    return present


def _expected_file(cohort, name: str) -> str:
    layout = cohort.layout
    if name == "report":
        return layout.display(layout.files["reports"])
    if name == "expression":
        return layout.display(layout.expression.path) if layout.expression is not None else "expression.h5ad"
    return f"cohort.yaml table '{name}'"


def fit_to_cohort(cfg: DictConfig, cohort) -> list[str]:
    """Drop towers and contrastive pairs whose modality the cohort lacks; returns the info lines.

    Mutates ``cfg`` (so the checkpoint records the model that was actually trained). Raises
    SlidefmError when no objective is left.
    """
    have = cohort_modalities(cohort)
    lines: list[str] = []
    absent: set[str] = set()
    with open_dict(cfg):
        for name, key in (("report", "report"), ("expression", "expression")):
            if cfg.model.get(key) is not None and not have.get(name, False):
                absent.add(name)
                cfg.model[key] = None
                lines.append(f"cohort has no {name} data ({_expected_file(cohort, name)} not found): "
                             f"model.{key} dropped")
        for name in list((cfg.model.get("omics") or {}).keys()):
            if not have.get(name, False):
                absent.add(name)
                del cfg.model.omics[name]
                lines.append(f"cohort has no '{name}' table: model.omics.{name} dropped")
        con = cfg.objectives.get("contrastive")
        if con is not None:
            pairs = [list(p) for p in con.pairs]
            weights = list(con.pair_weights) if con.get("pair_weights") is not None else None
            # A pair also needs its tower: a modality absent from the model config cannot be embedded.
            towers = {"slide"} | {m for m in ("report", "expression") if cfg.model.get(m) is not None} \
                | set((cfg.model.get("omics") or {}).keys())
            keep = [i for i, p in enumerate(pairs) if all(m in towers for m in p)]
            for i, p in enumerate(pairs):
                if i not in keep:
                    missing = [m for m in p if m not in towers]
                    lines.append(f"contrastive pair {p[0]}-{p[1]} dropped: no {', '.join(missing)} in this cohort")
            if not keep:
                cfg.objectives.contrastive = None
                lines.append("objectives.contrastive dropped: none of its pairs has data in this cohort")
            elif len(keep) < len(pairs):
                con.pairs = [pairs[i] for i in keep]
                if weights is not None:
                    con.pair_weights = [weights[i] for i in keep]
        # The case transformer learns only from objectives on patient embeddings (contrast, supervision).
        # Without them it would stay at its random initialisation, and every exported patient embedding
        # would be a random function of the patient's slide embeddings: pool them instead.
        if (cfg.model.get("case") is not None and cfg.objectives.get("contrastive") is None
                and cfg.objectives.get("supervised") is None):
            cfg.model.case = None
            lines.append("model.case dropped: no objective trains the patient model (no contrast, no supervision); "
                         f"patient embeddings are the {cfg.model.get('patient_pool', 'mean')} of slide embeddings")
    if not any(cfg.objectives.get(k) is not None for k in ("contrastive", "distillation", "supervised", "expert")):
        needed = sorted(absent) or ["a modality"]
        files = ", ".join(_expected_file(cohort, n) for n in needed if n != "a modality") or "reports/expression"
        raise SlidefmError(
            f"recipe '{cfg.get('recipe', '?')}' has no objective this cohort can feed: it needs {', '.join(needed)} "
            f"({files} not found); use a recipe with self-distillation (recipe=slidefm; slidefm_bags for bags without coordinates; titan, moozy_stage1)")
    for line in lines:
        log.info(line)
    return lines
