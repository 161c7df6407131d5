"""`maxllama metap transfer`: from a proxy sweep to the hyperparameters of a target run.

Every swept hyperparameter (the global LR `optim.lr`, weight decay, any `metap.*` constant) gets its optimum
from a parabola in log2 space through the best point of its seed-averaged loss curve and its neighbours, taken at the best
values of the others. When the sweep varied the batch size or the horizon (train.batch_size, train.steps),
the optimal LR of each (batch, horizon) pair gives the exponents kappa and beta by least squares on
log2 lr* = c + kappa log2(B/B0) - beta log2(D/D0). The result is a `metap.yaml` whose `config:` mapping a
target applies with `metap.from: PATH`; MetaP's rules then carry the proxy's values to the target's shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from maxllama.config import ConfigError, load_config
from maxllama.config.loader import flatten
from maxllama.config.schema import Config
from maxllama.metap import table as metap_table
from maxllama.model.build import define_abstract
from maxllama.sweep.plotting import figure, finish
from maxllama.sweep.results import collect, fit_optimum, mean_curve, values_by_key
from maxllama.train.flops import step_train_flops_per_token

BATCH, STEPS, SEED = "train.batch_size", "train.steps", "seed"


def is_hyperparameter(key: str) -> bool:
    return key in ("optim.lr", "optim.weight_decay") or (key.startswith("metap.") and not key.startswith("metap.base."))


@dataclasses.dataclass
class Fit:
    key: str
    optimum: float
    loss: float
    points: list[tuple[float, float, int]]  # (value, seed-averaged loss, seeds)
    fitted: bool
    at_edge: bool

    def warnings(self) -> list[str]:
        out = []
        if len(self.points) < 3:
            out.append(f"{self.key}: only {len(self.points)} swept values; 3 or more are needed to fit an optimum")
        elif not self.fitted:
            out.append(f"{self.key}: the loss curve has no minimum to fit; the best point is used")
        if self.at_edge:
            out.append(f"{self.key}: the optimum is at the edge of the swept range "
                       f"({min(p[0] for p in self.points):g}..{max(p[0] for p in self.points):g}): widen the sweep")
        if self.points and min(p[2] for p in self.points) < 2:
            out.append(f"{self.key}: some points have a single seed; 2+ seeds make the fit trustworthy")
        return out


def fit_key(rows: list[dict], key: str, metric: str) -> Fit:
    points = list(zip(*mean_curve(values_by_key(rows, key, metric))))
    if not points:
        raise ConfigError(f"no finished run has {metric} for {key}: run the sweep first (`maxllama sweep run`)")
    optimum = fit_optimum([p[0] for p in points], [p[1] for p in points])
    return Fit(key, optimum.x, optimum.value, points, optimum.fitted, optimum.at_edge)


def _at_best_of_others(rows: list[dict], key: str, others: Sequence[str], metric: str) -> list[dict]:
    """The slice of a grid along `key`, with every other hyperparameter at the value of the best run."""
    if not others:
        return rows
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric) is not None and math.isfinite(row[metric]):
            groups[tuple(row.get(k) for k in others)].append(row[metric])
    best = min(groups, key=lambda g: np.mean(groups[g]))
    return [row for row in rows if tuple(row.get(k) for k in others) == best]


@dataclasses.dataclass
class Transfer:
    proxy: Config  # the proxy's resolved config at its reference batch size and horizon
    runs: list[str]  # the proxy sweep's runs the fits used
    fits: dict[str, Fit]
    lr_by_budget: list[dict[str, float]]  # per (batch, steps): batch, tokens, optimal lr
    kappa: float | None
    beta: float | None
    warnings: list[str]

    @property
    def lr(self) -> float:
        return self.fits["optim.lr"].optimum

    def predict_lr(self, batch: int, tokens: int) -> float:
        """The LR MetaP gives a run of this batch size and token count (the proxy's shape otherwise)."""
        t = self.proxy.train
        ratio_b, ratio_d = batch / t.batch_size, tokens / (t.steps * t.batch_size * t.seq_len)
        return self.lr * ratio_b ** (self.kappa or 0.0) * ratio_d ** -(self.beta or 0.0)

    def config(self) -> dict[str, Any]:
        """The dotted keys a target applies with `metap.from`."""
        m, t = self.proxy.model, self.proxy.train
        out: dict[str, Any] = {"metap.parametrization": "metap"}
        out.update({f"metap.base.{k}": getattr(m, k) for k in ("d_model", "d_ff", "d_ff_expert", "n_heads", "n_kv_heads")})
        out["metap.base.head_dim"] = m.resolved_head_dim
        out["metap.base.n_layers"] = m.n_layers
        out["metap.base.batch_size"] = t.batch_size
        out["metap.base.tokens"] = t.steps * t.batch_size * t.seq_len
        # The proxy's own values of everything MetaP carries over, then the fitted optima on top.
        out.update({f"optim.{k}": getattr(self.proxy.optim, k) for k in ("lr", "weight_decay", "eps")})
        carried = {k: v for k, v in self.proxy.metap.model_dump().items()
                   if k not in ("parametrization", "init_std", "base", "kappa", "beta")}
        out.update(flatten(carried, "metap."))
        for key, fit in self.fits.items():
            out[key] = float(f"{fit.optimum:.6g}")
        if self.kappa is not None:
            out["metap.kappa"] = round(self.kappa, 4)
        if self.beta is not None:
            out["metap.beta"] = round(self.beta, 4)
        return out


def _proxy_config(sweep_dir: Path, row: dict) -> Config:
    path = sweep_dir / "runs" / row["name"] / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: missing; the proxy sweep's runs have not started")
    return load_config(path)[0]


def fit_exponents(budgets: list[dict[str, float]]) -> tuple[float | None, float | None, list[str]]:
    """Least squares of log2 lr* on log2 batch and log2 tokens, each column only where it varies."""
    if len(budgets) < 2:
        return None, None, []
    lr = np.log2([b["lr"] for b in budgets])
    columns = {name: np.log2([b[name] for b in budgets]) for name in ("batch", "tokens")}
    varying = [name for name, col in columns.items() if np.ptp(col) > 0]
    design = np.stack([np.ones_like(lr)] + [columns[n] for n in varying], axis=1)
    warnings = []
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None, None, ["train.batch_size and train.steps vary so that batch and tokens move together: "
                            "sweep the batch size at fixed tokens and the horizon at fixed batch size"]
    if len(budgets) < design.shape[1] + 1:
        warnings.append(f"exponents from {len(budgets)} (batch, horizon) points: 3 or more per exponent are better")
    coef = np.linalg.lstsq(design, lr, rcond=None)[0]
    fitted = dict(zip(varying, coef[1:]))
    kappa = float(fitted["batch"]) if "batch" in fitted else None
    beta = -float(fitted["tokens"]) if "tokens" in fitted else None
    return kappa, beta, warnings


def transfer(sweep_dir: str | Path, metric: str = "final_val_loss", where: dict[str, Any] | None = None) -> Transfer:
    sweep_dir = Path(sweep_dir)
    rows, swept = collect(sweep_dir)
    for key, value in (where or {}).items():
        if key not in swept:
            raise ConfigError(f"--where {key}: not a swept key of {sweep_dir} (swept: {', '.join(swept)})")
        rows = [r for r in rows if r.get(key) == value]
        if not rows:
            raise ConfigError(f"--where {key}={value}: no run of {sweep_dir} has that value")
    swept = [k for k in swept if len({json.dumps(r.get(k)) for r in rows}) > 1]  # varies within the selection
    hyper = [k for k in swept if is_hyperparameter(k) and all(isinstance(r.get(k), (int, float)) for r in rows)]
    other = [k for k in swept if k not in hyper and k not in (BATCH, STEPS, SEED)]
    if other:
        raise ConfigError(f"{sweep_dir} also varies {', '.join(other)}: pick the proxy's value with "
                          f"--where {other[0]}=VALUE")
    if not hyper:
        raise ConfigError(f"{sweep_dir} sweeps no hyperparameter (optim.lr, optim.weight_decay, metap.*)")
    budgets = sorted({(r.get(BATCH), r.get(STEPS)) for r in rows}, key=lambda b: tuple(x or 0 for x in b))
    reference = budgets[0]  # the smallest batch and horizon is the proxy
    at_reference = [r for r in rows if (r.get(BATCH), r.get(STEPS)) == reference]
    fits = {key: fit_key(_at_best_of_others(at_reference, key, [k for k in hyper if k != key], metric), key, metric)
            for key in hyper}
    warnings = [w for fit in fits.values() for w in fit.warnings()]
    proxy = _proxy_config(sweep_dir, at_reference[0])
    lr_by_budget, kappa, beta = [], None, None
    if len(budgets) > 1:
        if "optim.lr" not in hyper:
            warnings.append("the sweep varies batch size or horizon but not optim.lr: kappa and beta need LR curves")
        else:
            for batch, steps in budgets:
                subset = [r for r in rows if (r.get(BATCH), r.get(STEPS)) == (batch, steps)]
                fit = fit_key(_at_best_of_others(subset, "optim.lr", [k for k in hyper if k != "optim.lr"], metric),
                              "optim.lr", metric)
                b = batch or proxy.train.batch_size
                s = steps or proxy.train.steps
                warnings += [f"batch {b}, steps {s}: {w}" for w in fit.warnings()]
                lr_by_budget.append({"batch": b, "steps": s, "tokens": b * s * proxy.train.seq_len, "lr": fit.optimum})
            kappa, beta, more = fit_exponents(lr_by_budget)
            warnings += more
    return Transfer(proxy, [r["name"] for r in rows], fits, lr_by_budget, kappa, beta, warnings)


@dataclasses.dataclass
class Target:
    """The config a transfer is for, with the transferred values applied, and MetaP's table there."""
    path: str
    config: Config
    summary: dict

    def proxy_cost(self, result: Transfer, sweep_dir: str | Path) -> float:
        """The FLOPs of the proxy runs the fits used, in units of one target run."""
        return sweep_flops(sweep_dir, result.runs) / run_flops(self.config)


def resolve_target(result: Transfer, path: str) -> Target:
    """The target config as `metap.from` would give it the transfer (nothing allocated, any size)."""
    cfg = load_config(path, transferred=result.config())[0]
    return Target(path, cfg, metap_table.summary(cfg, define_abstract(cfg)))


def write(result: Transfer, out: Path, source: Path, target: Target | None = None) -> None:
    doc = {
        "config": result.config(),
        "proxy_sweep": str(source),
        "fits": {k: {"optimum": f.optimum, "loss": f.loss, "fitted": f.fitted, "at_edge": f.at_edge,
                     "points": [list(p) for p in f.points]} for k, f in result.fits.items()},
        "lr_by_budget": result.lr_by_budget,
        "warnings": result.warnings,
    }
    if target is not None:
        doc["target"] = target.summary
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# maxllama metap transfer {source}: the proxy's tuned hyperparameters and shape.\n"
              f"# A target config applies them with   metap: {{from: {out}}}\n")
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False))


