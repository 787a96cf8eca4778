"""Synthetic cohort with planted, documented biology (see docs/synthetic-cohort.md).

Everything shared between cohorts (region prototypes, subtype directions, stain directions, the
sites with their offsets, scanners and label mixes, gene modules) comes from ``world_seed`` and the
feature width, so cohorts generated with different ``seed`` live in the same feature space and a
model trained on one can be evaluated on another. Patients draw from their own random streams
keyed by (seed, patient index): a cohort of 100 patients is the first 100 patients of a cohort of
200 with the same seed.

The output follows the cohort contract (slides.csv, features/*.h5, reports.csv, expression.h5ad,
clinical.csv, tasks.yaml, cohort.yaml) plus a ``truth/`` folder with the latent variables
(region of every patch, slide-level composition) that the contract has no place for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from scipy import ndimage

from slidefm.errors import SlidefmError
from slidefm.io_utils import atomic_path

REGIONS = ("stroma", "tumour", "immune", "necrosis", "normal", "fat", "rare")
STROMA, TUMOUR, IMMUNE, NECROSIS, NORMAL, FAT, RARE = range(len(REGIONS))
SUBTYPES = ("acinar", "solid", "papillary")
IMMUNE_PATTERNS = ("excluded", "infiltrated")
RARE_STATES = ("absent", "present")
TARGET_MAGNIFICATION = 20

# Per-site scanner geometry, cycled when there are more sites than rows:
# (scanner, level0_magnification, patch_size at 20x, overlap in px at 20x as TRIDENT stores it).
_SITE_GEOMETRY = (
    ("Aperio GT450", 40, 256, 0),
    ("Hamamatsu S360", 20, 256, 0),
    ("3DHistech P1000", 40, 224, 56),
    ("Leica AT2", 20, 256, 32),
)
# Subtype prevalence per site (acinar, solid, papillary) for the first four sites; Dirichlet beyond.
_SITE_SUBTYPE_MIX = ((0.6, 0.25, 0.15), (0.2, 0.6, 0.2), (0.25, 0.25, 0.5), (0.34, 0.33, 0.33))
_SITE_WEIGHTS = (0.35, 0.25, 0.25, 0.15)
# P(grade | subtype): solid tumours are higher grade, so grade is partly visible through subtype.
_GRADE_GIVEN_SUBTYPE = ((0.45, 0.4, 0.15), (0.1, 0.35, 0.55), (0.3, 0.5, 0.2))

# Feature model magnitudes (in units where a region prototype has norm 1).
_SUBTYPE_SHIFT = 0.35  # tumour prototype moves this far along the subtype direction
_ATYPIA_PER_GRADE = 0.12
_ATYPIA_PATIENT_SCALE = 0.1  # patient-level atypia not explained by grade
_PATIENT_TUMOUR_SCALE = 0.7  # every patient's tumour is unique: isotropic shift of its prototype (norm)
_SLIDE_SCALE = 0.5  # isotropic per-slide offset (processing), norm
_WITHIN_RANK = 8
_WITHIN_SCALE = 0.4  # low-rank within-region variation (norm)
_NOISE_SCALE = 0.3  # isotropic token noise (norm)
_STAIN_SCALE = 0.15  # per-slide stain offset along each of 3 random directions
_STAIN_RARE_SCALE = 0.12  # per-slide stain offset along the mean-pool rare direction

# Survival: Weibull proportional hazards.
_WEIBULL_SHAPE = 1.3
_WEIBULL_SCALE = 53.0  # months; median ~40 at linear predictor 0
_BETA_SUBTYPE = (0.0, 0.5, -0.3)
_BETA_GRADE = 0.45  # per grade step around grade 2
_BETA_INFILTRATED = -0.6
_BETA_RARE = 0.7
_BETA_AGE = 0.02  # per year around 65


@dataclass
class SynthConfig:
    """Parameters of ``slidefm synth``; defaults give ~270 slides of ~300-1500 patches."""

    patients: int = field(default=200, metadata={"help": "number of patients"})
    seed: int = field(default=0, metadata={"help": "cohort seed: patients, layouts, noise"})
    dim: int = field(default=256, metadata={"help": "patch feature width D"})
    world_seed: int = field(
        default=0,
        metadata={"help": "seed of the shared biology (prototypes, sites, gene modules); keep it fixed "
                          "to compare cohorts generated with different --seed"},
    )
    sites: int = field(default=4, metadata={"help": "number of centres (scanner, stain, label mix)"})
    site_strength: float = field(default=1.0, metadata={"help": "norm of the per-site feature offset"})
    site_effect: str = field(default="realistic", metadata={
        "help": "realistic: per-site shift + tissue-dependent shifts + low-rank linear distortion, scaled per "
                "slide (staining batches), so per-slide centring cannot remove it | additive: one shift per site"})
    min_side: int = field(default=22, metadata={"help": "smallest tissue bounding box side in patches"})
    max_side: int = field(default=46, metadata={"help": "largest tissue bounding box side in patches"})
    multi_slide_fraction: float = field(default=0.3, metadata={"help": "patients with 2-3 slides"})
    rare_prevalence: float = field(default=0.4, metadata={"help": "patients with a rare focus"})
    missing_report_fraction: float = field(default=0.15, metadata={"help": "patients without report"})
    missing_expression_fraction: float = field(default=0.15, metadata={"help": "patients without expression"})
    genes: int = field(default=2000, metadata={"help": "number of genes in expression.h5ad"})


# ----------------------------------------------------------------------------------------- world


@dataclass(frozen=True)
class Site:
    name: str
    scanner: str
    level0_magnification: int
    patch_size: int  # px at the target magnification
    overlap: int  # px at the target magnification (TRIDENT convention)
    patch_size_level0: int
    stride_level0: int
    offset: np.ndarray  # (D,) feature offset
    gain: float  # multiplies the biological part of every feature
    subtype_mix: tuple[float, float, float]
    weight: float
    gene_batch: np.ndarray  # (genes,) log fold change of the site's expression batch effect
    # Realistic site effects (site_effect="realistic"): stain and scanner act on tissue, not as one shift.
    region_offset: np.ndarray  # (len(REGIONS), D) tissue-dependent shift (stain uptake differs by tissue)
    mix_u: np.ndarray  # (D, r) with mix_v: a low-rank linear distortion x -> x + mix_u @ (mix_v.T @ x)
    mix_v: np.ndarray  # (D, r)


@dataclass(frozen=True)
class World:
    """Shared biology and feature space; a function of (world_seed, dim, sites, genes) only."""

    dim: int
    prototypes: np.ndarray  # (len(REGIONS), D), unit norm
    subtype_dirs: np.ndarray  # (3, D)
    atypia_dir: np.ndarray  # (D,)
    within_bases: np.ndarray  # (len(REGIONS), rank, D)
    stain_dirs: np.ndarray  # (3, D) random stain directions
    stain_rare_dir: np.ndarray  # (D,) unit direction of the rare region's mean-pool footprint
    sites: tuple[Site, ...]
    gene_names: tuple[str, ...]
    gene_modules: tuple[str, ...]  # module of each gene
    gene_base: np.ndarray  # (genes,) baseline log abundance
    gene_dispersion: np.ndarray  # (genes,) negative-binomial dispersion

    def subtype_prototype(self, subtype: int) -> np.ndarray:
        return self.prototypes[TUMOUR] + _SUBTYPE_SHIFT * self.subtype_dirs[subtype]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _gene_layout(n_genes: int) -> list[tuple[str, int]]:
    """Gene modules as contiguous blocks; the remainder is background."""
    mods = [("housekeeping", 100)] + [(f"subtype_{s}", 60) for s in SUBTYPES] + [
        ("immune", 80), ("proliferation", 60), ("hypoxia", 50), ("stromal", 60)]
    total = sum(n for _, n in mods)
    if n_genes < total + 10:
        # Shrink modules proportionally so small test cohorts keep every module.
        scale = max(n_genes - 10, len(mods)) / total
        mods = [(m, max(1, int(n * scale))) for m, n in mods]
        total = sum(n for _, n in mods)
    return mods + [("background", n_genes - total)]


def make_world(dim: int, world_seed: int = 0, sites: int = 4, genes: int = 2000) -> World:
    """Build the shared biology. Each component has its own stream so adding sites or genes
    leaves the prototypes unchanged."""

    def rng(*key: int) -> np.random.Generator:
        return np.random.default_rng([world_seed, 100, *key])

    protos = np.stack([_unit(rng(1, r).standard_normal(dim)) for r in range(len(REGIONS))])
    # The rare region looks like an atypical tumour variant, not an unrelated tissue.
    protos[RARE] = _unit(0.5 * protos[TUMOUR] + 0.87 * protos[RARE])
    subtype_dirs = np.stack([_unit(rng(2, k).standard_normal(dim)) for k in range(len(SUBTYPES))])
    atypia = _unit(rng(3).standard_normal(dim))
    within = np.stack([rng(4, r).standard_normal((_WITHIN_RANK, dim)) / math.sqrt(dim * _WITHIN_RANK)
                       for r in range(len(REGIONS))]) * _WITHIN_SCALE
    stain = np.stack([_unit(rng(5, k).standard_normal(dim)) for k in range(3)])
    # Rare patches replace stroma (see _counts), so this is the direction they move the mean in.
    stain_rare = _unit(protos[RARE] - protos[STROMA])

    layout = _gene_layout(genes)
    modules = tuple(m for m, n in layout for _ in range(n))
    names = tuple(f"G{i:05d}" for i in range(genes))
    grng = rng(6)
    base = grng.normal(0.0, 1.5, genes)
    hk = np.array([m == "housekeeping" for m in modules])
    base[hk] += 3.0
    disp = np.exp(grng.normal(math.log(0.15), 0.5, genes))
    disp[hk] = 0.02

    site_list = []
    for k in range(sites):
        srng = rng(7, k)
        scanner, mag, ps, ov = _SITE_GEOMETRY[k % len(_SITE_GEOMETRY)]
        scale = mag // TARGET_MAGNIFICATION
        mix = _SITE_SUBTYPE_MIX[k] if k < len(_SITE_SUBTYPE_MIX) else tuple(srng.dirichlet([2.0] * 3))
        weight = _SITE_WEIGHTS[k] if k < len(_SITE_WEIGHTS) else 0.2
        site_list.append(Site(
            name=f"site_{chr(ord('A') + k) if k < 26 else k}",
            scanner=scanner,
            level0_magnification=mag,
            patch_size=ps,
            overlap=ov,
            patch_size_level0=ps * scale,
            stride_level0=(ps - ov) * scale,
            offset=_unit(srng.standard_normal(dim)),
            gain=float(srng.uniform(0.85, 1.15)),
            subtype_mix=tuple(float(x) for x in mix),
            weight=float(weight),
            gene_batch=srng.normal(0.0, 0.2, genes),
            **_site_distortion(dim, k, world_seed),
        ))
    return World(dim, protos, subtype_dirs, atypia, within, stain, stain_rare, tuple(site_list),
                 names, modules, base, disp)


# ------------------------------------------------------------------------------------ patients


@dataclass
class Patient:
    patient_id: str
    site: int
    subtype: int
    grade: int  # 1..3
    infiltrated: bool
    rare: bool
    age: int
    sex: str
    fractions: dict[int, float]  # patient-level composition centre
    tumour_shift: np.ndarray  # (D,) patient-specific offset of the tumour prototype
    atypia: float  # position of the tumour along the atypia direction
    p_inside: float  # fraction of immune patches inside tumour nests
    n_slides: int
    rare_slides: tuple[int, ...]
    os_months: float
    os_event: int
    has_report: bool
    has_expression: bool


def _simulate_patient(world: World, cfg: SynthConfig, i: int) -> Patient:
    rng = np.random.default_rng([cfg.seed, 1, i])
    weights = np.array([s.weight for s in world.sites])
    site = int(rng.choice(len(world.sites), p=weights / weights.sum()))
    subtype = int(rng.choice(3, p=world.sites[site].subtype_mix))
    grade = int(rng.choice(3, p=_GRADE_GIVEN_SUBTYPE[subtype])) + 1
    # Immune pattern and rare focus are independent of site, subtype and grade: nothing but their
    # own planted signal can predict them.
    infiltrated = bool(rng.random() < 0.5)
    rare = bool(rng.random() < cfg.rare_prevalence)
    age = int(np.clip(round(rng.normal(65, 10)), 30, 90))
    sex = "F" if rng.random() < 0.5 else "M"
    fr = {
        TUMOUR: rng.uniform(0.25, 0.45) + 0.05 * (grade - 2),
        IMMUNE: rng.uniform(0.06, 0.14),
        NECROSIS: rng.uniform(*((0.0, 0.01), (0.01, 0.04), (0.03, 0.08))[grade - 1]),
        NORMAL: rng.uniform(0.0, 0.12),
        FAT: rng.uniform(0.0, 0.06),
        RARE: rng.uniform(0.015, 0.03),
    }
    p_inside = rng.uniform(0.65, 0.95) if infiltrated else rng.uniform(0.0, 0.25)
    # Own stream, so that labels, survival and layouts do not change with --dim.
    shift_rng = np.random.default_rng([cfg.seed, 5, i])
    tumour_shift = shift_rng.standard_normal(world.dim) * (_PATIENT_TUMOUR_SCALE / math.sqrt(world.dim))
    atypia = _ATYPIA_PER_GRADE * (grade - 2) + _ATYPIA_PATIENT_SCALE * rng.standard_normal()
    n_slides = 1
    if rng.random() < cfg.multi_slide_fraction:
        n_slides = 2 if rng.random() < 0.67 else 3
    rare_slides: tuple[int, ...] = ()
    if rare:
        # A focus is small: one section always shows it, further sections only sometimes.
        first = int(rng.integers(n_slides))
        rare_slides = tuple(j for j in range(n_slides) if j == first or rng.random() < 0.5)

    eta = (_BETA_SUBTYPE[subtype] + _BETA_GRADE * (grade - 2) + _BETA_INFILTRATED * infiltrated
           + _BETA_RARE * rare + _BETA_AGE * (age - 65))
    t_event = _WEIBULL_SCALE * (-math.log(1.0 - rng.random()) * math.exp(-eta)) ** (1.0 / _WEIBULL_SHAPE)
    t_cens = min(rng.uniform(24.0, 120.0), rng.exponential(200.0))  # end of follow-up, drop-out
    os_months = max(round(min(t_event, t_cens), 1), 0.1)
    os_event = int(t_event <= t_cens)
    has_report = bool(rng.random() >= cfg.missing_report_fraction)
    has_expression = bool(rng.random() >= cfg.missing_expression_fraction)
    return Patient(f"P{i:05d}", site, subtype, grade, infiltrated, rare, age, sex, fr, tumour_shift,
                   float(atypia), float(p_inside),
                   n_slides, rare_slides, os_months, os_event, has_report, has_expression)


# -------------------------------------------------------------------------------------- slides


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def _tissue_mask(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """An irregular elliptical blob with a few small holes, (rows, cols) boolean."""
    side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    w, h = side, max(8, int(round(side * rng.uniform(0.7, 1.0))))
    if rng.random() < 0.5:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    dx, dy = (xx - (w - 1) / 2) / (w / 2), (yy - (h - 1) / 2) / (h / 2)
    theta = np.arctan2(dy, dx)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius += rng.uniform(0.0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mask = np.hypot(dx, dy) <= radius
    holes = _smooth_field(rng, (h, w), 1.2)
    mask &= holes > np.quantile(holes[mask], 0.03)
    return mask


def _counts(fr: dict[int, float], n: int, rare: bool) -> dict[int, int]:
    counts = {r: int(round(f * n)) for r, f in fr.items()}
    counts[RARE] = max(3, counts[RARE]) if rare else 0
    counts[STROMA] = n - sum(counts.values())
    if counts[STROMA] < 0:  # only for tiny tissue; keep counts exact by taking from tumour
        counts[TUMOUR] += counts[STROMA]
        counts[STROMA] = 0
    return counts


def _take(candidates: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """The k candidates (flat indices) with the highest score; stable under ties."""
    if k <= 0:
        return candidates[:0]
    order = np.argsort(-score[candidates], kind="stable")
    return candidates[order[:k]]


def _layout(rng: np.random.Generator, mask: np.ndarray, counts: dict[int, int], p_inside: float) -> np.ndarray:
    """Assign a region to every tissue cell with exactly ``counts`` cells per region.

    The immune pattern only decides *where* immune cells go (inside tumour nests vs in the stroma
    next to them); the counts are fixed beforehand, so the multiset of regions of a slide does
    not depend on the pattern.
    """
    h, w = mask.shape
    side = max(h, w)
    flat_mask = mask.ravel()
    region = np.full(h * w, -1, np.int8)
    avail = flat_mask.copy()
    f1 = _smooth_field(rng, (h, w), side / 7.0).ravel()  # "tumour-ness": nests where high
    f2 = _smooth_field(rng, (h, w), side / 10.0).ravel()  # fat lobules

    def cells() -> np.ndarray:
        return np.flatnonzero(avail)

    def assign(idx: np.ndarray, r: int) -> None:
        region[idx] = r
        avail[idx] = False

    # Normal tissue: the area farthest from the tumour.
    assign(_take(cells(), -f1, counts[NORMAL]), NORMAL)
    # Rare focus: the cells nearest to a random seed cell, one compact focus.
    if counts[RARE]:
        c = cells()
        seed = c[rng.integers(len(c))]
        rr, cc = np.divmod(np.arange(h * w), w)
        d = np.hypot(rr - seed // w, cc - seed % w) + rng.uniform(0, 0.5, h * w)
        assign(_take(c, -d, counts[RARE]), RARE)
    n_in = int(round(p_inside * counts[IMMUNE]))
    n_out = counts[IMMUNE] - n_in
    nest = _take(cells(), f1, counts[TUMOUR] + counts[NECROSIS] + n_in)
    nest_mask = np.zeros(h * w, bool)
    nest_mask[nest] = True
    depth = ndimage.distance_transform_edt(nest_mask.reshape(h, w)).ravel()
    assign(_take(nest, depth + rng.uniform(0, 0.5, len(depth)), counts[NECROSIS]), NECROSIS)
    rest = nest[avail[nest]]
    assign(rng.permutation(rest)[:n_in], IMMUNE)
    assign(nest[avail[nest]], TUMOUR)
    # Excluded immune cells line the nests from the outside (nearest stroma first).
    dist = ndimage.distance_transform_edt(~nest_mask.reshape(h, w)).ravel()
    assign(_take(cells(), -(dist + rng.uniform(0, 1.5, h * w)), n_out), IMMUNE)
    edge = ndimage.distance_transform_edt(mask).ravel()
    assign(_take(cells(), f2 - 0.3 * edge, counts[FAT]), FAT)
    assign(cells(), STROMA)
    return region.reshape(h, w)


@dataclass
class Slide:
    slide_id: str
    patient_id: str
    site: int
    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64
    regions: np.ndarray  # (N,) int8
    counts: dict[int, int]
    p_inside: float
    rare: bool
    stain: np.ndarray  # (4,) coefficients: 3 random directions, then the rare direction


_SITE_REGION_SCALE = 0.5  # norm of a site's tissue-dependent shift, relative to the site offset
_SITE_MIX_RANK = 4
_SITE_MIX_SCALE = 0.35  # spectral size of the low-rank distortion (x moves by up to 35% along 4 directions)
_SITE_BATCH = (0.6, 1.4)  # per-slide factor on the site effect (staining batch within a site)


def _site_distortion(dim: int, k: int, world_seed: int) -> dict:
    """A site's tissue-dependent shifts and low-rank distortion, from its own stream (other draws unchanged)."""
    r = np.random.default_rng([world_seed, 8, k])
    region = r.standard_normal((len(REGIONS), dim))
    region *= _SITE_REGION_SCALE / np.linalg.norm(region, axis=1, keepdims=True)
    u = np.linalg.qr(r.standard_normal((dim, _SITE_MIX_RANK)))[0] * _SITE_MIX_SCALE
    v = np.linalg.qr(r.standard_normal((dim, _SITE_MIX_RANK)))[0]
    return {"region_offset": region, "mix_u": u, "mix_v": v}


