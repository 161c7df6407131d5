"""End to end: the target trained once with transferred hyperparameters, against the best point of a direct
LR sweep at the target. Regret is the relative excess of the transferred run's final loss over that best
point (both averaged over seeds); cost is the proxy sweep's FLOPs as a multiple of one target run. The regret's
standard error is the noise floor it is read against. When the transferred runs and the best direct point share
seeds (same init and data order), it comes from the per-seed differences: a seed's luck shifts both runs alike
and cancels. Otherwise it comes from the direct points' seed-to-seed spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from maxllama.config import ConfigError, load_config
from maxllama.studies.transfer import fit_key, run_flops, sweep_flops
from maxllama.sweep.plotting import figure, finish
from maxllama.sweep.results import collect, values_by_key


def regret(transferred_dir: str | Path, direct_dir: str | Path, proxy_dirs: list[str | Path] = (),
           metric: str = "final_val_loss") -> tuple[str, dict]:
    transferred_dir, direct_dir = Path(transferred_dir), Path(direct_dir)
    rows, _ = collect(transferred_dir)
    losses = [r[metric] for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    if not losses:
        raise ConfigError(f"{transferred_dir}: no finished run with {metric}")
    configs = sorted((transferred_dir / "runs").glob("*/config.yaml"))
    target = load_config(configs[0])[0]
    direct_rows = collect(direct_dir)[0]
    points = fit_key(direct_rows, "optim.lr", metric).points  # (lr, loss over seeds, seeds)
    best_lr, best_loss, best_seeds = min(points, key=lambda p: p[1])
    transferred = float(np.mean(losses))
    spreads = [float(np.std(v, ddof=1)) for v in values_by_key(direct_rows, "optim.lr", metric).values() if len(v) > 1]
    seed_std = float(np.mean(spreads)) if spreads else None
    paired = _paired_differences(rows, [r for r in direct_rows if r.get("optim.lr") == best_lr], metric)
    if len(paired) >= 2:
        regret_se = float(np.std(paired, ddof=1)) / math.sqrt(len(paired)) / best_loss
    elif seed_std is not None:
        regret_se = seed_std * math.sqrt(1 / len(losses) + 1 / best_seeds) / best_loss
    else:
        regret_se = None
    result = {
        "transferred_lr": target.optim.lr, "transferred_loss": transferred, "transferred_seeds": len(losses),
        "direct_best_lr": best_lr, "direct_best_loss": best_loss,
        "direct_points": [[lr, loss] for lr, loss, _ in points],
        "regret": (transferred - best_loss) / best_loss,
        "direct_seed_std": seed_std, "regret_standard_error": regret_se, "paired_seeds": len(paired),
        "proxy_sweep_cost_in_target_runs": sum(sweep_flops(d) for d in proxy_dirs) / run_flops(target) if proxy_dirs else None,
        "direct_sweep_cost_in_target_runs": sweep_flops(direct_dir) / run_flops(target),
    }
    text = (f"transferred: LR {target.optim.lr:.4g}, final {metric} {transferred:.4f} ({len(losses)} seeds)\n"
            f"direct sweep best: LR {best_lr:.4g}, {metric} {best_loss:.4f}\n"
            f"regret: {100 * result['regret']:+.2f}% of the best direct point"
            + (f" (standard error {100 * regret_se:.2f}%, {_se_source(len(paired), seed_std)})\n"
               if regret_se is not None else " (one seed per point: no error estimate)\n") +
            f"cost: direct sweep {result['direct_sweep_cost_in_target_runs']:.2f} target runs")
    if proxy_dirs:
        text += f"; proxy sweep {result['proxy_sweep_cost_in_target_runs']:.3f} target runs"
    plot(result, transferred_dir / "regret.png")
    (transferred_dir / "regret.json").write_text(json.dumps(result, indent=2))
    return text + f"\nplot: {transferred_dir / 'regret.png'}", result


def _paired_differences(transferred: list[dict], best: list[dict], metric: str) -> list[float]:
    """Transferred minus best direct loss for every seed both have."""
    a, b = (values_by_key([r for r in rows if "seed" in r], "seed", metric) for rows in (transferred, best))
    return [float(np.mean(a[s]) - np.mean(b[s])) for s in sorted(a.keys() & b.keys())]


def _se_source(paired: int, seed_std: float | None) -> str:
    if paired >= 2:
        return f"from {paired} paired seeds"
    return f"seed-to-seed std {seed_std:.4f} per run"


def plot(result: dict, path: Path) -> None:
    with figure(path, panel_size=(6.5, 4.2)) as (_, (ax,)):
        lrs, losses = zip(*result["direct_points"])
        ax.plot(np.log2(lrs), losses, "o-", label="direct LR sweep at the target")
        ax.plot([math.log2(result["transferred_lr"])], [result["transferred_loss"]], "*", markersize=15, color="C3",
                markeredgecolor="black", label=f"transferred from the proxy (regret {100 * result['regret']:+.2f}%)")
        finish(ax, "log2 learning rate", "final validation loss")
