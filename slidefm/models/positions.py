"""Which options need patch positions, and the refusal of features-only cohorts for them.

Features-only bags (CLAM ``pt_files/``, HIPT-style region bags, HDF5 without ``coords``) have no
grid positions. Through the data pipeline their positions are zeros and ``SlideData.has_positions``
/ ``PackedSlides.has_positions`` are False; position-free models (mean, ABMIL, Perceiver, the case
model) never look at them. Everything that does (the ViT's RoPE/ALiBi and grid PEG, TransMIL's
PPEG, grid crops and block masks) is refused here, before any work starts, with one line naming
the option and the first slide without coordinates.

It lives with the models because the aggregator classes say whether they read positions
(``Aggregator.uses_positions``); the data options it names are read from the config, not imported.
"""

from __future__ import annotations

from typing import Any

from slidefm.errors import SlidefmError
from slidefm.models.aggregators import AGGREGATORS
from slidefm.registry import config_get


def position_free_aggregators() -> list[str]:
    return [n for n in AGGREGATORS.names() if not AGGREGATORS.get(n).uses_positions]


def position_options(cfg: Any, training: bool = True) -> list[str]:
    """The options of a training (or, with ``training=False``, inference) config that need positions."""
    out = []
    agg = config_get(cfg, "model", "aggregator", "name")
    if agg is not None:
        # An unregistered name counts as needing positions: refusing is safer than feeding zeros.
        cls = AGGREGATORS.get(str(agg)) if str(agg) in AGGREGATORS.names() else None
        if cls is None or cls.needs_positions(config_get(cfg, "model", "aggregator")):
            why = getattr(cls, "positions_for", None)
            out.append(f"model.aggregator={agg}" + (f" ({why})" if why else ""))
    if training:
        if config_get(cfg, "data", "tokens") == "crop":
            out.append("data.tokens=crop (grid crops)")
        views = config_get(cfg, "data", "views")
        if views is not None and (config_get(views, "crop") or "grid") == "grid":
            out.append("data.views (grid crops and block masks)")
    return out


def require_positions(cfg: Any, cohort, training: bool = True) -> None:
    """Raise SlidefmError (one line) when the config needs positions and a slide has none."""
    options = position_options(cfg, training)
    if not options:
        return
    missing = cohort.slides_without_positions(first_only=True)
    if not missing:
        return
    sid = missing[0]
    raise SlidefmError(
        f"{', '.join(options)} need{'s' if len(options) == 1 else ''} patch coordinates, but slide {sid} "
        f"({cohort.display(cohort.slide_path(sid))}) has none (a features-only bag); use a position-free "
        f"aggregator ({', '.join(position_free_aggregators())}, or vit with pos=none peg=0) and data.views.crop=share "
        "instead of data.tokens=crop, e.g. recipe=slidefm_bags")
