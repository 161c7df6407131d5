"""How far the optimal learning rate (or any swept hyperparameter: a per-group LR multiplier, an init std) moves
along a scaling axis: the measure of transfer.

For every curve of a sweep (one value of the scaled key, e.g. model.d_model, within one parametrization),
the seed-averaged final loss against log2(hyperparameter) gets a parabola through its best point and neighbours;
the drift of a parametrization is the spread (max - min) of its fitted log2 optima over the axis, and the slope
(least squares, per doubling) says which way they move. What the drift costs: each curve's loss at the first
curve's (the proxy's) optimum, relative to its own optimum. How much of it is seed noise: the drift refitted on
seeds resampled with replacement. Noise alone spreads optima that do not move, so the slope's range over the same
resamples says whether they move at all, and the trend (slope x doublings) by how much. A seed is the unit of the
experiment, resampled whole (every curve's runs of it at once): it fixes the data order, which every point of the
axis shares, so whatever luck it brings to one width it may bring to all (a seed whose every run ends high or low).
For the same reason curves that averaged different seeds are compared on the seeds they all ran as well. Writes a
plot (one panel per parametrization), drift.json and a table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from maxllama.config import ConfigError
from maxllama.sweep.plotting import figure, finish
from maxllama.sweep.results import Optimum, collect, fit_optimum, mean_curve


def seed_mean_curve(runs: Iterable[dict[float, float]]) -> tuple[list[float], list[float], list[int]]:
    """Seeds' {lr: loss} curves -> the swept values, the loss averaged over the seeds that ran each, their count."""
    pooled: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for lr, loss in run.items():
            pooled[lr].append(loss)
    return mean_curve(pooled)


@dataclasses.dataclass
class Curve:
    value: Any  # the scaled key's value
    by_seed: dict[Any, dict[float, float]]  # seed -> {lr: loss}; lr: the swept hyperparameter's value
    lrs: list[float] = dataclasses.field(init=False)
    losses: list[float] = dataclasses.field(init=False)  # averaged over seeds
    seeds: list[int] = dataclasses.field(init=False)  # seeds per point
    optimum: Optimum = dataclasses.field(init=False)

    def __post_init__(self):
        self.lrs, self.losses, self.seeds = seed_mean_curve(self.by_seed.values())
        self.optimum = fit_optimum(self.lrs, self.losses)


def _spread(optima: list[Optimum]) -> float:
    log2_optima = [math.log2(o.x) for o in optima]
    return max(log2_optima) - min(log2_optima)