def _apply_site(x: np.ndarray, regions: np.ndarray, site: Site, cfg: SynthConfig, rng) -> np.ndarray:
    """Site effect on (N, D) features in prototype units. ``additive``: gain and one shift per site, which
    per-slide centring removes exactly. ``realistic`` adds what real stain/scanner differences do: a shift
    that depends on the tissue under it (so a slide's mean moves with its composition), a low-rank linear
    distortion of the content, and a per-slide strength (batches within a site)."""
    x = site.gain * x + cfg.site_strength * site.offset.astype(np.float32)
    if cfg.site_effect == "additive":
        return x
    b = np.float32(rng.uniform(*_SITE_BATCH))
    x += b * ((x @ site.mix_v.astype(np.float32)) @ site.mix_u.T.astype(np.float32))
    x += b * np.float32(cfg.site_strength) * site.region_offset[regions].astype(np.float32)
    return x


def _simulate_slide(world: World, cfg: SynthConfig, pat: Patient, i: int, j: int) -> Slide:
    rng = np.random.default_rng([cfg.seed, 2, i, j])
    site = world.sites[pat.site]
    mask = _tissue_mask(rng, cfg)
    n = int(mask.sum())
    # Sections of one patient share the biology but differ in composition a little.
    fr = {r: float(np.clip(f * rng.uniform(0.85, 1.15), 0.0, 0.6)) for r, f in pat.fractions.items()}
    rare = j in pat.rare_slides
    counts = _counts(fr, n, rare)
    p_inside = float(np.clip(pat.p_inside + rng.normal(0, 0.05), 0.0, 1.0))
    region_grid = _layout(rng, mask, counts, p_inside)
    rows, cols = np.nonzero(mask)  # row-major scan order, like a tiler
    regions = region_grid[rows, cols]

    d = world.dim
    protos = world.prototypes.copy()
    protos[TUMOUR] = world.subtype_prototype(pat.subtype) + pat.tumour_shift
    x = protos[regions].astype(np.float32)
    z = rng.standard_normal((n, _WITHIN_RANK), dtype=np.float32)
    for r in np.unique(regions):
        sel = regions == r
        x[sel] += z[sel] @ world.within_bases[r].astype(np.float32)
    tum = regions == TUMOUR
    atypia = pat.atypia + 0.1 * rng.standard_normal(int(tum.sum()))
    x[tum] += atypia[:, None].astype(np.float32) * world.atypia_dir.astype(np.float32)
    x += rng.standard_normal((n, d), dtype=np.float32) * np.float32(_NOISE_SCALE / math.sqrt(d))
    stain = np.concatenate([rng.normal(0, _STAIN_SCALE, 3), rng.normal(0, _STAIN_RARE_SCALE, 1)])
    offset = stain[:3] @ world.stain_dirs + stain[3] * world.stain_rare_dir
    offset += rng.standard_normal(d) * (_SLIDE_SCALE / math.sqrt(d))
    x += offset.astype(np.float32)
    # The site draw has its own stream, so cohorts differ from the additive ones only by the site effect.
    x = _apply_site(x, regions, site, cfg, np.random.default_rng([cfg.seed, 9, i, j]))
    # Scale so each feature dimension has roughly unit spread, like real encoder outputs.
    x *= np.float32(math.sqrt(d))

    origin = rng.integers(0, 40_000, 2)
    coords = origin[None, :] + np.stack([cols, rows], 1).astype(np.int64) * site.stride_level0
    return Slide(f"{pat.patient_id}-{j + 1}", pat.patient_id, pat.site, x.astype(np.float16),
                 coords.astype(np.int64), regions.astype(np.int8), counts, p_inside, rare, stain)


