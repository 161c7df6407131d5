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

from maxllama.base.errors import UserError
from maxllama.config.schema import Config, Section, validate_consistency

BASE_KEY = "base"
FROM_KEY = "from"  # metap.from: a transferred metap.yaml, applied by the loader
TRANSFERRED_KEY = "config"


class ConfigError(UserError, ValueError):
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
    except (yaml.YAMLError, ValueError, TypeError):  # ValueError: a date-like `2024-13-01`; the schema reports it
        return text


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start}); expected YAML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None


def _yaml_error(path: Path, text: str, e: Exception, node: yaml.Node | None = None) -> ConfigError:
    """One line naming file:line. PyYAML's own messages span several lines; its constructors raise plain
    ValueError for values they cannot convert (`!!int x`, a date such as 2024-13-01)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None) or getattr(node, "start_mark", None)
    problem = ", ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)])) or e
    if isinstance(e, yaml.reader.ReaderError):
        line, problem = text.count("\n", 0, e.position), f"character #x{e.character:04x}: {e.reason}"
    else:
        line = mark.line if mark is not None else None
    where = f"{path}:{line + 1}" if line is not None else str(path)
    return ConfigError(f"{where}: invalid YAML: {' '.join(str(problem).split())}")


def read_yaml(path: Path, what: str = "config file") -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a YAML mapping; returns (nested dict, {dotted key: 'file:line'}); ({}, {}) for an empty file."""
    text = _read_text(path, what)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got a {node.id}")
    origins: dict[str, str] = {}

    def construct(value_node: yaml.Node) -> Any:
        try:
            return _Loader("").construct_object(value_node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            raise _yaml_error(path, text, e, value_node) from None

    def walk(mapping: yaml.MappingNode, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in mapping.value:
            line = f"{path}:{key_node.start_mark.line + 1}"
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{line}: a key must be a name, got a {key_node.id}")
            key = str(key_node.value)
            if not key.isprintable():  # a quoted key with a line break or control character
                raise ConfigError(f"{line}: a key must be a name, got {key!r:.60}")
            dotted = f"{prefix}{key}"
            if key in out:
                raise ConfigError(f"{line}: duplicate key '{dotted}'")
            origins[dotted] = line
            if isinstance(value_node, yaml.MappingNode) and value_node.value:
                out[key] = walk(value_node, dotted + ".")
            else:
                out[key] = construct(value_node)
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
    data, origins = read_yaml(path)
    if not data:  # an empty file would silently train the defaults
        raise ConfigError(f"{path}: the config file is empty; write at least one setting (e.g. `train: {{steps: "
                          f"100}}`), or `base: other.yaml` to start from another config")
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
            raise ConfigError(f"{where_defined(origins, dotted)}unknown key {dotted!r}{hint}")
        section = _section_type(field.annotation)
        if section is not None and isinstance(value, Mapping):
            _check_unknown_keys(value, origins, section, dotted + ".")


def where_defined(origins: Mapping[str, str], dotted: str) -> str:
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
        raise ConfigError(f"{where_defined(origins, dotted)}{dotted}: {_describe(first)}") from None
    problems = validate_consistency(cfg)
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{where_defined(origins, key)}{key}: {reason}")
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                transferred: Mapping[str, Any] | None = None) -> tuple[Config, dict[str, str]]:
    """Resolve a config file (or the defaults, for None) with overrides. Returns (config, {key: origin}).
    `transferred`: dotted keys applied in place of `metap.from`'s file (over the file, under the overrides), for a
    caller that holds them before they are written."""
    data, origins = _load_chain(Path(path)) if path is not None else ({}, {})
    origin = "metap transfer"
    source = _metap(apply_overrides(copy.deepcopy(data), dict(origins), overrides)).get(FROM_KEY)
    if transferred is None and source is not None:
        source_path, transferred = _read_transferred(source, Path(path).parent if path is not None else Path("."))
        origin = f"metap.from {source_path}"
    for key, value in (transferred or {}).items():
        set_dotted(data, key, value)
        origins[key] = origin
    data = apply_overrides(data, origins, overrides)
    _metap(data).pop(FROM_KEY, None)
    cfg = build_config(data, origins)
    return cfg, origins


def _metap(data: Mapping[str, Any]) -> dict[str, Any]:
    """The metap section; {} when absent or not a mapping (which the schema then reports)."""
    section = data.get("metap")
    return section if isinstance(section, dict) else {}


def _read_transferred(source: Any, config_dir: Path) -> tuple[Path, dict[str, Any]]:
    """`metap.from: PATH`: the hyperparameters `maxllama metap transfer` wrote, to apply over the config file
    (command-line overrides still win). A relative path is taken from the config's folder, then from here."""
    if not isinstance(source, str):
        raise ConfigError(f"metap.from: must be the path of a metap.yaml written by `maxllama metap transfer`, got {source!r}")
    path = next((p for p in (config_dir / source, Path(source)) if p.exists()), None)
    if path is None:
        raise ConfigError(f"metap.from: file not found: {source} (run `maxllama metap transfer` to write it)")
    values = read_yaml(path, "metap.from file")[0].get(TRANSFERRED_KEY)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: has no '{TRANSFERRED_KEY}:' mapping of dotted keys; is it from `maxllama metap transfer`?")
    return path, values


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
