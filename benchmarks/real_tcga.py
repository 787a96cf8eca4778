"""Real-data benchmark: public TCGA region features (mahmoodlab/HIPT) -> pretrain -> export -> `slidefm eval`.

Nothing is downloaded: point ``--hipt`` at a local checkout of mahmoodlab/HIPT at commit c22f0ecf
(later commits keep only Git LFS pointers)::

    git clone https://github.com/mahmoodlab/HIPT && git -C HIPT checkout c22f0ecf
    python benchmarks/real_tcga.py --hipt HIPT --work /scratch/real_tcga --runs slidefm:300 slidefm:1000

The HIPT repository is Apache-2.0 with the Commons Clause: its data are read here, none of its code
is used. What it holds and how it becomes a cohort:

* 10,678 slide bags ``3-Self-Supervised-Eval/embeddings_slide_lib/vit256mean_tcga_slide_embeddings/*.pt``:
  tensors (N, 192), one row per 4096 px region (the mean of its ViT-256 features), N = 1-254. Bags
  carry no coordinates: ``slidefm import-bags --layout raster`` lays each bag's rows on a raster in file
  order, so positions are synthetic (the house recipe's grid crops then take contiguous runs of the
  bag; 2-D position encodings see no real arrangement).
* ``tcga_wsi_labels.csv``: cancer type of every slide (33 types); all slides are pretrained on, label-free.
* ``2-Weakly-Supervised-Subtyping/dataset_csv/tcga_{lung,kidney}_subset.csv.zip``: oncotree subtype,
  survival (months, censorship), TSS site and, for lung, mutation calls (TP53).

Tasks (patient level): NSCLC subtype (LUAD/LUSC), RCC subtype (CCRCC/PRCC/CHRCC), TP53 mutation in
lung, overall survival in lung and in kidney. Each is evaluated by `slidefm eval` with linear probes
(C tuned on inner folds) and penalised Cox, with 5 patient-grouped folds (``split=patient``) and with
5 centre-grouped folds (``split=site``: every tissue source site is tested by a probe trained on other
sites; in TCGA lung and kidney each site contributes a single subtype, so random folds flatter any
model), beside mean pooling of the same features and the HIPT paper's published figures.

Output: JSON on stdout and in benchmarks/results/real_tcga.json (entries of runs not repeated are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import CPU_SCALE  # noqa: E402 - the same CPU scaling as the synthetic benchmark
ENV = dict(os.environ)
RESULTS = ROOT / "benchmarks" / "results" / "real_tcga.json"
BAGS = "3-Self-Supervised-Eval/embeddings_slide_lib/vit256mean_tcga_slide_embeddings"
LABELS = "3-Self-Supervised-Eval/embeddings_slide_lib/tcga_wsi_labels.csv"
SUBSETS = "2-Weakly-Supervised-Subtyping/dataset_csv/tcga_{}_subset.csv.zip"
# Published slide-level figures of the HIPT paper (Chen et al., CVPR 2022): AUROC with 100% of the
# training data; c-index per cancer type (our survival tasks pool LUAD+LUSC and CCRCC+PRCC+CHRCC).
PUBLISHED = {"nsclc_subtype": {"auroc": 0.952}, "rcc_subtype": {"auroc": 0.980},
             "os_lung": {"c_index_LUAD": 0.538}, "os_kidney": {"c_index_CCRCC": 0.642, "c_index_PRCC": 0.670}}
TASKS = [
    {"name": "nsclc_subtype", "kind": "classification", "level": "patient", "label": "nsclc_subtype"},
    {"name": "rcc_subtype", "kind": "classification", "level": "patient", "label": "rcc_subtype"},
    {"name": "tp53_lung", "kind": "classification", "level": "patient", "label": "tp53_lung"},
    {"name": "os_lung", "kind": "survival", "level": "patient", "time": "os_lung_months", "event": "os_lung_event"},
    {"name": "os_kidney", "kind": "survival", "level": "patient", "time": "os_kidney_months",
     "event": "os_kidney_event"},
]
PRIMARY = {"nsclc_subtype": "auroc", "rcc_subtype": "auroc", "tp53_lung": "auroc",
           "os_lung": "c_index", "os_kidney": "c_index"}


def log(msg: str) -> None:
    print(f"[real_tcga {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def task_table(hipt: Path) -> pd.DataFrame:
    """One row per labelled slide with the derived task columns (slide_id with its extension)."""
    from slidefm.cohort.importer import read_table

    rows = []
    lung = read_table(hipt / SUBSETS.format("lung"))
    lung = lung[lung["oncotree_code"].isin(["LUAD", "LUSC"])]
    rows.append(pd.DataFrame({
        "slide_id": lung["slide_id"], "case_id": lung["case_id"], "nsclc_subtype": lung["oncotree_code"],
        "tp53_lung": lung["TP53_mut"].map({0: "wt", 1: "mut", 0.0: "wt", 1.0: "mut"}),
        "os_lung_months": lung["survival_months"], "os_lung_event": 1 - lung["censorship"]}))
    kid = read_table(hipt / SUBSETS.format("kidney"))
    kid = kid[kid["oncotree_code"].isin(["CCRCC", "PRCC", "CHRCC"])]
    rows.append(pd.DataFrame({
        "slide_id": kid["slide_id"], "case_id": kid["case_id"], "rcc_subtype": kid["oncotree_code"],
        "os_kidney_months": kid["survival_months"], "os_kidney_event": 1 - kid["censorship"]}))
    return pd.concat(rows, ignore_index=True)


def build_cohort(hipt: Path, cohort: Path) -> dict:
    """The cohort (all 10,678 slides, cancer type for each, task labels where HIPT has them); kept if present."""
    import yaml

    from slidefm.cohort.importer import import_bags, read_table

    if (cohort / "slides.csv").exists():
        return {"cohort": str(cohort), "built": False}
    for rel in (BAGS, LABELS, SUBSETS.format("lung"), SUBSETS.format("kidney")):
        if not (hipt / rel).exists():
            raise SystemExit(f"{hipt / rel} not found: --hipt must be a checkout of mahmoodlab/HIPT at c22f0ecf")
    labels = read_table(hipt / LABELS).rename(columns={"label": "cancer_type"})
    t0 = time.perf_counter()
    s = import_bags(hipt / BAGS, cohort, [task_table(hipt), labels[["slide_id", "cancer_type"]]], tcga=True,
                    patient_col="case_id", layout="raster", patch_size=4096, overwrite=True)
    with open(cohort / "tasks.yaml", "w") as f:
        yaml.safe_dump({"tasks": TASKS}, f, sort_keys=False)
    log(f"cohort: {s.slides} slides, {s.patients} patients, {s.patches} regions in {time.perf_counter() - t0:.0f} s")
    return {"cohort": str(cohort), "built": True, "slides": s.slides, "patients": s.patients, "regions": s.patches}


class Refused(Exception):
    """slidefm refused the run as a user error (exit 2), e.g. a recipe this cohort cannot feed."""


def sh(cmd: list[str], log_file: Path) -> float:
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        f.write(r.stderr)
    if r.returncode == 2:
        raise Refused(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "exit 2")
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}), see {log_file}: {' '.join(cmd)}")
    return time.perf_counter() - t0


STATS = ("mean", "std", "logn", "max")


def stats_embedding(parts: list[str], cohort: Path, out: Path) -> None:
    """Hand-made patient embeddings without training: per slide the concatenation of ``parts`` of its
    features (mean, std, max per dimension; log of its row count), patients the mean over their slides.
    A reference for what the learned part must beat: other statistics of the same bags beside the mean."""
    import anndata as ad

    from slidefm.cohort import Cohort

    c = Cohort.open(cohort, store=False)
    per_slide = {}
    for sid in c.slide_ids:
        x = c.read_slide(sid).features.numpy().astype(np.float64)
        got = {"mean": x.mean(0), "std": x.std(0), "max": x.max(0), "logn": np.log([len(x)])}
        per_slide[sid] = np.concatenate([got[p] for p in parts])
    slides = c.slides.reset_index()
    by_patient = slides.groupby("patient_id")["slide_id"].apply(list)
    X = np.stack([np.mean([per_slide[s] for s in by_patient[p]], 0) for p in by_patient.index]).astype(np.float32)
    a = ad.AnnData(X, obs=pd.DataFrame(index=pd.Index(by_patient.index.astype(str), name="patient_id")))
    a.uns.update(level="patient", model="stats:" + "+".join(parts))
    tmp = out.with_name(f"{out.stem}.tmp.h5ad")
    a.write_h5ad(tmp)
    os.replace(tmp, out)


def run_model(spec: str, cohort: Path, work: Path, overrides: list[str]) -> tuple[Path, dict]:
    """Pretrain (resumes/finishes in place) and export patient embeddings for RECIPE:STEPS[:TAG].

    Paper-sized recipes get quality.py's CPU scaling (widths/depths only) so they pretrain here.
    ``stats:0:mean_std`` (parts of ``STATS`` joined by ``_``) trains nothing: :func:`stats_embedding`."""
    recipe, steps, *tag = spec.split(":")
    if recipe == "stats":
        parts = tag[0].split("_") if tag else []
        if not parts or any(p not in STATS for p in parts):
            raise SystemExit(f"real_tcga.py: stats runs are stats:0:PARTS with PARTS from {'_'.join(STATS)}")
        emb = work / "embeddings" / f"stats_{tag[0]}.h5ad"
        if not emb.exists():
            emb.parent.mkdir(parents=True, exist_ok=True)
            stats_embedding(parts, cohort, emb)
        return emb, {"recipe": "stats", "steps": 0, "overrides": [], "parts": parts}
    overrides = [*CPU_SCALE.get(recipe, []), *overrides]
    name = f"{recipe}_{steps}" + (f"_{tag[0]}" if tag else "")
    run_dir = work / "runs" / name
    emb = work / "embeddings" / f"{name}.h5ad"
    info: dict = {"recipe": recipe, "steps": int(steps), "overrides": overrides}
    logf = work / "logs" / f"{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    ck = run_dir / "checkpoints" / "last.ckpt"
    if not emb.exists():
        cmd = [sys.executable, "-m", "slidefm", "train", f"recipe={recipe}", f"data.cohort={cohort}",
               f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *overrides]
        info["train_s"] = round(sh(cmd, logf), 1)
        emb.parent.mkdir(parents=True, exist_ok=True)
        info["export_s"] = round(sh([sys.executable, "-m", "slidefm", "export", "--checkpoint", str(ck), "--cohort",
                                     str(cohort), "--out", str(emb), "--level", "patient"], logf), 1)
    return emb, info


def eval_dir(work: Path, name: str, split: str, seed: int) -> Path:
    # Seed 0 keeps the original layout, so results of earlier single-seed runs are reused.
    return work / "eval" / name / split / ("" if seed == 0 else f"seed{seed}")


def evaluate(emb: Path, cohort: Path, out: Path, split: str, seed: int, baseline: bool, logf: Path) -> pd.DataFrame:
    """`slidefm eval` on one fold assignment (``seed``); bootstrap CIs on seed 0 only (the others give means)."""
    res = out / "results.csv"
    if not res.exists():
        sh([sys.executable, "-m", "slidefm", "eval", "--embeddings", str(emb), "--cohort", str(cohort), "--out",
            str(out), "--protocols", "linear_probe", "cox", "--bootstrap", "200" if seed == 0 else "0", "--no-plots",
            "--split-by", split, "--seed", str(seed), "--model-name", "model", *([] if baseline else ["--no-baseline"])],
           logf)
    return pd.read_csv(res)


def baseline_rows(work: Path, split: str, seed: int) -> pd.DataFrame | None:
    """Mean-pooling rows for this fold assignment from any run's eval that computed them (they do not
    depend on the run), so each (split, seed) baseline is fitted once."""
    for res in sorted((work / "eval").glob(f"*/{split}/{'' if seed == 0 else f'seed{seed}/'}results.csv")):
        df = pd.read_csv(res)
        if (df["model"] == "mean_pool").any():
            return df
    return None


def learned_part(emb: Path) -> Path | None:
    """The learned columns of a ``mean_path`` embedding as an .h5ad of their own (None without a mean path):
    what the pretrained part carries without the slide's mean input beside it."""
    import anndata as ad

    a = ad.read_h5ad(emb)
    m = re.match(r"learned\[0:(\d+)\] \+ mean_input", str(a.uns.get("embedding_layout", "")))
    if not m:
        return None
    out = emb.with_name(f"{emb.stem}.learned.h5ad")
    if not out.exists():
        part = a[:, : int(m.group(1))].copy()
        part.uns["embedding_layout"] = f"learned[0:{m.group(1)}]"
        tmp = out.with_name(f"{out.stem}.tmp.h5ad")
        part.write_h5ad(tmp)
        os.replace(tmp, out)
    return out