@dataclasses.dataclass
class Drift:
    group: str  # e.g. 'metap.parametrization=metap'
    curves: list[Curve]
    hparam: str = "optim.lr"

    @property
    def log2_optima(self) -> list[float]:
        return [math.log2(c.optimum.x) for c in self.curves]

    @property
    def drift(self) -> float:
        return _spread([c.optimum for c in self.curves])

    @property
    def slope(self) -> float:
        """Fitted change of the log2 optimum per doubling of the scaled key: least squares over the curves whose
        optimum lies inside their swept range (one at an edge is a bound, not a value); NaN with fewer than two."""
        return self._slope_of([c.optimum for c in self.curves])

    @property
    def trend(self) -> float:
        """The change of the log2 optimum from the first curve to the last that the slope implies. Unlike the
        drift, a spread of noisy optima, it grows with neither the number of curves nor their noise."""
        return self.slope * math.log2(float(self.curves[-1].value) / float(self.curves[0].value))

    def _slope_of(self, optima: list[Optimum]) -> float:
        pinned = [(math.log2(float(c.value)), math.log2(o.x)) for c, o in zip(self.curves, optima)
                  if o.fitted and not o.at_edge]
        return float(np.polyfit(*zip(*pinned), 1)[0]) if len(pinned) > 1 else math.nan

    @property
    def penalties(self) -> list[float | None]:
        """Each curve's loss at the proxy's optimum over its loss at its own optimum, minus 1: what training it with
        the proxy's value costs. Both are interpolated in log2 between measured points, so the proxy's own curve
        costs 0; None outside the curve's swept range."""
        x = math.log2(self.curves[0].optimum.x)
        out = []
        for c in self.curves:
            log2_lrs = np.log2(c.lrs)
            inside = log2_lrs[0] <= x <= log2_lrs[-1]
            at = lambda lr: float(np.interp(lr, log2_lrs, c.losses))  # noqa: E731
            out.append(at(x) / at(math.log2(c.optimum.x)) - 1 if inside else None)
        return out

    @functools.cached_property
    def _resampled_optima(self) -> list[list[Optimum]] | None:
        """Every curve's optimum refitted on 1000 resamples of the seeds; None with one seed per curve. Each
        resample draws from every seed any curve ran, and each curve keeps the drawn seeds it ran (a curve that ran
        none of them draws from its own)."""
        if min(len(c.by_seed) for c in self.curves) < 2:
            return None
        rng = np.random.default_rng(0)
        seeds = sorted({s for c in self.curves for s in c.by_seed}, key=str)
        resampled = []
        for _ in range(1000):
            drawn = [seeds[i] for i in rng.integers(len(seeds), size=len(seeds))]
            optima = []
            for c in self.curves:
                own = [s for s in drawn if s in c.by_seed]
                if not own:
                    own = [list(c.by_seed)[i] for i in rng.integers(len(c.by_seed), size=len(c.by_seed))]
                lrs, losses, _ = seed_mean_curve(c.by_seed[s] for s in own)
                optima.append(fit_optimum(lrs, losses))
            resampled.append(optima)
        return resampled

    def _over_resamples(self, statistic, percentiles=(16, 84)) -> tuple[float, float] | None:
        if self._resampled_optima is None:
            return None
        values = [statistic(optima) for optima in self._resampled_optima]
        if all(math.isnan(v) for v in values):
            return None
        low, high = np.nanpercentile(values, percentiles)
        return float(low), float(high)

    @property
    def seed_resample_range(self) -> tuple[float, float] | None:
        """The 16th and 84th percentiles of the drift over the seed resamples."""
        return self._over_resamples(_spread)

    @property
    def slope_resample_ranges(self) -> dict[str, tuple[float, float]] | None:
        """The slope's 16th to 84th and 2.5th to 97.5th percentiles over the seed resamples: whether the optimum
        moves along the axis at all, or only scatters around one value."""
        ranges = {f"{low}_{high}": self._over_resamples(self._slope_of, (low, high))
                  for low, high in ((16, 84), (2.5, 97.5))}
        return None if ranges["16_84"] is None else ranges

    @property
    def common_seeds(self) -> list:
        """The seeds every curve ran."""
        return sorted(set.intersection(*(set(c.by_seed) for c in self.curves)), key=str)

    @functools.cached_property
    def on_common_seeds(self) -> "Drift | None":
        """The same drift on the seeds every curve ran; None when every curve ran the same seeds, or none is
        common. With seeds' luck shared along the axis, curves that averaged different seeds differ by luck too."""
        common = self.common_seeds
        if not common or all(len(c.by_seed) == len(common) for c in self.curves):
            return None
        return Drift(self.group, [Curve(c.value, {s: c.by_seed[s] for s in common}) for c in self.curves],
                     self.hparam)

    def warnings(self) -> list[str]:
        out = []
        for c in self.curves:
            if c.optimum.at_edge:
                out.append(f"{self.group}, {c.value}: optimum at the edge of the {self.hparam} range")
            if not c.optimum.fitted:
                out.append(f"{self.group}, {c.value}: no curvature; best point used")
        if self.on_common_seeds is not None:
            out.append(f"{self.group}: the curves averaged different seeds, whose luck differs; the drift on the "
                       f"seeds they all ran is {self.on_common_seeds.drift:.3f}")
        return out


