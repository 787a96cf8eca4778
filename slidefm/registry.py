"""Name -> builder registries (timm/open_clip style) for aggregators, encoders, objectives."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from slidefm.errors import SlidefmError


class Registry:
    """Maps a name to a builder and, optionally, the structured-config dataclass that describes it.

    Builders take keyword arguments named like the config's fields (minus ``name``), so a config
    ``{"name": "vit", "depth": 6}`` builds ``builder(depth=6, **extra)``.
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
        """Build from a config (dataclass, DictConfig or dict with ``name``) plus extra kwargs."""
        kwargs = config_to_dict(cfg)
        name = kwargs.pop("name")
        kwargs.update(extra)
        return self.get(name)(**kwargs)


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
