"""`maxllama sweep report DIR`: one row per run (swept values, status, final and best metrics) as a CSV and a
table, and a plot of a metric against one swept key with one curve per value of another, each curve's
optimum fitted (a parabola in log2 space through the best point and its neighbours, seeds averaged) and marked."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from maxllama.sweep.plotting import figure, finish
from maxllama.sweep.results import Optimum, collect, fit_optimum, mean_curve, values_by_key

FIELDS = ("status", "steps", "final_loss", "final_val_loss", "best_val_loss")


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict], swept: list[str]) -> str:
    columns = ["name", *swept, *FIELDS]

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def curves(rows: list[dict], x_key: str, curve_key: str | None, metric: str) -> dict[Any, tuple[list, list]]:
    """{curve value: (xs, metric averaged over seeds)} over runs that finished with the metric."""
    grouped: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        curve = row.get(curve_key) if curve_key else "all"
        grouped[curve if isinstance(curve, (str, int, float, bool, type(None))) else json.dumps(curve)].append(row)
    out = {c: mean_curve(values_by_key(members, x_key, metric))[:2] for c, members in grouped.items()}
    return {c: curve for c, curve in out.items() if curve[0]}


def plot(rows: list[dict], x_key: str, curve_key: str | None, metric: str, path: Path) -> dict[Any, Optimum]:
    optima = {}
    ordered = sorted(curves(rows, x_key, curve_key, metric).items(),
                     key=lambda kv: (not isinstance(kv[0], (int, float)), kv[0] if isinstance(kv[0], (int, float)) else str(kv[0])))
    with figure(path, panel_size=(7, 4.5), dpi=120) as (_, (ax,)):
        for curve, (xs, ys) in ordered:
            label = f"{curve_key}={curve}" if curve_key else metric
            line, = ax.plot(np.log2(xs), ys, "o-", label=label)
            optimum = optima[curve] = fit_optimum(xs, ys)
            ax.plot([math.log2(optimum.x)], [optimum.value], "*", markersize=14, color=line.get_color(),
                    markeredgecolor="black")
        finish(ax, f"log2 {x_key}", metric, f"{metric} vs {x_key} (star: fitted optimum)")
    return optima


def report(sweep_dir: str | Path, x_key: str | None = None, curve_key: str | None = None,
           metric: str = "final_val_loss") -> tuple[str, Path, Path | None, dict]:
    sweep_dir = Path(sweep_dir)
    rows, swept = collect(sweep_dir)
    csv_path = sweep_dir / "report.csv"
    write_csv(rows, csv_path)
    numeric = [k for k in swept if k != "seed" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    x_key = x_key or next((k for k in numeric if "lr" in k), numeric[0] if numeric else None)
    curve_key = curve_key or next((k for k in swept if k not in (x_key, "seed")), None)
    png = optima = None
    if x_key:
        png = sweep_dir / f"{metric}_vs_{x_key.replace('.', '_')}.png"
        optima = plot(rows, x_key, curve_key, metric, png)
        (sweep_dir / "optima.json").write_text(json.dumps(
            {"x": x_key, "curve": curve_key, "metric": metric,
             "optima": {str(c): o._asdict() for c, o in optima.items()}}, indent=2))
    return table(rows, swept), csv_path, png, optima or {}