def _write_slide_h5(path: Path, slide: Slide, site: Site) -> None:
    with h5py.File(path, "w", track_order=False) as f:
        f.create_dataset("features", data=slide.features, track_times=False)
        c = f.create_dataset("coords", data=slide.coords, track_times=False)
        c.attrs["patch_size_level0"] = site.patch_size_level0
        c.attrs["patch_size"] = site.patch_size
        c.attrs["target_magnification"] = TARGET_MAGNIFICATION
        c.attrs["level0_magnification"] = site.level0_magnification
        c.attrs["overlap"] = site.overlap
        c.attrs["name"] = slide.slide_id


# ------------------------------------------------------------------------------------- reports

_SUBTYPE_TEXT = {
    0: ["Invasive adenocarcinoma, acinar-predominant pattern.",
        "Adenocarcinoma with predominantly gland-forming (acinar) architecture.",
        "The tumour is an acinar-type adenocarcinoma.",
        "Histologic type: adenocarcinoma, acinar subtype."],
    1: ["Invasive adenocarcinoma, solid-predominant pattern.",
        "Adenocarcinoma growing in solid sheets without gland formation.",
        "Histologic type: adenocarcinoma, solid subtype.",
        "Tumour cells are arranged in solid nests and sheets; no glands are formed."],
    2: ["Invasive adenocarcinoma, papillary-predominant pattern.",
        "Adenocarcinoma with papillary architecture around fibrovascular cores.",
        "Histologic type: adenocarcinoma, papillary subtype.",
        "The tumour shows a papillary growth pattern."],
}
_GRADE_TEXT = {
    1: ["Histologic grade: G1 (well differentiated).", "The tumour is well differentiated.",
        "Grade 1 of 3.", "Low grade, well differentiated."],
    2: ["Histologic grade: G2 (moderately differentiated).", "The tumour is moderately differentiated.",
        "Grade 2 of 3.", "Intermediate grade."],
    3: ["Histologic grade: G3 (poorly differentiated).", "The tumour is poorly differentiated.",
        "Grade 3 of 3.", "High grade, poorly differentiated."],
}
_IMMUNE_TEXT = {
    True: ["Numerous tumour-infiltrating lymphocytes are present within the tumour nests.",
           "Brisk intratumoral lymphocytic infiltrate.",
           "Lymphocytes permeate the tumour epithelium (inflamed pattern).",
           "TILs: prominent, intraepithelial."],
    False: ["Lymphocytes are confined to the stroma at the invasive margin, with few intratumoral lymphocytes.",
            "Peritumoral lymphoid cuffing without intraepithelial infiltration (immune-excluded pattern).",
            "TILs: stromal and marginal only, sparse within tumour nests.",
            "The lymphocytic response stays at the tumour-stroma interface."],
}
_RARE_TEXT = {
    True: ["A small focus of signet-ring cells is identified.", "Focal signet-ring cell component (<5%).",
           "Rare signet-ring cells are seen in one area."],
    False: ["No signet-ring cell component identified.", "Signet-ring cells: not identified."],
}
_DISTRACTORS = [
    "Specimen received in formalin, labelled with the patient's name.",
    "Surgical margins are free of tumour.",
    "Clinical history: mass on imaging.",
    "Immunohistochemistry controls are appropriate.",
    "Block A1 submitted for molecular testing.",
    "Additional levels were examined.",
    "Background tissue shows mild chronic inflammation.",
    "See synoptic report for staging.",
    "Sections show a firm tan-white lesion.",
    "Lymph nodes: none received.",
]
_HEADERS = ["", "FINAL DIAGNOSIS: ", "Microscopic description: ", "DIAGNOSIS: "]


