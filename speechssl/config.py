"""Typed configuration: dataclass schemas, YAML loading, dotted command-line overrides.

Schemas are plain dataclasses; OmegaConf structured configs do the merging and the type checks, so
an unknown key or a value of the wrong type is reported with its full dotted key before any model is
built. Two additions on top of OmegaConf:

* a section may be given as the path of a YAML file (``model: configs/model/base_transformer.yaml``),
  in the config file or on the command line (``model=configs/model/tiny_transformer.yaml``);
* a section may be polymorphic: a field whose metadata has ``schema_by_type`` picks its schema by
  the section's ``type`` key (the context network: ``model.context.type: transformer``).

The schemas live beside what they configure (``speechssl.models.config``, ``speechssl.data.config``,
``speechssl.training.config``, each context network's module); this module is only the machinery.

Value checks that types cannot express (ranges, divisibility) live in each schema's
``__post_init__`` and raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _read_yaml(path: Path, key: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    check(isinstance(data, dict), key, f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _find_file(value: str, key: str, base_dir: Path | None) -> Path:
    candidates = [Path(value)]
    if base_dir is not None:
        candidates.append(base_dir / value)
    candidates.append(REPO_CONFIG_DIR.parent / value)
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"{key}: config file {value!r} not found")


def _structure(schema: type, raw: Any, key: str, base_dir: Path | None) -> DictConfig:
    """Resolve file includes and polymorphic sections of ``raw``, then merge it into ``schema``."""
    if isinstance(raw, str):
        path = _find_file(raw, key or "config", base_dir)
        raw, base_dir = _read_yaml(path, key or "config"), path.parent
    if raw is None:
        raw = {}
    check(isinstance(raw, dict), key or "config", f"expected a mapping, got {raw!r}")
    raw = dict(raw)
    hints = get_type_hints(schema)
    sub_nodes = {}
    for f in dataclasses.fields(schema):
        if f.name not in raw:
            continue
        sub_key = f"{key}.{f.name}" if key else f.name
        pick: Callable[[str], type] | None = f.metadata.get("schema_by_type")
        if pick is not None:
            value = raw.pop(f.name)
            if isinstance(value, str):
                path = _find_file(value, sub_key, base_dir)
                value = _read_yaml(path, sub_key)
            check(isinstance(value, dict), sub_key, f"expected a mapping, got {value!r}")
            value = {"type": f.default_factory()["type"], **value}  # the default type unless named
            try:
                sub_schema = pick(value["type"])
            except (KeyError, TypeError) as e:
                raise ConfigError(f"{sub_key}.type: {e.args[0]}") from None
            sub_nodes[f.name] = _structure(sub_schema, value, sub_key, base_dir)
        elif _is_schema(hints[f.name]):
            sub_nodes[f.name] = _structure(hints[f.name], raw.pop(f.name), sub_key, base_dir)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        # Sections replace the defaults rather than merge into them: a polymorphic section (at any
        # depth) may pick another schema than the default's.
        for name, node in sub_nodes.items():
            if OmegaConf.get_type(merged, name) is not OmegaConf.get_type(node):
                merged[name] = None
            merged[name] = node
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, key)) from None
    return merged


def _describe(e: OmegaConfBaseException, prefix: str) -> str:
    full_key = getattr(e, "full_key", None) or ""
    full_key = f"{prefix}.{full_key}" if prefix and full_key else (full_key or prefix or "config")
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.splitlines()[0]
    if msg.startswith("Key '") and "not in" in msg:
        msg = "unknown key"
    return f"{full_key}: {msg}"


def _check_finite(value: Any, key: str) -> None:
    """No setting of any schema is meant to be NaN or infinite (``trainer.lr=.inf`` would train
    nothing and export non-finite weights, yet every other check passes)."""
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {number}")


def _to_object(schema: type[T], node: DictConfig, key: str = "") -> T:
    """Instantiate the dataclasses of a merged config (``__post_init__`` checks run here)."""
    values = {}
    for f in dataclasses.fields(schema):
        value, full_key = node[f.name], f"{key}.{f.name}" if key else f.name
        if isinstance(value, DictConfig) and _is_schema(OmegaConf.get_type(value)):
            value = _to_object(OmegaConf.get_type(value), value, full_key)
        elif OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        _check_finite(value, full_key)
        values[f.name] = value
    return schema(**values)


def build(schema: type[T], raw: dict | str | os.PathLike | None = None, overrides: Sequence[str] = (),
          base_dir: str | os.PathLike | None = None) -> T:
    """Build a validated ``schema`` instance from a mapping or YAML path plus dotted overrides.

    Overrides look like ``model.context.num_layers=4`` or ``model=configs/model/tiny_transformer.yaml``
    and apply in order, after the file. Raises :class:`ConfigError` naming the key at fault.
    """
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if isinstance(raw, str):
        path = _find_file(raw, "config", None)
        raw, base = _read_yaml(path, "config"), path.parent
    tree = dict(raw or {})
    for item in overrides:
        check("=" in item, item, "overrides look like dotted.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        parsed = yaml.safe_load(value) if value.strip() else None
        _set_dotted(tree, parts, parsed, dotted, base)
    merged = _structure(schema, tree, "", base)
    return _to_object(schema, merged)


def _set_dotted(tree: dict, parts: list[str], value: Any, dotted: str, base: Path | None) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str):  # an included file: read it so the override can go inside
            path = _find_file(child, ".".join(parts[: i + 1]), base)
            child = _read_yaml(path, ".".join(parts[: i + 1]))
        if child is None:
            child = {}
        check(isinstance(child, dict), dotted, f"{'.'.join(parts[: i + 1])} is not a section")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def to_dict(config: Any) -> dict:
    """A plain nested dict of a config (what a saved model stores)."""
    return dataclasses.asdict(config)