def size_direction(part: Path, cohort: Path) -> dict:
    """How much of the learned part's leading direction is bag size: share of variance of its first principal
    component (standardised dims, all patients) and that component's correlation with log(regions per slide)."""
    import anndata as ad
    import h5py
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from slidefm.cohort import Cohort

    a = ad.read_h5ad(part)
    c = Cohort.open(cohort)
    sizes: dict[str, list[int]] = {}
    for sid in c.slide_ids:
        with h5py.File(c.slide_path(sid), "r") as f:
            sizes.setdefault(c.slides.loc[sid, "patient_id"], []).append(int(f["features"].shape[0]))
    z = StandardScaler().fit_transform(np.asarray(a.X, dtype=np.float64))
    pca = PCA(1).fit(z)
    pc1 = pca.transform(z)[:, 0]
    log_n = np.log([np.mean(sizes[p]) for p in a.obs_names])
    return {"pc1_variance_share": round(float(pca.explained_variance_ratio_[0]), 3),
            "pc1_corr_log_regions": round(float(np.corrcoef(pc1, log_n)[0, 1]), 3)}


def summarise(dfs: list[pd.DataFrame], model: str) -> dict:
    """Per task: the mean over fold seeds (``value``), each seed's figure, and seed 0's bootstrap CI."""
    out = {}
    for task, metric in PRIMARY.items():
        rs = [df[(df["task"] == task) & (df["metric"] == metric) & (df["model"] == model)] for df in dfs]
        if all(len(r) for r in rs):
            vals = [float(r["mean"].iloc[0]) for r in rs]
            out[task] = {"value": round(float(np.mean(vals)), 4), "per_seed": [round(v, 4) for v in vals],
                         "ci": [round(float(rs[0]["ci_low"].iloc[0]), 4), round(float(rs[0]["ci_high"].iloc[0]), 4)],
                         "n": int(rs[0]["n"].iloc[0])}
    return out