def _report(rng: np.random.Generator, pat: Patient) -> str:
    def pick(opts: list[str]) -> str:
        return opts[int(rng.integers(len(opts)))]

    findings = []
    if rng.random() > 0.05:
        findings.append(pick(_SUBTYPE_TEXT[pat.subtype]))
    if rng.random() > 0.1:
        findings.append(pick(_GRADE_TEXT[pat.grade]))
    if rng.random() > 0.15:
        findings.append(pick(_IMMUNE_TEXT[pat.infiltrated]))
    if pat.rare and rng.random() > 0.2:
        findings.append(pick(_RARE_TEXT[True]))
    elif not pat.rare and rng.random() < 0.3:
        findings.append(pick(_RARE_TEXT[False]))
    n_dis = int(rng.integers(0, 4))
    findings += [_DISTRACTORS[k] for k in rng.choice(len(_DISTRACTORS), n_dis, replace=False)]
    findings = [findings[k] for k in rng.permutation(len(findings))]
    return pick(_HEADERS) + " ".join(findings)


# ---------------------------------------------------------------------------------- expression


def _expression_row(world: World, cfg: SynthConfig, pat: Patient, slides: list[Slide], i: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 4, i])
    mods = np.array(world.gene_modules)
    tot = {r: sum(s.counts[r] for s in slides) / sum(sum(s.counts.values()) for s in slides)
           for r in range(len(REGIONS))}
    log_mu = world.gene_base.copy()
    log_mu[mods == f"subtype_{SUBTYPES[pat.subtype]}"] += 1.5
    # Bulk RNA sees intraepithelial lymphocytes more than marginal ones (inflamed vs excluded).
    log_mu[mods == "immune"] += 1.0 * pat.infiltrated + 8.0 * (tot[IMMUNE] - 0.1)
    log_mu[mods == "proliferation"] += 0.6 * (pat.grade - 2)
    log_mu[mods == "hypoxia"] += 0.8 * pat.rare + 10.0 * (tot[NECROSIS] - 0.03)
    log_mu[mods == "stromal"] += 3.0 * (tot[STROMA] - 0.35)
    log_mu += world.sites[pat.site].gene_batch
    p = np.exp(log_mu - log_mu.max())
    p /= p.sum()
    library = math.exp(rng.normal(math.log(2e7), 0.4))
    mu = library * p
    disp = world.gene_dispersion
    lam = rng.gamma(1.0 / disp, mu * disp)
    return rng.poisson(lam).astype(np.float32)


