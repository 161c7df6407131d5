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
reported with the key. So is the sweep file itself: each axis must be a non-empty list of values (an empty
one would plan no runs at all), and a malformed entry is reported with its file and line.
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
from maxllama.config.loader import read_yaml, where_defined
from maxllama.parallel.rules import make_rules

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


def _sample(spec: dict, rng: random.Random) -> Any:
    (kind, args), = spec.items()  # checked by _check_random
    if kind == "choice":
        return rng.choice(list(args))
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    return math.exp(rng.uniform(math.log(low), math.log(high)))


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
        samples = [{key: _sample(dist, rng) for key, dist in r.get("params", {}).items()}
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
                raise ConfigError(f"name: {'{' + key + '}'!r} is not a swept key (swept: {', '.join(values)})")
            return _format(values[key])
        name = re.sub(r"\{([^}]+)\}", fill, template)
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    if not name.strip("."):  # '', '.' or '..' would name the runs folder or its parent
        raise ConfigError(f"name: the template gives the run name {name!r}; use a template such as \"lr{{optim.lr}}\"")
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Type checks of a sweep file's entries; errors name the key, with file:line where it is known."""

    def __init__(self, path: Path, origins: dict[str, str]):
        self.path, self.origins = path, origins

    def require(self, ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{where_defined(self.origins, key) or f'{self.path}: '}{key}: {problem}")

    def mapping(self, spec: dict, key: str, what: str) -> None:
        value = spec.get(key)
        self.require(value is None or isinstance(value, dict), key, f"must be a mapping of {what}, got {value!r:.60}")

    def axis(self, values: Any, key: str) -> None:
        """A swept key's values: a non-empty list."""
        self.require(not isinstance(values, dict), key, "must be a list of values; write the whole dotted key "
                                                        "(optim.lr: [...]), not nested mappings")
        self.require(isinstance(values, list), key, f"must be a list of the values to sweep, e.g. [{values!r:.40}]; "
                                                    f"got a single value")
        self.require(bool(values), key, "is an empty list, which gives no runs; list at least one value, or remove "
                                        "the key")

    def random(self, r: Any) -> None:
        self.require(isinstance(r, dict) and set(r) <= {"n", "seed", "params"}, "random",
                     "must be a mapping with n, seed and params")
        self.require(_is_int(r.get("n", 1)) and r.get("n", 1) >= 1, "random.n", "must be a positive integer")
        self.require(_is_int(r.get("seed", 0)), "random.seed", "must be an integer")
        self.mapping(r, "params", "dotted keys to distributions")
        self.require(bool(r.get("params")), "random.params", "needs at least one key to sample")
        for key, dist in r["params"].items():
            dotted = f"random.params.{key}"
            self.require(isinstance(dist, dict) and len(dist) == 1, dotted, "give one of uniform: [low, high], "
                                                                         "log_uniform: [low, high], choice: [values]")
            (kind, args), = dist.items()
            if kind == "choice":
                self.axis(args, f"{dotted}.choice")
                continue
            self.require(kind in ("uniform", "log_uniform"), dotted,
                         f"unknown distribution {kind!r:.40} (uniform, log_uniform, choice)")
            self.require(isinstance(args, list) and len(args) == 2 and all(map(_is_number, args)) and args[0] <= args[1]
                         and (kind == "uniform" or args[0] > 0), f"{dotted}.{kind}",
                         f"must be [low, high] with low <= high{' and low > 0' if kind == 'log_uniform' else ''}")


def _read_mapping(sweep_path: Path, key: str, name: str, origins: dict[str, str]) -> dict:
    """`grid: ladder.yaml` and the like: the mapping kept in another file (its keys' lines recorded)."""
    try:
        data, shared = read_yaml(sweep_path.parent / name, "file")
    except ConfigError as e:
        raise ConfigError(f"{sweep_path}: {key}: {e}") from None
    origins.update({f"{key}.{k}": line for k, line in shared.items()})
    return data


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    spec, origins = read_yaml(path, "sweep file")
    check = _Checker(path, origins)
    for key in MAPPING_KEYS:
        if isinstance(spec.get(key), str):
            spec[key] = _read_mapping(path, key, spec[key], origins)
        check.mapping(spec, key, "dotted keys to values")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(map(repr, sorted(unknown)))[:200]} "
                          f"(valid: {', '.join(sorted(SWEEP_KEYS))})")
    if "base" not in spec:
        raise ConfigError(f"{path}: 'base:' (the run config every run starts from) is required")
    check.require(isinstance(spec["base"], str) and spec["base"], "base", "must be the path of a run config, "
                                                                          "relative to the sweep file")
    check.require(spec.get("name") is None or isinstance(spec["name"], str), "name", "must be a run-name template, "
                                                                                      "e.g. \"lr{optim.lr}\"")
    for axis in ("grid", "zip"):
        for key, values in (spec.get(axis) or {}).items():
            check.axis(values, f"{axis}.{key}")
    if spec.get("seeds") is not None:
        check.axis(spec["seeds"], "seeds")
    if spec.get("random") is not None:
        check.random(spec["random"])
    budget = spec.get("budget")
    check.require(budget is None or (_is_int(budget) and budget >= 1), "budget", "must be a positive number of runs")
    check.mapping(spec, "executor", "settings")
    parallel = (spec.get("executor") or {}).get("parallel", 1)
    check.require(_is_int(parallel) and parallel >= 1, "executor.parallel", "must be a positive integer")
    base = path.parent / spec["base"]
    common = {k: v for k, v in (spec.get("overrides") or {}).items()}
    runs, names = [], set()
    try:
        for values in expand(spec):
            name = run_name(spec.get("name"), values)
            if name in names:
                raise ConfigError(f"name: two runs would both be called '{name}'; put every swept key in the template")
            names.add(name)
            runs.append(Run(name, {**common, **values}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if budget is not None:
        runs = runs[:budget]
    swept = list(dict.fromkeys(k for r in runs for k in r.overrides if k not in common))
    for run in runs:  # every run's config must be valid before any starts
        try:
            make_rules(load_config(base, run.args())[0].mesh.rules)
        except ConfigError as e:
            raise ConfigError(f"{path}: run '{run.name}': {e}") from None
    executor = {"type": "local", "parallel": 1, **(spec.get("executor") or {})}
    return Sweep(path, base, runs, swept, executor)