def write_json(doc: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # A rerun that only re-evaluates (the embedding exists) keeps the stored training times.
    runs = {**old.get("runs", {})}
    for name, r in doc.get("runs", {}).items():
        runs[name] = {**runs.get(name, {}), **r}
    doc = {**old, **doc, "runs": runs}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, RESULTS)


SEED_OVERRIDES = ("trainer.seed=", "data.seed=")


def seed_groups(runs: dict) -> dict[str, list[str]]:
    """Runs that differ only in their training seed: ``NAME`` with ``NAME[_]seedK`` whose overrides are
    NAME's plus ``trainer.seed=K`` and ``data.seed=K`` and that were evaluated on as many fold assignments.
    A run's ``seed_of`` entry names its base instead (a seed run named after a base that was later retrained).
    Groups of two or more runs, keyed by the base run's name."""
    def rest(r: dict) -> list[str]:
        return sorted(o for o in r.get("overrides", []) if not o.startswith(SEED_OVERRIDES))

    groups: dict[str, list[str]] = {}
    for name, r in runs.items():
        m = re.fullmatch(r"(.+?)_?seed(\d+)", name)
        base_name = r.get("seed_of", m.group(1) if m else None)
        base = runs.get(base_name) if m else None
        if (base is None or rest(base) != rest(r) or base.get("eval_seeds") != r.get("eval_seeds")
                or base.get("recipe") != r.get("recipe") or base.get("steps") != r.get("steps")
                or {f"trainer.seed={m.group(2)}", f"data.seed={m.group(2)}"} - set(r.get("overrides", []))):
            continue
        groups.setdefault(base_name, [base_name]).append(name)
    return {k: v for k, v in groups.items() if len(v) > 1}


