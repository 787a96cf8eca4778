"""Render the configuration reference (docs/configuration.md) from the structured configs themselves.

    python -m slidefm.config_docs > docs/configuration.md

A test checks the committed file is current, so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import typing


def _type_name(tp) -> str:
    s = getattr(tp, "__name__", None) or str(tp)
    return s.replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(v):
        return "(see below)"
    return f"`{v!r}`" if v != "???" else "(required)"


def table(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = [f"### `{prefix}` — {cls.__name__}", "", "| option | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        help_ = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | {_type_name(hints[f.name])} | {_default(f)} | {help_} |")
    return rows + [""]


def render() -> str:
    from slidefm.config import ModelConfig, OptimConfig, TrainerConfig
    from slidefm.data.config import DataConfig, ExpressionDataConfig
    from slidefm.data.views import ViewConfig
    from slidefm.modalities import MODALITY_ENCODERS
    from slidefm.models.aggregators import AGGREGATORS
    from slidefm.models.case import CaseConfig
    from slidefm.objectives import OBJECTIVES

    out = [
        "# Configuration reference",
        "",
        "Generated from the structured configs by `python -m slidefm.config_docs`; every option can be",
        "overridden on the `slidefm train` command line (`key=value`), config groups with `group=option`.",
        "",
    ]
    out += table(DataConfig, "data") + table(ExpressionDataConfig, "data.expression") + table(ViewConfig, "data.views")
    out += table(ModelConfig, "model") + table(TrainerConfig, "trainer") + table(OptimConfig, "optim")
    out += ["## Config groups", ""]
    out += [f"- `model/aggregator`: {', '.join(AGGREGATORS.names())}",
            "- `model/case`: transformer",
            f"- `model/report`: {', '.join(n for n in MODALITY_ENCODERS.names() if n == 'text')}",
            f"- `model/expression`: {', '.join(n for n in MODALITY_ENCODERS.names() if n != 'text')}",
            f"- `objectives/<name>`: default, for {', '.join(OBJECTIVES.names())}",
            "- `recipe`: slidefm, mstar, threads, titan, moozy_stage1, moozy_stage2",
            "- `hydra/launcher`: slurm", ""]
    for name, cls in sorted(AGGREGATORS.configs().items()):
        out += table(cls, f"model.aggregator ({name})")
    out += table(CaseConfig, "model.case")
    for name, cls in sorted(MODALITY_ENCODERS.configs().items()):
        group = "model.report" if name == "text" else f"model.expression ({name})"
        out += table(cls, group)
    for name, cls in sorted(OBJECTIVES.configs().items()):
        out += table(cls, f"objectives.{name}")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
