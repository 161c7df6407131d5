"""Sweep files: a base run config and axes over any dotted config key, expanded into named runs.

```yaml
base: ../tiny.yaml            # the run config every run starts from (relative to this file)
name: "lr{optim.lr}_d{model.d_model}_s{seed}"   # run-name template over any key (default: the swept values)
overrides: {train.steps: 200}  # applied to every run
grid: {optim.lr: [1e-3, 3e-3], model.d_model: [64, 128]}       # cartesian product
zip: {model.d_model: [64, 128], model.d_ff: [256, 512]}        # lock-step lists
random: {n: 8, seed: 0, params: {optim.lr: {log_uniform: [1e-4, 1e-2]}, optim.b2: {choice: [0.95, 0.99]}}}
seeds: [0, 1]
budget: 20                   # at most this many runs (the first ones, in expansion order)
executor: {type: local, parallel: 2}   # or {type: slurm, partition: gpu, gpus_per_run: 8, time: "04:00:00"}
```
`grid`, `zip` and `overrides` may instead name a YAML file that holds the mapping (`zip: width_ladder.yaml`,
relative to this file), so sweeps over the same ladder share one copy of it.
Every run's config is validated before anything runs: a key the config lacks or a value of the wrong type is
reported with the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from pathlib import Path
from typing import Any

import yaml

from maxllama.config import ConfigError, load_config
from maxllama.config.loader import _Loader

SWEEP_KEYS = {"base", "name", "overrides", "grid", "zip", "random", "seeds", "budget", "executor"}
MAPPING_KEYS = ("overrides", "grid", "zip")  # each a mapping, or the name of a YAML file holding one


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any]  # dotted key -> value: the swept values and the sweep's common overrides

    def args(self) -> list[str]:
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in self.overrides.items()]


@dataclasses.dataclass
class Sweep:
    path: Path
    base: Path
    runs: list[Run]
    swept: list[str]  # the keys that vary across runs
    executor: dict[str, Any]


def _sample(spec: dict, rng: random.Random, key: str) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"random.params.{key}: give one of uniform: [low, high], log_uniform: [low, high], "
                          f"choice: [values]")
    (kind, args), = spec.items()
    if kind == "choice":
        return rng.choice(list(args))
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    raise ConfigError(f"random.params.{key}: unknown distribution '{kind}' (uniform, log_uniform, choice)")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The swept values of every run, in order: grid x zip x random samples x seeds."""
    grid = spec.get("grid") or {}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    zipped = spec.get("zip") or {}
    if zipped:
        lengths = {len(v) for v in zipped.values()}
        if len(lengths) != 1:
            raise ConfigError(f"zip: lists must have equal lengths, got {sorted(lengths)}")
        rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())]
        combos = [{**c, **r} for c in combos for r in rows]
    if spec.get("random"):
        r = spec["random"]
        rng = random.Random(r.get("seed", 0))
        samples = [{key: _sample(dist, rng, key) for key, dist in r.get("params", {}).items()}
                   for _ in range(int(r.get("n", 1)))]
        combos = [{**c, **s} for c in combos for s in samples]
    if spec.get("seeds"):
        combos = [{**c, "seed": seed} for c in combos for seed in spec["seeds"]]
    return combos


def run_name(template: str | None, values: dict[str, Any]) -> str:
    if template is None:
        name = "_".join(f"{key.rsplit('.', 1)[-1]}{_format(v)}" for key, v in values.items()) or "run"
    else:
        def fill(match: re.Match) -> str:
            key = match.group(1)
            if key not in values:
                raise ConfigError(f"name: '{{{key}}}' is not a swept key (swept: {', '.join(values)})")
            return _format(values[key])
        name = re.sub(r"\{([^}]+)\}", fill, template)
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


def _load_yaml_file(path: Path, what: str) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    spec = _load_yaml_file(path, "sweep file") or {}
    for key in MAPPING_KEYS:
        if isinstance(spec.get(key), str):
            shared = path.parent / spec[key]
            spec[key] = _load_yaml_file(shared, f"{path}: {key}: file")
            if not isinstance(spec[key], dict):
                raise ConfigError(f"{path}: {key}: {shared} must hold a mapping of dotted keys to values")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(SWEEP_KEYS))})")
    if "base" not in spec:
        raise ConfigError(f"{path}: 'base:' (the run config every run starts from) is required")
    base = path.parent / spec["base"]
    common = {k: v for k, v in (spec.get("overrides") or {}).items()}
    runs, names = [], set()
    for values in expand(spec):
        name = run_name(spec.get("name"), values)
        if name in names:
            raise ConfigError(f"name: two runs would both be called '{name}'; put every swept key in the template")
        names.add(name)
        runs.append(Run(name, {**common, **values}))
    if spec.get("budget") is not None:
        runs = runs[: int(spec["budget"])]
    swept = list(dict.fromkeys(k for r in runs for k in r.overrides if k not in common))
    for run in runs:  # every run's config must be valid before any starts
        try:
            load_config(base, run.args())
        except ConfigError as e:
            raise ConfigError(f"{path}: run '{run.name}': {e}") from None
    executor = {"type": "local", "parallel": 1, **(spec.get("executor") or {})}
    return Sweep(path, base, runs, swept, executor)
