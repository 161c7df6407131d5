"""A sweep's results as rows (one per run: its swept values, status, final and best metrics), the
seed-averaged curve of a metric along one swept key, and the optimum fitted on such a curve. Sweep reports and
the studies (drift, transfer, regret) all read sweeps through these."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from maxllama.sweep.executors import MANIFEST


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
    """(one row per run, the swept keys) of a sweep directory."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(path)
    manifest = json.loads(path.read_text())
    return [_run_row(sweep_dir, name, entry) for name, entry in manifest["runs"].items()], manifest["swept"]


def values_by_key(rows: Sequence[dict], key: str, metric: str) -> dict[float, list[float]]:
    """The finite values of `metric` per value of `key` (one per seed), over rows that have both."""
    by_value: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric) is not None and row.get(key) is not None and math.isfinite(row[metric]):
            by_value[float(row[key])].append(row[metric])
    return by_value


def mean_curve(by_value: Mapping[float, Sequence[float]]) -> tuple[list[float], list[float], list[int]]:
    """{x: one value per seed} -> the sorted xs, the values averaged over the seeds at each, and their count."""
    xs = sorted(by_value)
    return xs, [float(np.mean(by_value[x])) for x in xs], [len(by_value[x]) for x in xs]


def fit_optimum(xs: Sequence[float], ys: Sequence[float]) -> Optimum:
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
