"""The configuration reference, read from the structured configs themselves.

    python -m slidefm.config_docs > docs/configuration.md     # Markdown
    slidefm train --help                                       # the same options as text

Both render :func:`sections` and :func:`groups`: every option's type, default and help come from the
dataclass fields (``field(metadata={"help": ...})``), the group choices from the registries and the
recipe folder. A test checks the committed file is current, so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import shutil
import textwrap
import typing
from typing import NamedTuple


class Option(NamedTuple):
    key: str
    type: str
    default: str  # "(required)", "(see below)" or the repr of the default
    help: str
    resume: bool = False  # may differ when a run directory is resumed (``field(metadata={"resume": True})``)

    @property
    def meaning(self) -> str:
        return self.help + (" (may change when resuming)" if self.resume else "")


def _type_name(tp) -> str:
    s = str(tp) if typing.get_origin(tp) is not None else (getattr(tp, "__name__", None) or str(tp))
    return re.sub(r"(?:\w+\.)+(\w+)", r"\1", s).replace("NoneType", "None")  # module paths off


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(v):
        return "(see below)"
    return repr(v) if v != "???" else "(required)"


def options(cls: type, prefix: str) -> list[Option]:
    """One :class:`Option` per field of ``cls`` (except the ``name`` that selects a registered component)."""
    hints = typing.get_type_hints(cls)
    return [Option(f"{prefix}.{f.name}", _type_name(hints[f.name]), _default(f), f.metadata.get("help", ""),
                   bool(f.metadata.get("resume", False)))
            for f in dataclasses.fields(cls) if f.name != "name"]


def recipes() -> list[str]:
    """Recipe names: the YAML files of ``slidefm.recipes/recipe``."""
    folder = importlib.resources.files("slidefm.recipes") / "recipe"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def groups() -> list[tuple[str, list[str]]]:
    """Hydra config groups (``group=choice``) and their choices."""
    from slidefm.modalities import MODALITY_ENCODERS
    from slidefm.models.aggregators import AGGREGATORS
    from slidefm.models.case import CASE_MODELS
    from slidefm.objectives import OBJECTIVES

    return [
        ("recipe", recipes()),
        ("model/aggregator", AGGREGATORS.names()),
        ("model/case", CASE_MODELS.names()),
        ("model/report", [n for n in MODALITY_ENCODERS.names() if n == "text"]),
        ("model/expression", [n for n in MODALITY_ENCODERS.names() if n != "text"]),
        *[(f"objectives/{name}", ["default"]) for name in OBJECTIVES.names()],
        ("data/views", ["default"]),
        ("hydra/launcher", ["slurm"]),
    ]


def sections() -> list[tuple[str, list[Option]]]:
    """(title, options) for the top-level nodes, then for each choice of each component group."""
    from slidefm.config import ModelConfig, ObjectivesConfig, OptimConfig, TrainConfig, TrainerConfig
    from slidefm.data.config import DataConfig, ExpressionDataConfig
    from slidefm.data.views import ViewConfig
    from slidefm.modalities import MODALITY_ENCODERS
    from slidefm.models.aggregators import AGGREGATORS
    from slidefm.models.case import CASE_MODELS
    from slidefm.objectives import OBJECTIVES

    top = [o._replace(key=o.key[1:]) for o in options(TrainConfig, "")
           if o.key[1:] in ("recipe", "run_dir", "tags")]
    out = [("run", top), ("data", options(DataConfig, "data")),
           ("data.expression", options(ExpressionDataConfig, "data.expression")),
           ("data.views", options(ViewConfig, "data.views")), ("model", options(ModelConfig, "model")),
           ("objectives", options(ObjectivesConfig, "objectives")), ("trainer", options(TrainerConfig, "trainer")),
           ("optim", options(OptimConfig, "optim"))]
    for name, cls in sorted(AGGREGATORS.configs().items()):
        out.append((f"model.aggregator ({name})", options(cls, "model.aggregator")))
    for name, cls in sorted(CASE_MODELS.configs().items()):
        out.append((f"model.case ({name})", options(cls, "model.case")))
    for name, cls in sorted(MODALITY_ENCODERS.configs().items()):
        group = "model.report" if name == "text" else "model.expression"
        out.append((f"{group} ({name})", options(cls, group)))
    for name, cls in sorted(OBJECTIVES.configs().items()):
        out.append((f"objectives.{name}", options(cls, f"objectives.{name}")))
    return out


def render() -> str:
    """docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the structured configs by `python -m slidefm.config_docs` (also shown by",
        "`slidefm train --help`); every option can be overridden on the `slidefm train` command line",
        "(`key=value`), config groups with `group=option`.",
        "",
        "## Config groups",
        "",
    ]
    out += [f"- `{g}`: {', '.join(choices)}" for g, choices in groups()] + [""]
    for title, opts in sections():
        out += [f"### `{title}`", "", "| option | type | default | meaning |", "|---|---|---|---|"]
        for o in opts:
            default = o.default if o.default.startswith("(") else f"`{o.default}`"
            cell = [c.replace("|", chr(92) + "|") for c in (o.type, o.meaning)]  # `int | None` must not split the row
            out.append(f"| `{o.key}` | {cell[0]} | {default} | {cell[1]} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_text(width: int | None = None) -> str:
    """``slidefm train --help``: usage, the config groups, then every option with type, default and meaning."""
    width = width or min(120, shutil.get_terminal_size((100, 20)).columns)
    lines = [
        "usage: slidefm train [-m] [recipe=NAME] [GROUP=CHOICE ...] [KEY=VALUE ...]",
        "",
        "Train with a recipe (a Hydra config over typed options); data.cohort is required.",
        "  slidefm train recipe=moozy_stage1 data.cohort=/data/cohort trainer.max_steps=50000",
        "  slidefm train -m hydra/launcher=slurm recipe=slidefm data.cohort=DIR   (submit to SLURM)",
        "The run directory (hydra.run.dir=DIR) holds config.yaml, logs/metrics.csv and checkpoints/last.ckpt;",
        "re-running the same command in the same directory resumes. Hydra's own flags: --hydra-help.",
        "",
        "config groups (GROUP=CHOICE):",
    ]
    for g, choices in groups():
        lines.append(f"  {g:<26}{', '.join(choices)}")
    for title, opts in sections():
        lines += ["", f"{title}:"]
        key_w = max(len(o.key) for o in opts) + 2
        for o in opts:
            head = f"  {o.key:<{key_w}}{o.type} = {o.default}"
            if not o.meaning:
                lines.append(head)
                continue
            body = textwrap.wrap(o.meaning, max(30, width - 8))
            lines.append(head)
            lines += [f"      {b}" for b in body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