def drifts(sweep_dirs: list[Path], key: str, split: str | None, metric: str = "final_val_loss",
           hparam: str = "optim.lr") -> list[Drift]:
    """Runs of one or more sweeps; `split`: comma-separated swept keys, one group (one drift) per combination
    of their values."""
    split_keys = [k for k in (split or "").split(",") if k]
    rows = []
    for sweep_dir in sweep_dirs:  # each pooled sweep must vary every key, or its runs have no place on the axes
        more, swept = collect(sweep_dir)
        for needed in (hparam, key, *split_keys):
            if needed not in swept:
                raise ConfigError(f"{sweep_dir}: '{needed}' is not swept (swept: {', '.join(sorted(swept))})")
        rows += more
    # group -> scaled value -> seed -> {lr: loss}
    points: dict[Any, dict[Any, dict[Any, dict[float, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for n, row in enumerate(rows):
        value = row.get(metric)
        if value is None or not math.isfinite(value):
            continue
        group = ", ".join(f"{k}={row.get(k)}" for k in split_keys) or "all"
        points[group][row[key]][row.get("seed", f"run {n}")][float(row[hparam])] = value
    return [Drift(group, [Curve(value, dict(by_value[value])) for value in sorted(by_value, key=float)], hparam)
            for group, by_value in points.items()]


def plot(results: list[Drift], key: str, path: Path) -> None:
    """One panel per group: each curve's loss relative to its own fitted optimum (the curves of a width ladder
    lie far apart in loss and are flat to a fraction of a percent near their optima, so on one absolute scale
    their optima could not be seen), the optima as stars, and the proxy's optimum as a dashed line."""
    with figure(path, len(results), (6, 4.5)) as (_, axes):
        import matplotlib
        cmap = matplotlib.colormaps["viridis"]
        for ax, result in zip(axes, results):
            for i, c in enumerate(result.curves):
                color = cmap(i / max(len(result.curves) - 1, 1))
                relative = 100 * (np.asarray(c.losses) / c.optimum.value - 1)
                ax.plot(np.log2(c.lrs), relative, "o-", color=color, markersize=3,
                        label=f"{key}={c.value}: best {c.optimum.value:.4f}")
                ax.plot([math.log2(c.optimum.x)], [0.0], "*", color=color, markersize=13, markeredgecolor="black")
            ax.axvline(math.log2(result.curves[0].optimum.x), color="gray", linestyle="--", linewidth=1,
                       label="the first curve's optimum")
            slope = "" if math.isnan(result.slope) else f" ({result.slope:+.2f} per doubling)"
            finish(ax, f"log2 {result.hparam}", "loss above the curve's fitted optimum (%)",
                   f"{result.group}: drift {result.drift:.2f} log2{slope}", legend_size=7)


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _seed_noise(r: Drift) -> str:
    spread = r.seed_resample_range
    return "" if spread is None else f" (seed resamples: {spread[0]:.2f} to {spread[1]:.2f})"


def _slope_noise(r: Drift) -> str:
    ranges = r.slope_resample_ranges
    return "" if ranges is None else (f" (seed resamples: {ranges['16_84'][0]:+.3f} to {ranges['16_84'][1]:+.3f}; "
                                      f"95%: {ranges['2.5_97.5'][0]:+.3f} to {ranges['2.5_97.5'][1]:+.3f})")


def table(results: list[Drift], key: str) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.group}: drift {r.drift:.3f} log2{_seed_noise(r)} over {key} "
                     f"{r.curves[0].value}..{r.curves[-1].value}; " + (
                         "no slope: fewer than two optima inside their swept range" if math.isnan(r.slope) else
                         f"slope {r.slope:+.3f} per doubling{_slope_noise(r)}, a trend of {r.trend:+.2f} log2 from "
                         f"first to last"))
        for c, penalty in zip(r.curves, r.penalties):
            flag = " (edge)" if c.optimum.at_edge else "" if c.optimum.fitted else " (best point)"
            cost = "outside the swept range" if penalty is None else f"{100 * penalty:+.2f}%"
            lines.append(f"  {key}={c.value}: {r.hparam}* {c.optimum.x:.4g} (log2 {math.log2(c.optimum.x):+.2f}), "
                         f"loss {c.optimum.value:.4f}, {min(c.seeds)}+ seeds{flag}; at the proxy's optimum {cost}")
        common = r.on_common_seeds
        if common is not None:
            lines.append(f"  on the seeds every {key} ran ({', '.join(map(str, r.common_seeds))}): drift "
                         f"{common.drift:.3f} log2{_seed_noise(common)}; log2 optima "
                         + ", ".join(f"{x:+.2f}" for x in common.log2_optima))
    return "\n".join(lines)


def report(sweep_dirs: list[str | Path], key: str, split: str | None, metric: str = "final_val_loss",
           hparam: str = "optim.lr") -> tuple[str, Path, Path]:
    """Writes drift.png and drift.json into the first sweep directory."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    results = drifts(sweep_dirs, key, split, metric, hparam)
    if not results:
        raise ConfigError(f"{sweep_dirs[0]}: no finished runs with {metric}; run the sweep first")
    png, js = sweep_dirs[0] / "drift.png", sweep_dirs[0] / "drift.json"
    plot(results, key, png)
    js.write_text(json.dumps({"key": key, "hparam": hparam, "split": split, "metric": metric, "groups": [
        {"group": r.group, "drift_log2": r.drift, "drift_log2_seed_resamples_16_84": r.seed_resample_range,
         "slope_per_doubling": _or_none(r.slope), "slope_per_doubling_seed_resamples": r.slope_resample_ranges,
         "trend_log2": _or_none(r.trend), "warnings": r.warnings(),
         "common_seeds": r.common_seeds,
         "drift_log2_common_seeds": None if r.on_common_seeds is None else r.on_common_seeds.drift,
         "log2_lr_opt_common_seeds": None if r.on_common_seeds is None else r.on_common_seeds.log2_optima,
         "curves": [{"value": c.value, "lr_opt": c.optimum.x, "log2_lr_opt": math.log2(c.optimum.x),
                     "loss_opt": c.optimum.value, "fitted": c.optimum.fitted, "at_edge": c.optimum.at_edge,
                     "loss_penalty_at_proxy_lr": penalty, "lrs": c.lrs, "losses": c.losses, "seeds": c.seeds}
                    for c, penalty in zip(r.curves, r.penalties)]}
        for r in results]}, indent=2))
    text = table(results, key)
    warnings = [w for r in results for w in r.warnings()]
    return text + "".join(f"\nwarning: {w}" for w in warnings), png, js
