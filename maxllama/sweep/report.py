"""`maxllama sweep report DIR`: one row per run (swept values, status, final and best metrics) as a CSV and a
table, and a plot of a metric against one swept key with one curve per value of another, each curve's
optimum fitted (a parabola in log2 space through the best point and its neighbours, seeds averaged) and marked."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from maxllama.sweep.executors import MANIFEST

FIELDS = ("status", "steps", "final_loss", "final_val_loss", "best_val_loss")


class Optimum(NamedTuple):
    x: float  # the fitted optimum of the swept key
    value: float  # the metric there
    fitted: bool  # False: too few points or no curvature; x is the best point
    at_edge: bool  # the best point is at the edge of the swept range: widen the sweep


def _run_row(sweep_dir: Path, name: str, entry: dict) -> dict[str, Any]:
    directory = sweep_dir / "runs" / name
    status = entry.get("status", "pending")
    status_file = directory / "status.json"
    if status_file.exists():
        status = json.loads(status_file.read_text()).get("status", status)
    rows = []
    if (directory / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return {"name": name, **entry["overrides"], "status": status, "steps": rows[-1]["step"] if rows else 0,
            "final_loss": losses[-1] if losses else None, "final_val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None}


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(path)
    manifest = json.loads(path.read_text())
    return [_run_row(sweep_dir, name, entry) for name, entry in manifest["runs"].items()], manifest["swept"]


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


def fit_optimum(xs: list[float], ys: list[float]) -> Optimum:
    """Parabola in log2(x) through the best point and its two neighbours. Loss-vs-LR curves are asymmetric
    (a cliff above the optimum, a slope below it), so a wider fit drags the vertex towards the flat side."""
    order = np.argsort(xs)
    lx, y = np.log2(np.asarray(xs, float)[order]), np.asarray(ys, float)[order]
    best = int(np.argmin(y))
    at_edge = best in (0, len(y) - 1)
    lo, hi = max(0, best - 1), min(len(y), best + 2)
    if hi - lo >= 3:
        a, b, c = np.polyfit(lx[lo:hi], y[lo:hi], 2)
        if a > 0:
            vertex = -b / (2 * a)
            clipped = float(np.clip(vertex, lx[0], lx[-1]))  # a vertex outside the swept range is not trusted
            return Optimum(2 ** clipped, float(a * clipped ** 2 + b * clipped + c), True,
                           bool(at_edge or clipped != vertex))
    return Optimum(float(2 ** lx[best]), float(y[best]), False, bool(at_edge))


def curves(rows: list[dict], x_key: str, curve_key: str | None, metric: str) -> dict[Any, tuple[list, list]]:
    """{curve value: (xs, metric averaged over seeds)} over runs that finished with the metric."""
    grouped: dict[Any, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get(metric) is None or row.get(x_key) is None or not math.isfinite(row[metric]):
            continue
        curve = row.get(curve_key) if curve_key else "all"
        curve = curve if isinstance(curve, (str, int, float, bool, type(None))) else json.dumps(curve)
        grouped[curve][float(row[x_key])].append(row[metric])
    return {c: (sorted(points), [float(np.mean(points[x])) for x in sorted(points)]) for c, points in grouped.items()}


def plot(rows: list[dict], x_key: str, curve_key: str | None, metric: str, path: Path) -> dict[Any, Optimum]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    optima = {}
    ordered = sorted(curves(rows, x_key, curve_key, metric).items(),
                     key=lambda kv: (not isinstance(kv[0], (int, float)), kv[0] if isinstance(kv[0], (int, float)) else str(kv[0])))
    for curve, (xs, ys) in ordered:
        label = f"{curve_key}={curve}" if curve_key else metric
        line, = ax.plot(np.log2(xs), ys, "o-", label=label)
        optimum = optima[curve] = fit_optimum(xs, ys)
        ax.plot([math.log2(optimum.x)], [optimum.value], "*", markersize=14, color=line.get_color(),
                markeredgecolor="black")
    ax.set_xlabel(f"log2 {x_key}")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_key} (star: fitted optimum)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
