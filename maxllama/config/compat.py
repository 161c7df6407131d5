"""Which config changes a run survives: the difference between two resolved configs, split into the keys a
resumed run may change and those that decide what the saved state or the data is.

A resumed run continues the same optimisation on the same data stream. Anything that gives the state other
shapes (model sizes and kinds, vocabulary) or that changes what the data is (sources and their weights,
tokenizer, seed, batch size, sequence length, packing) makes it another run: resuming it would train a
different model or on different data under the old run's name. Everything else — how long to train, the LR
schedule's values, evaluation, logging, the checkpoint policy, the mesh — is how the same run goes on.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import yaml

from maxllama.config.loader import flatten

# Keys (fnmatch patterns over dotted keys) a resumed run may change; every other key refuses.
RESUMABLE = (
    "resume", "init_from", "mesh.*", "distributed.*", "logging.*", "checkpoint.*",
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.nonfinite",
    "train.grad_clip", "train.load_balance_weight", "train.router_z_weight",
    "optim.*",
    "data.workers", "data.prefetch",
    # How the same function is computed, not which function: the state's shapes and values are untouched.
    "model.remat", "model.compute_dtype", "model.moe_dispatch", "model.moe_capacity_factor",
    # MetaP's learning-rate and weight-decay factors are schedule values; its init scales and forward
    # multipliers are not (they change what the saved weights compute).
    "metap.lr_*", "metap.wd_*", "metap.kappa", "metap.beta", "metap.weight_decay_timescale",
)


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs between two nested config dicts (a key present in
    one only counts as changed from or to None). `run.*` says where a run is written, not how it trains: a
    run directory may be moved or renamed, so it is not compared."""
    before, after = flatten(old), flatten(new)
    return {key: (before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key) and not key.startswith("run.")}


def split_changes(changes: Mapping[str, tuple[Any, Any]]) -> tuple[dict, dict]:
    """(refused, accepted) changes of a resumed run."""
    refused = {k: v for k, v in changes.items() if not resumable(k)}
    accepted = {k: v for k, v in changes.items() if resumable(k)}
    return refused, accepted


def show(value: Any) -> str:
    """A config value on one line, as YAML writes it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """`key: old -> new` for each change, separated by '; '."""
    return "; ".join(f"{key}: {show(old)} -> {show(new)}" for key, (old, new) in changes.items())