def mean_pm(x: np.ndarray) -> str:
    """``x``'s mean, ± the half-width of its 95% t-interval (one observation per training run) when there
    are several."""
    from scipy.stats import t as student_t

    if len(x) < 2:
        return f"{x.mean():+.3f}"
    return f"{x.mean():+.3f} ±{student_t.ppf(0.975, len(x) - 1) / np.sqrt(len(x)) * x.std(ddof=1):.3f}"


def seed_markdown(doc: dict) -> str:
    """Per recipe run repeated with other training seeds: the mean over the runs of each task's paired Δ to
    mean pooling, ± the half-width of its 95% t-interval over the runs (each run one observation: its Δ
    averaged over the fold assignments), and how many runs are below mean pooling (a single training run
    moves survival cells by ±0.02)."""
    tasks = list(PRIMARY)
    runs = {n: r for n, r in doc.get("runs", {}).items() if "refused" not in r}
    groups = seed_groups(runs)
    if not groups:
        return ""
    lines = ["| run (with its other training seeds) | folds | runs | " + " | ".join(tasks) + " | mean Δ |",
             "|" + "---|" * (len(tasks) + 4)]
    for split in ("patient", "site"):
        for base, names in groups.items():
            if not all(split in runs[n] for n in names):
                continue
            d = np.array([[runs[n]["delta_vs_mean_pool"][split][t] for t in tasks] for n in names])
            cells = [f"{mean_pm(col)} ({int((col < 0).sum())} below)" for col in d.T]
            lines.append(f"| `{base}` | {split} | {len(names)} | " + " | ".join(cells) + f" | {mean_pm(d.mean(1))} |")
    return "\n".join(lines)