# ------------------------------------------------------------------------------------- writing


@dataclass
class SynthSummary:
    path: Path
    patients: int
    slides: int
    patches: int
    reports: int
    expression: int


def _validate(cfg: SynthConfig) -> None:
    problems = []
    if cfg.patients < 1:
        problems.append("--patients must be >= 1")
    if cfg.dim < 8:
        problems.append("--dim must be >= 8")
    if cfg.site_effect not in ("realistic", "additive"):
        problems.append(f"--site-effect must be realistic or additive, got {cfg.site_effect!r}")
    if cfg.sites < 1:
        problems.append("--sites must be >= 1")
    if not 10 <= cfg.min_side <= cfg.max_side:
        problems.append("need 10 <= --min-side <= --max-side")
    for name in ("multi_slide_fraction", "rare_prevalence", "missing_report_fraction",
                 "missing_expression_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1]")
    if cfg.genes < 20:
        problems.append("--genes must be >= 20")
    if problems:
        raise SlidefmError("invalid synth config: " + "; ".join(problems))


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def generate_cohort(out: str | Path, cfg: SynthConfig | None = None, overwrite: bool = False) -> SynthSummary:
    """Write a synthetic cohort to ``out`` (atomically); same config, same files."""
    import anndata as ad

    cfg = cfg or SynthConfig()
    _validate(cfg)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SlidefmError(f"{out} exists and is not empty (use --overwrite to replace it)")
    world = make_world(cfg.dim, cfg.world_seed, cfg.sites, cfg.genes)

    slide_rows, truth_rows, clin_rows, report_rows = [], [], [], []
    expr_ids, expr_rows = [], []
    n_patches = 0
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "features").mkdir()
        (tmp / "truth").mkdir()
        with h5py.File(tmp / "truth" / "regions.h5", "w") as truth_h5:
            truth_h5.attrs["region_names"] = list(REGIONS)
            for i in range(cfg.patients):
                pat = _simulate_patient(world, cfg, i)
                site = world.sites[pat.site]
                slides = [_simulate_slide(world, cfg, pat, i, j) for j in range(pat.n_slides)]
                for s in slides:
                    _write_slide_h5(tmp / "features" / f"{s.slide_id}.h5", s, site)
                    truth_h5.create_dataset(s.slide_id, data=s.regions, track_times=False)
                    n_patches += len(s.regions)
                    slide_rows.append({"slide_id": s.slide_id, "patient_id": pat.patient_id,
                                       "center": site.name, "scanner": site.scanner})
                    truth_rows.append({
                        "slide_id": s.slide_id, "patient_id": pat.patient_id, "n_patches": len(s.regions),
                        "rare_focus": int(s.rare), "p_immune_inside": round(s.p_inside, 4),
                        **{f"n_{name}": s.counts[r] for r, name in enumerate(REGIONS)},
                        **{f"stain_{k}": round(float(v), 5) for k, v in enumerate(s.stain)},
                    })
                clin_rows.append({
                    "patient_id": pat.patient_id, "age": pat.age, "sex": pat.sex,
                    "subtype": SUBTYPES[pat.subtype], "grade": pat.grade,
                    "immune_pattern": IMMUNE_PATTERNS[int(pat.infiltrated)],
                    "rare_focus": RARE_STATES[int(pat.rare)],
                    "os_months": pat.os_months, "os_event": pat.os_event,
                })
                if pat.has_report:
                    report_rows.append({"patient_id": pat.patient_id,
                                        "text": _report(np.random.default_rng([cfg.seed, 3, i]), pat)})
                if pat.has_expression:
                    expr_ids.append(pat.patient_id)
                    expr_rows.append(_expression_row(world, cfg, pat, slides, i))

        _write_csv(pd.DataFrame(slide_rows), tmp / "slides.csv")
        _write_csv(pd.DataFrame(clin_rows), tmp / "clinical.csv")
        _write_csv(pd.DataFrame(report_rows, columns=["patient_id", "text"]), tmp / "reports.csv")
        _write_csv(pd.DataFrame(truth_rows), tmp / "truth" / "slides.csv")
        var = pd.DataFrame({"module": list(world.gene_modules)}, index=pd.Index(world.gene_names, name="gene_id"))
        obs = pd.DataFrame(index=pd.Index(expr_ids, name="patient_id"))
        X = np.stack(expr_rows) if expr_rows else np.zeros((0, cfg.genes), np.float32)
        ad.AnnData(X=X, obs=obs, var=var).write_h5ad(tmp / "expression.h5ad")

        tasks = {"tasks": [
            {"name": "subtype", "kind": "classification", "level": "patient", "label": "subtype"},
            {"name": "grade", "kind": "classification", "level": "patient", "label": "grade"},
            {"name": "immune_pattern", "kind": "classification", "level": "patient", "label": "immune_pattern"},
            {"name": "rare_focus", "kind": "classification", "level": "patient", "label": "rare_focus"},
            {"name": "overall_survival", "kind": "survival", "level": "patient",
             "time": "os_months", "event": "os_event"},
        ]}
        (tmp / "tasks.yaml").write_text(yaml.safe_dump(tasks, sort_keys=False))
        (tmp / "cohort.yaml").write_text(yaml.safe_dump(
            {"expression": {"path": "expression.h5ad", "units": "counts"}}, sort_keys=False))
        (tmp / "truth" / "config.yaml").write_text(yaml.safe_dump(
            {"generator": "slidefm.cohort.synth", "config": dataclasses.asdict(cfg)}, sort_keys=False))
    return SynthSummary(out, cfg.patients, len(slide_rows), n_patches, len(report_rows), len(expr_ids))


def read_regions(cohort: str | Path, slide_id: str) -> np.ndarray:
    """True region code (index into ``REGIONS``) of every patch of a synthetic slide, in file order."""
    with h5py.File(Path(cohort) / "truth" / "regions.h5", "r") as f:
        return f[slide_id][()]


def planted_risk(clinical: pd.DataFrame) -> np.ndarray:
    """The planted log-hazard of each row of a synthetic clinical.csv (the oracle for c-index)."""
    sub = clinical["subtype"].map({name: b for name, b in zip(SUBTYPES, _BETA_SUBTYPE)}).to_numpy(float)
    return (sub + _BETA_GRADE * (clinical["grade"].to_numpy(float) - 2)
            + _BETA_INFILTRATED * (clinical["immune_pattern"] == "infiltrated").to_numpy(float)
            + _BETA_RARE * (clinical["rare_focus"] == "present").to_numpy(float)
            + _BETA_AGE * (clinical["age"].to_numpy(float) - 65))
