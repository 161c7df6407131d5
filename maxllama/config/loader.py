"""Load a run config: YAML file -> `base:` chain -> `metap.from` -> `section.key=value` overrides -> validated `Config`.

Every value remembers where it came from (`file:line`, `override`, or `default`), so errors can point at the
line to fix and `maxllama config show` can explain the resolved config.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydantic
import yaml

from maxllama.config.schema import Config, Section, validate_consistency

BASE_KEY = "base"
FROM_KEY = "from"  # metap.from: a transferred metap.yaml, applied by the loader
TRANSFERRED_KEY = "config"


class ConfigError(ValueError):
    """A user error in a config file or override: the message names the key (and file:line) to fix."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_scalar(text: str) -> Any:
    """An override's value, parsed as YAML (`3` -> int, `1e-3` -> float, `null` -> None, `[1,2]` -> list)."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a YAML mapping; returns (nested dict, {dotted key: 'file:line'})."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {node.tag.rsplit(':', 1)[-1]}")
    origins: dict[str, str] = {}

    def walk(mapping: yaml.MappingNode, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in mapping.value:
            key = str(key_node.value)
            dotted = f"{prefix}{key}"
            if key in out:
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: duplicate key '{dotted}'")
            origins[dotted] = f"{path}:{key_node.start_mark.line + 1}"
            if isinstance(value_node, yaml.MappingNode) and value_node.value:
                out[key] = walk(value_node, dotted + ".")
            else:
                out[key] = _Loader("").construct_object(value_node, deep=True)
        return out

    return walk(node, ""), origins


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base:' chain loops back to itself")
    data, origins = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    origins.pop(BASE_KEY, None)
    if base is None:
        return data, origins
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a relative path to a YAML file, got {base!r}")
    base_path = path.parent / base
    if not base_path.exists():
        raise ConfigError(f"{path}: base config not found: {base_path}")
    base_data, base_origins = _load_chain(base_path, seen + (path.resolve(),))
    return deep_merge(base_data, data), {**base_origins, **origins}


def apply_overrides(data: dict[str, Any], origins: dict[str, str], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        set_dotted(data, key, parse_scalar(value))
        origins[key] = "override"
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for key "a.b.c", making (or replacing) the mappings on the way; the schema
    then rejects a key that names nothing."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def schema_keys(model: type[Section] = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, nested sections included."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = _section_type(field.annotation)
        if section is not None:
            keys += schema_keys(section, f"{prefix}{name}.")
    return keys


def _section_type(annotation: Any) -> type[Section] | None:
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _check_unknown_keys(data: Mapping[str, Any], origins: Mapping[str, str],
                        model: type[Section] = Config, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = prefix + key
        field = model.model_fields.get(key)
        if field is None:
            valid = schema_keys(Config)
            close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.6)
            if not close:  # a misspelt leaf in a known section: compare leaf names alone
                siblings = [prefix + k for k in model.model_fields]
                close = difflib.get_close_matches(dotted, siblings, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys here: {', '.join(model.model_fields)}"
            raise ConfigError(f"{_where(origins, dotted)}unknown key '{dotted}'{hint}")
        section = _section_type(field.annotation)
        if section is not None and isinstance(value, Mapping):
            _check_unknown_keys(value, origins, section, dotted + ".")


def _where(origins: Mapping[str, str], dotted: str) -> str:
    origin = origins.get(dotted)
    return f"{origin}: " if origin and origin != "default" else ""


def _describe(error: Mapping[str, Any]) -> str:
    reason = error["msg"]
    if error["type"] == "literal_error":
        reason = reason.replace("Input should be", "must be one of")
    elif reason.startswith("Input should be"):
        reason = "must be" + reason[len("Input should be"):]
    if "input" in error and not isinstance(error["input"], Mapping):
        reason += f", got {error['input']!r}"
    return reason


_ALL_NAMES = {part for key in schema_keys() for part in key.split(".")}


def build_config(data: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> Config:
    """Validate a nested dict into a Config; raises ConfigError naming the first bad key."""
    origins = origins or {}
    _check_unknown_keys(data, origins)
    try:
        cfg = Config.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "extra_forbidden":  # an unknown key inside a list item (a data source, say)
            dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"]).replace(".[", "[")
            close = difflib.get_close_matches(str(first["loc"][-1]), sorted(_ALL_NAMES), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint}") from None
        # Unions add the member type to the location ('str', 'list[str]'): keep only real keys.
        dotted = ".".join(str(p) for p in first["loc"] if str(p) in _ALL_NAMES or isinstance(p, int))
        raise ConfigError(f"{_where(origins, dotted)}{dotted}: {_describe(first)}") from None
    problems = validate_consistency(cfg)
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{_where(origins, key)}{key}: {reason}")
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """Resolve a config file (or the defaults, for None) with overrides. Returns (config, {key: origin})."""
    data, origins = _load_chain(Path(path)) if path is not None else ({}, {})
    transferred = apply_overrides(copy.deepcopy(data), dict(origins), overrides).get("metap", {}).get(FROM_KEY)
    if transferred is not None:
        data = _apply_transferred(data, origins, transferred, Path(path).parent if path is not None else Path("."))
    data = apply_overrides(data, origins, overrides)
    data.get("metap", {}).pop(FROM_KEY, None)
    cfg = build_config(data, origins)
    return cfg, origins


def _apply_transferred(data: dict[str, Any], origins: dict[str, str], source: Any, config_dir: Path) -> dict[str, Any]:
    """`metap.from: PATH`: the hyperparameters `maxllama metap transfer` wrote, applied over the config file
    (command-line overrides still win). A relative path is taken from the config's folder, then from here."""
    if not isinstance(source, str):
        raise ConfigError(f"metap.from: must be the path of a metap.yaml written by `maxllama metap transfer`, got {source!r}")
    path = next((p for p in (config_dir / source, Path(source)) if p.exists()), None)
    if path is None:
        raise ConfigError(f"metap.from: file not found: {source} (run `maxllama metap transfer` to write it)")
    loaded = yaml.safe_load(path.read_text()) or {}
    values = loaded.get(TRANSFERRED_KEY) if isinstance(loaded, dict) else None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: has no '{TRANSFERRED_KEY}:' mapping of dotted keys; is it from `maxllama metap transfer`?")
    for key, value in values.items():
        set_dotted(data, key, value)
        origins[key] = f"metap.from {path}"
    return data


def resolved_origins(cfg: Config, origins: Mapping[str, str]) -> dict[str, str]:
    """Origin of every leaf of the resolved config: the most specific recorded origin, else 'default'."""
    out = {}
    for key in flatten(cfg.model_dump()):
        parts = key.split(".")
        out[key] = next((origins[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                         if ".".join(parts[:i]) in origins), "default")
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