# The README's headline rows: each recipe as shipped (no overrides but the training seed), with the runs that
# repeat it under other training seeds folded into one row. (Runs named *_pooled / *_pf are the recipes after
# the fixes their rounds made; the full table keeps every run of every round.)
HEADLINE = ["slidefm_300_pooled", "slidefm_1000_pooled", "slidefm_4000_pooled", "slidefm_bags_1000_pf",
            "slidefm_bags_4000_pf", "titan_300", "moozy_stage1_300", "threads_300", "mstar_300"]


def headline_markdown(doc: dict, names: list[str] = HEADLINE) -> str:
    """One row per headline recipe and fold type: figures averaged over its training runs (mean pooling's on the
    same fold assignments), Δ to mean pooling averaged over the runs, ± the half-width of a 95% t-interval over
    them where there are several. Refused recipes are listed under the table."""
    tasks = list(PRIMARY)
    runs = doc.get("runs", {})
    groups = seed_groups({n: r for n, r in runs.items() if "refused" not in r})
    lines = ["| recipe | steps | folds | runs | " + " | ".join(tasks) + " | mean Δ |", "|" + "---|" * (len(tasks) + 5)]
    refused = []
    for split in ("patient", "site"):
        first = next((runs[n] for n in names if n in runs and split in runs[n]), None)
        if first is not None:  # every headline run is evaluated on the same fold assignments: one baseline
            base = [first[split][t]["value"] - first["delta_vs_mean_pool"][split][t] for t in tasks]
            lines.append(f"| mean pooling | | {split} | | " + " | ".join(f"{v:.3f}" for v in base) + " | |")
        for name in names:
            r = runs.get(name)
            if r is None:
                continue
            if "refused" in r:
                if split == "patient":
                    refused.append(f"`{r.get('recipe', name)}`: refused ({r['refused']})")
                continue
            members = [n for n in groups.get(name, [name]) if split in runs[n]]
            if not members:
                continue
            vals = np.array([[runs[n][split][t]["value"] for t in tasks] for n in members])
            d = np.array([[runs[n]["delta_vs_mean_pool"][split][t] for t in tasks] for n in members])
            cells = [f"{v:.3f} ({mean_pm(c)})" for v, c in zip(vals.mean(0), d.T)]
            lines.append(f"| `{r['recipe']}` | {r['steps']:,} | {split} | {len(members)} | " + " | ".join(cells)
                         + f" | {mean_pm(d.mean(1))} |")
    return "\n".join(lines) + "".join("\n\n" + line for line in refused)


