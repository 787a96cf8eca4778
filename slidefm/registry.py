"""Name -> builder registries (timm/open_clip style) for aggregators, encoders, objectives.

Every registered component takes its config object (torchtitan/open_clip style): ``Builder(cfg, **runtime)``,
where ``cfg`` is the registered dataclass and ``runtime`` are widths and objects only the calling code knows
(``in_dim``, ``genes``, the student network). Each option's type, default, allowed values (``Literal``) and
help therefore exist once, in the dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal, Union

from slidefm.errors import OptionError, SlidefmError


class Registry:
    """Maps a name to a builder and the structured-config dataclass that describes it.

    ``build(cfg, **extra)`` turns ``cfg`` (dataclass, DictConfig or dict with ``name``) into the registered
    dataclass and calls ``builder(cfg, **extra)``; an extra named like a config field sets that field
    instead (e.g. the model passes a tower's ``out_dim``), so the builder reads every option from ``cfg``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, config: type | None = None):
        def deco(obj):
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._builders[name] = obj
            if config is not None:
                self._configs[name] = config
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def config_class(self, name: str) -> type | None:
        self._check(name)
        return self._configs.get(name)

    def configs(self) -> dict[str, type]:
        return dict(self._configs)

    def get(self, name: str) -> Callable[..., Any]:
        self._check(name)
        return self._builders[name]

    def _check(self, name: str) -> None:
        if name not in self._builders:
            raise SlidefmError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names()) or '(none)'}")

    def build(self, cfg: Any = None, /, **extra: Any) -> Any:
        """Build from a config (dataclass, DictConfig or dict with ``name``) plus runtime kwargs."""
        values = config_to_dict(cfg)
        name = values.pop("name")
        cls = self.config_class(name)
        if cls is None:
            raise SlidefmError(f"{self.kind} '{name}' has no config dataclass")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise SlidefmError(f"unknown option(s) {', '.join(unknown)} for {self.kind} '{name}'; "
                               f"known: {', '.join(sorted(fields - {'name'}))}")
        values.update({k: v for k, v in extra.items() if k in fields})
        runtime = {k: v for k, v in extra.items() if k not in fields}
        return self.get(name)(cls(name=name, **values), **runtime)


def config_get(cfg: Any, *keys: str, default: Any = None) -> Any:
    """``cfg[k1][k2]...`` for a dataclass, DictConfig or dict node; ``default`` where a key or node is missing."""
    for k in keys:
        if cfg is None:
            return default
        cfg = cfg.get(k) if hasattr(cfg, "get") else getattr(cfg, k, None)
    return default if cfg is None else cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _literal_choices(tp: Any) -> tuple | None:
    """The allowed values of ``Literal[...]`` or ``Optional[Literal[...]]`` (None included), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is Union:
        args = typing.get_args(tp)
        lits = [a for a in args if typing.get_origin(a) is Literal]
        if len(lits) == 1 and set(args) - {lits[0]} <= {type(None)}:
            return typing.get_args(lits[0]) + ((None,) if type(None) in args else ())
    return None


def choices(cls: type) -> dict[str, tuple]:
    """Field name -> allowed values, for the fields of a config dataclass typed with ``Literal``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        c = _literal_choices(hints[f.name])
        if c is not None:
            out[f.name] = c
    return out


def check_choices(cfg: Any, where: str = "", cls: type | None = None) -> None:
    """OptionError (a ValueError) naming the option and its allowed values when a ``Literal`` field of ``cfg``
    holds another.

    ``where`` prefixes the option name (e.g. ``"text "``): the message reads like the config key. ``cls``: the
    dataclass that declares the fields when ``cfg`` is not an instance of it (a DictConfig, a dict-like node)."""
    for name, allowed in choices(cls or type(cfg)).items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise OptionError(f"{where}{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


class _Schemas:
    """Where pickle finds schema classes in any process: ``schemas.<module/path:Qual.Name>`` rebuilds the
    schema of that config class on demand, so a config composed in one process (submitit pickles it for
    the SLURM job) unpickles in a fresh one that never built the schema."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__") or ":" not in name:
            raise AttributeError(name)
        import importlib

        mod, _, qual = name.partition(":")
        obj: Any = importlib.import_module(mod.replace("/", "."))
        for part in qual.split("+"):
            obj = getattr(obj, part)
        return omegaconf_schema(obj)


schemas = _Schemas()


def omegaconf_schema(cls: type) -> type:
    """``cls`` with every ``Literal`` field typed as its values' type, for OmegaConf (which has no ``Literal``);
    nested config dataclasses likewise. ``cls`` itself when it has no such field.

    The allowed values stay declared once, in ``cls``; :func:`check_choices` enforces them at build. The
    schema is cached on ``cls`` and named so that pickle finds it through :data:`schemas` in any process
    (submitit pickles composed configs)."""
    if "_OmegaConfSchema" in cls.__dict__:
        return cls.__dict__["_OmegaConfSchema"]
    hints = typing.get_type_hints(cls)
    lits = choices(cls)
    specs, changed = [], False
    for f in dataclasses.fields(cls):
        tp, factory = hints[f.name], f.default_factory  # type: ignore[misc]
        if f.name in lits:
            base = {type(v) for v in lits[f.name] if v is not None}
            tp = base.pop() if len(base) == 1 else Any
            if None in lits[f.name]:
                tp = typing.Optional[tp]
            changed = True
        elif dataclasses.is_dataclass(tp) and omegaconf_schema(tp) is not tp:
            tp = omegaconf_schema(tp)
            factory = tp if factory is hints[f.name] else factory
            changed = True
        kw: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif factory is not dataclasses.MISSING:
            kw["default_factory"] = factory
        specs.append((f.name, tp, dataclasses.field(**kw)))
    schema = cls
    if changed:
        schema = dataclasses.make_dataclass(cls.__name__, specs)
        schema.__module__ = __name__
        schema.__qualname__ = f"schemas.{cls.__module__.replace('.', '/')}:{cls.__qualname__.replace('.', '+')}"
        schema.__doc__ = cls.__doc__
    cls._OmegaConfSchema = schema  # type: ignore[attr-defined]
    return schema
