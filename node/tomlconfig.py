"""What every component's typed config shares: strict pydantic sections, TOML reading, CLI overrides.

Unknown keys are errors (a typo must not silently fall back to a default), every number has bounds,
and any problem becomes one ConfigError line that names the field. Each component (miner, validator)
declares its own sections on `Section` and calls `read_toml` / `validate`.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricsSection(Section):
    """Prometheus /metrics, the same on every daemon: served when `enabled`, which a nonzero port implies."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: any free port (logged at start) when enabled")

    @model_validator(mode="after")
    def _port_enables(self) -> "MetricsSection":
        return self.model_copy(update={"enabled": True}) if self.port and not self.enabled else self


def read_toml(path: Path, example_hint: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; {example_hint}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def _set_dotted(doc: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
        if not isinstance(doc, dict):
            raise ConfigError(f"cannot override {dotted}: {p} is not a section")
    doc[leaf] = value


def validate(model: type[M], doc: dict, overrides: dict[str, Any] | None, label: str, flags: bool = False) -> M:
    """Validate a config document; `overrides` maps dotted field names to values (CLI flags; None: unset).

    With `flags` the document came from command-line flags, and the error names the flag (--batch-size).
    """
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(doc, dotted, value)
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if flags:
            raise ConfigError(f"--{where.replace('_', '-')}: {first['msg']}, got {first.get('input')!r}{more}") from None
        raise ConfigError(f"{label} config: {where}: {first['msg']}{more}") from None


def parse(model: type[M], doc: dict, overrides: dict[str, Any] | None, label: str, base_dir: Path | None,
          resolve: Callable[[M, Path], M]) -> M:
    """Validate, then make the config's relative paths relative to `base_dir` (the config file's folder)."""
    cfg = validate(model, doc, overrides, label)
    return resolve(cfg, base_dir) if base_dir is not None else cfg


def load(model: type[M], path: Path, overrides: dict[str, Any] | None, label: str, example_hint: str,
         resolve: Callable[[M, Path], M]) -> M:
    """A component's config from its TOML file, CLI overrides applied, paths relative to the file."""
    path = Path(path)
    return parse(model, read_toml(path, example_hint), overrides, label, path.resolve().parent, resolve)