def run_flops(cfg: Config) -> float:
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    return step_train_flops_per_token(cfg) * tokens


def sweep_flops(sweep_dir: str | Path, runs: Sequence[str] | None = None) -> float:
    """Training FLOPs of a sweep's runs (all, or those named), from each run's resolved config."""
    paths = sorted((Path(sweep_dir) / "runs").glob("*/config.yaml"))
    return sum(run_flops(load_config(path)[0]) for path in paths if runs is None or path.parent.name in runs)


@dataclasses.dataclass
class Check:
    batch: int
    steps: int
    predicted_lr: float
    measured: Fit

    @property
    def error_log2(self) -> float:
        return math.log2(self.measured.optimum) - math.log2(self.predicted_lr)


def check_predictions(result: Transfer, check_dir: str | Path, metric: str = "final_val_loss") -> list[Check]:
    """The optimum that a sweep at other batch sizes / horizons measures, against the LR the fit predicts."""
    rows, _ = collect(check_dir)
    proxy = result.proxy.train
    out = []
    for batch, steps in sorted({(r.get(BATCH) or proxy.batch_size, r.get(STEPS) or proxy.steps) for r in rows}):
        subset = [r for r in rows if (r.get(BATCH) or proxy.batch_size, r.get(STEPS) or proxy.steps) == (batch, steps)]
        measured = fit_key(subset, "optim.lr", metric)
        out.append(Check(batch, steps, result.predict_lr(batch, batch * steps * proxy.seq_len), measured))
    return out


