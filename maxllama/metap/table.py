"""The resolved MetaP numbers of one run, per parameter and per group: what `metap.yaml` records, what
`maxllama metap show` prints and what a checkpoint's metadata keeps."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from maxllama.base.tree import flat_paths
from maxllama.config.schema import Config
from maxllama.metap.rules import ParamRule, run_scales


def _rules(model) -> dict[str, ParamRule]:
    return flat_paths(model.rules, is_leaf=lambda x: isinstance(x, ParamRule))


def per_parameter(cfg: Config, model) -> dict[str, dict[str, Any]]:
    """{path: {role, ratio, init_std, peak_lr, weight_decay, adam_eps, lr_multiplier, clip_weight}}."""
    return {path: {**dataclasses.asdict(rule), "peak_lr": rule.peak_lr(cfg)} for path, rule in _rules(model).items()}


def _group_name(rule: ParamRule) -> str:
    return rule.role if rule.role != "hidden" else f"hidden m={rule.ratio:g}"


def groups(cfg: Config, model) -> dict[str, dict[str, Any]]:
    """Parameters with identical rules, by role (hidden matrices also by their width ratio m)."""
    members: dict[tuple, list[str]] = defaultdict(list)
    for path, rule in _rules(model).items():
        members[(_group_name(rule), rule)].append(path)
    out = {}
    # Same role, different rule (a zero-init query, the final norm outside the blocks): the larger group keeps
    # the role's name, the other is named by its first parameter.
    for (name, rule), paths in sorted(members.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        name = name if name not in out else f"{name} ({paths[0]})"
        out[name] = {"init_std": rule.init_std, "peak_lr": rule.peak_lr(cfg), "lr_multiplier": rule.lr_multiplier,
                     "weight_decay": rule.weight_decay, "adam_eps": rule.adam_eps, "clip_weight": rule.clip_weight,
                     "ratio": rule.ratio, "parameters": paths}
    return out


def summary(cfg: Config, model) -> dict[str, Any]:
    """Everything MetaP resolved for this run: ratios to the proxy, forward multipliers, groups."""
    p = model.parametrization
    return {
        "parametrization": cfg.metap.parametrization,
        "ratios": dataclasses.asdict(run_scales(cfg)),
        "multipliers": {"embedding": p.embedding_multiplier, "output": p.output_multiplier,
                        "router": p.router_multiplier, "residual": p.residual_multiplier,
                        "attention_scale": p.attention_scale},
        "optim": {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "eps": cfg.optim.eps,
                  "schedule": cfg.optim.schedule, "grad_clip": cfg.train.grad_clip},
        "groups": groups(cfg, model),
    }


def write(path: Path, cfg: Config, model) -> None:
    path.write_text(yaml.safe_dump(summary(cfg, model), sort_keys=False))


def format_summary(info: dict[str, Any]) -> str:
    r, mult = info["ratios"], info["multipliers"]
    lines = [f"parametrization: {info['parametrization']}",
             "ratios to the proxy: " + ", ".join(f"{k} {v:g}" for k, v in r.items()),
             "forward multipliers: " + ", ".join(f"{k} {v:.4g}" for k, v in mult.items()), ""]
    header = ("group", "params", "init std", "peak LR", "LR mult", "weight decay", "Adam eps", "clip weight")
    rows = [(name, str(len(g["parameters"])), "ones" if g["init_std"] is None else f"{g['init_std']:.4g}",
             f"{g['peak_lr']:.4g}", f"{g['lr_multiplier']:.4g}", f"{g['weight_decay']:.4g}", f"{g['adam_eps']:.3g}",
             f"{g['clip_weight']:g}")
            for name, g in info["groups"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