def markdown(doc: dict) -> str:
    """The README table: per split, runs grouped by how many fold assignments they were evaluated on,
    each group under its own mean-pooling row (on the same assignments); deltas in brackets."""
    tasks = list(PRIMARY)
    lines = ["| embedding | folds | assignments | " + " | ".join(tasks) + " | mean Δ |", "|" + "---|" * (len(tasks) + 4)]
    runs = {n: r for n, r in doc.get("runs", {}).items() if "refused" not in r}
    for split in ("patient", "site"):
        groups: dict[int, list[str]] = {}
        for name, r in runs.items():
            if split in r:
                groups.setdefault(int(r.get("eval_seeds", 1)), []).append(name)
        for n_seeds in sorted(groups, reverse=True):
            first = runs[groups[n_seeds][0]]
            # The baseline of a group is recovered from any of its runs: value - paired delta.
            base = [first[split][t]["value"] - first["delta_vs_mean_pool"][split][t] for t in tasks]
            lines.append(f"| mean pooling | {split} | {n_seeds} | " + " | ".join(f"{v:.3f}" for v in base) + " | |")
            for name in groups[n_seeds]:
                r = runs[name]
                d = r["delta_vs_mean_pool"][split]
                cells = [f"{r[split][t]['value']:.3f} ({d[t]:+.3f})" for t in tasks]
                lines.append(f"| `{name}` | {split} | {n_seeds} | " + " | ".join(cells)
                             + f" | {np.mean(list(d.values())):+.3f} |")
    for name, r in doc.get("runs", {}).items():
        if "refused" in r:
            lines.append(f"\n`{name}`: refused ({r['refused']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hipt", type=Path, help="local checkout of mahmoodlab/HIPT at c22f0ecf")
    ap.add_argument("--work", type=Path, help="working directory (cohort, runs, embeddings, evals)")
    ap.add_argument("--runs", nargs="*", default=["slidefm:300", "slidefm:1000"],
                    help="RECIPE:STEPS[:TAG] to pretrain label-free, export and evaluate")
    ap.add_argument("--splits", nargs="+", default=["patient", "site"], choices=["patient", "site"])
    ap.add_argument("--override", action="append", default=[],
                    help="extra Hydra override for every run, e.g. model.input_norm=none (use TAG to name variants)")
    ap.add_argument("--eval-seeds", type=int, default=3,
                    help="fold assignments (eval seeds 0..N-1) each embedding is evaluated on; figures are their "
                         "mean and deltas are paired per seed (centre-held-out folds move a lot with the seed)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/BLAS threads per step (bags are tiny: 1 thread is fastest on a busy CPU)")
    ap.add_argument("--parts", action="store_true",
                    help="also evaluate the learned part of mean_path embeddings alone (fold assignment 0)")
    ap.add_argument("--seed-of", metavar="BASE", help="these runs repeat the stored run BASE with other training "
                    "seeds (--override trainer.seed=K --override data.seed=K); needed only where BASE is not the run's "
                    "name without its seedK (e.g. a base retrained under a new name). Recorded as the run's seed_of")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the stored results and exit")
    args = ap.parse_args(argv)
    if args.seed_of is not None:
        stored = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.exists() else {}
        if args.seed_of not in stored or "refused" in stored[args.seed_of]:
            ap.error(f"--seed-of {args.seed_of}: no such run in {RESULTS}")
    if args.table:
        if not RESULTS.exists():
            ap.error(f"{RESULTS} not found: run the benchmark first")
        doc = json.loads(RESULTS.read_text())
        print("Headline (each recipe as shipped; AUROC / c-index averaged over its training runs, Δ to mean pooling "
              "± the half-width of a 95% t-interval over the runs):\n\n" + headline_markdown(doc) + "\n\nEvery run:\n")
        print(markdown(doc))
        seeds = seed_markdown(doc)
        if seeds:
            print("\nRepeated with other training seeds (Δ averaged over the runs ± the half-width of its 95% "
                  "t-interval over them; how many runs are below mean pooling):\n\n" + seeds)
        return 0
    if args.hipt is None or args.work is None:
        ap.error("--hipt and --work are required (except with --table)")
    ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    work = args.work.resolve()
    cohort = work / "cohort"
    doc: dict = {"machine": f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per run", "hipt": str(args.hipt), "published_hipt": PUBLISHED,
                 "tasks": {t["name"]: PRIMARY[t["name"]] for t in TASKS}}
    doc["cohort"] = build_cohort(args.hipt.resolve(), cohort)
    runs: dict = {}
    for spec in args.runs:
        try:
            emb, info = run_model(spec, cohort, work, args.override)
        except Refused as e:
            runs[spec.replace(":", "_")] = {"recipe": spec.split(":")[0], "refused": str(e)}
            log(f"{spec}: refused: {e}")
            continue
        name = emb.stem
        deltas = {}
        for split in args.splits:
            dfs, bases = [], []
            for seed in range(args.eval_seeds):
                base = baseline_rows(work, split, seed)
                df = evaluate(emb, cohort, eval_dir(work, name, split, seed), split, seed, base is None,
                              work / "logs" / f"{name}.log")
                dfs.append(df)
                bases.append(df if base is None else base)
            info[split] = summarise(dfs, "model")
            doc.setdefault("mean_pool", {})[split] = summarise(bases, "mean_pool")
            # Paired: each seed's model figure minus mean pooling on the same folds, then averaged.
            per = {t: [round(m - b, 4) for m, b in zip(info[split][t]["per_seed"],
                                                       doc["mean_pool"][split][t]["per_seed"])]
                   for t in info[split] if t in doc["mean_pool"][split]}
            deltas[split] = {t: round(float(np.mean(v)), 4) for t, v in per.items()}
            info.setdefault("delta_per_seed", {})[split] = per
        info["delta_vs_mean_pool"] = deltas
        part = learned_part(emb) if args.parts else None
        if part is not None:  # fold assignment 0 only: a diagnostic, not a row of the table
            info["learned_only"] = {
                split: {t: v["value"] for t, v in summarise([evaluate(
                    part, cohort, eval_dir(work, f"{name}.learned", split, 0), split, 0, False,
                    work / "logs" / f"{name}.log")], "model").items()} for split in args.splits}
            info["learned_only"]["size"] = size_direction(part, cohort)
        info["eval_seeds"] = args.eval_seeds
        if args.seed_of is not None:
            info["seed_of"] = args.seed_of
        info["mean_delta"] = round(float(np.mean([v for d in deltas.values() for v in d.values()])), 4)
        runs[name] = info
        log(f"{name}: {json.dumps(info)}")
    doc["runs"] = runs
    write_json(doc)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
