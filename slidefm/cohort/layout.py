"""cohort.yaml: where a cohort's files are and what units its omics tables carry (docs/cohort.md)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slidefm.errors import Problem

CONFIG_FILE = "cohort.yaml"
EXPRESSION_UNITS = ("counts", "tpm", "log")
OMICS_UNITS = EXPRESSION_UNITS + ("binary", "continuous")
DEFAULT_STORE = ".slidefm/store"

_FILE_KEYS = {
    "slides": "slides.csv",
    "features": "features",
    "reports": "reports.csv",
    "clinical": "clinical.csv",
    "tasks": "tasks.yaml",
    "store": DEFAULT_STORE,
}


@dataclass(frozen=True)
class TableSpec:
    """An AnnData table (expression or other omics): path and declared units."""

    path: Path
    units: str
    declared: bool  # named in cohort.yaml (so a missing file is an error)


@dataclass
class Layout:
    """Resolved file locations; a path is ``declared`` when cohort.yaml names it explicitly."""

    root: Path
    files: dict[str, Path]
    declared: set[str]
    expression: TableSpec | None
    omics: dict[str, TableSpec] = field(default_factory=dict)

    def optional(self, key: str) -> Path | None:
        """Path of an optional file, or None when it is absent and was not declared."""
        p = self.files[key]
        return p if p.exists() or key in self.declared else None

    def display(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)


def _table(root: Path, key: str, value: Any, default_units: str, allowed: tuple[str, ...],
           problems: list[Problem]) -> TableSpec | None:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict) or "path" not in value:
        problems.append(Problem(CONFIG_FILE, key, "expected a file name or {path: FILE, units: UNITS}"))
        return None
    extra = set(value) - {"path", "units"}
    if extra:
        problems.append(Problem(CONFIG_FILE, key, f"unknown key(s) {sorted(extra)}; allowed: path, units"))
    units = str(value.get("units", default_units))
    if units not in allowed:
        problems.append(Problem(CONFIG_FILE, key, f"units {units!r} not one of {', '.join(allowed)}"))
        return None
    return TableSpec(root / str(value["path"]), units, True)


def load_layout(root: Path) -> tuple[Layout, list[Problem]]:
    problems: list[Problem] = []
    cfg: dict[str, Any] = {}
    cfg_path = root / CONFIG_FILE
    if cfg_path.exists():
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            problems.append(Problem(CONFIG_FILE, "", f"not valid YAML: {e}"))
            cfg = {}
        if not isinstance(cfg, dict):
            problems.append(Problem(CONFIG_FILE, "", "expected a mapping of keys to file names"))
            cfg = {}
    # Other keys: an omics table when the value is a table spec (the contract's top-level form,
    # `mutations: {path: mutations.h5ad, units: binary}`), else harmless metadata (`name: my-cohort`).
    top_omics: dict[str, Any] = {}
    for key in [k for k in cfg if k not in _FILE_KEYS and k not in ("expression", "omics")]:
        value = cfg[key]
        if _is_table_spec(value):
            top_omics[str(key)] = value
            continue
        hint = difflib.get_close_matches(str(key), list(_FILE_KEYS) + ["expression", "omics"], n=1)
        problems.append(Problem(CONFIG_FILE, str(key), "ignored: not a file name or table spec ({path: FILE.h5ad, "
                                "units: UNITS})" + (f"; did you mean '{hint[0]}'?" if hint else ""), "warning"))
    files, declared = {}, set()
    for key, default in _FILE_KEYS.items():
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(Problem(CONFIG_FILE, key, f"expected a path, got {value!r}"))
            value = None
        if value is not None:
            declared.add(key)
        files[key] = root / (value or default)

    if "expression" in cfg:
        expression = _table(root, "expression", cfg["expression"], "counts", EXPRESSION_UNITS, problems)
    else:
        p = root / "expression.h5ad"
        expression = TableSpec(p, "counts", False) if p.exists() else None

    omics: dict[str, TableSpec] = {}
    raw = cfg.get("omics") or {}
    if not isinstance(raw, dict):
        problems.append(Problem(CONFIG_FILE, "omics", "expected a mapping name -> {path, units}"))
        raw = {}
    for name, value in raw.items():
        if str(name) == "expression":
            problems.append(Problem(CONFIG_FILE, "omics.expression", "declare expression at the top level"))
            continue
        spec = _table(root, f"omics.{name}", value, "continuous", OMICS_UNITS, problems)
        if spec is not None:
            omics[str(name)] = spec
    for name, value in top_omics.items():
        if name in raw:
            problems.append(Problem(CONFIG_FILE, name, f"table declared twice (top level and omics.{name})"))
            continue
        spec = _table(root, name, value, "continuous", OMICS_UNITS, problems)
        if spec is not None:
            omics[name] = spec
    return Layout(root, files, declared, expression, omics), problems


def _is_table_spec(value: Any) -> bool:
    """{path: ..., [units: ...]} or a bare AnnData file name."""
    if isinstance(value, dict):
        return "path" in value
    return isinstance(value, str) and value.lower().endswith(".h5ad")