def plot_checks(checks: list[Check], proxy_lr: float, path: Path) -> None:
    with figure(path, len(checks), (5.5, 4.2)) as (_, axes):
        for ax, c in zip(axes, checks):
            xs = [math.log2(p[0]) for p in c.measured.points]
            ax.plot(xs, [p[1] for p in c.measured.points], "o-", label="measured (mean over seeds)")
            ax.axvline(math.log2(c.measured.optimum), color="C0", linestyle=":",
                       label=f"fitted optimum {c.measured.optimum:.3g}")
            ax.axvline(math.log2(c.predicted_lr), color="C3", label=f"predicted {c.predicted_lr:.3g}")
            ax.axvline(math.log2(proxy_lr), color="gray", linestyle="--", label=f"proxy's optimum {proxy_lr:.3g}")
            finish(ax, "log2 learning rate", "final validation loss" if ax is axes[0] else None,
                   f"batch {c.batch}, {c.steps} steps: error {c.error_log2:+.2f} log2", legend_size=7)


def check_report(result: Transfer, check_dir: str | Path, out: Path, metric: str = "final_val_loss") -> str:
    """Compare, write OUT_check.png and OUT_check.json beside `out`, and return the table."""
    checks = check_predictions(result, check_dir, metric)
    lines = [f"predicted vs measured optimal LR in {check_dir}:"]
    for c in checks:
        unchanged = math.log2(c.measured.optimum / result.lr)
        lines.append(f"  batch {c.batch}, {c.steps} steps: predicted {c.predicted_lr:.4g}, measured "
                     f"{c.measured.optimum:.4g} -> error {c.error_log2:+.3f} log2 (the proxy's LR unchanged: "
                     f"{unchanged:+.3f})")
        lines += [f"  warning: {w}" for w in c.measured.warnings()]
    png = out.with_name(out.stem + "_check.png")
    plot_checks(checks, result.lr, png)
    out.with_name(out.stem + "_check.json").write_text(json.dumps(
        [{"batch": c.batch, "steps": c.steps, "predicted_lr": c.predicted_lr, "measured_lr": c.measured.optimum,
          "error_log2": c.error_log2, "points": c.measured.points} for c in checks], indent=2))
    lines.append(f"plot: {png}")
    return "\n".join(lines)
