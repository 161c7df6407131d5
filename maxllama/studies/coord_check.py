"""The coordinate check: train a ladder of widths (or depths, or vision-encoder widths) a few steps at a high learning rate on one
fixed batch and measure the mean |activation| of every module at every step. Under a parametrization that
transfers, the curves are flat in width; under standard parametrization they grow with it.

The slope of log2(mean |activation|) against log2(width), fitted per module and step, is the change per
doubling; the check passes when every |slope| <= the tolerance at steps >= `min_step`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxllama.base.tree import flat_paths
from maxllama.config import ConfigError
from maxllama.config.loader import build_config
from maxllama.config.schema import Config, MetaPBaseConfig, ModelConfig, VisionConfig
from maxllama.data.pipeline import build_datasets
from maxllama.model.build import bind, define_model, initializer
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.sweep.plotting import figure, finish
from maxllama.train.optimizer import build_optimizer
from maxllama.train.schedules import make_schedule
from maxllama.train.step import batch_images, init_state, train_step_fn

Axis = Literal["width", "depth", "vision_width"]
FLAGS: dict[Axis, str] = {"width": "--widths", "depth": "--depths", "vision_width": "--vision-widths"}  # `metap coord-check`


def scaled_model(model: ModelConfig, width: int) -> ModelConfig:
    """The model at another residual width, every other width scaled with it; heads keep their size."""
    factor = width / model.d_model
    update = {"d_model": width, "head_dim": model.resolved_head_dim}
    for key in ("d_ff", "d_ff_expert", "n_heads", "n_kv_heads"):
        value = getattr(model, key) * factor
        if value < 1 or value != int(value):
            raise ConfigError(f"{FLAGS['width']} {width}: model.{key} ({getattr(model, key)}) x {width}/{model.d_model} is "
                              f"not a whole number; pick widths that scale every model width evenly")
        update[key] = int(value)
    return model.model_copy(update=update)


def scaled_vision(vision: VisionConfig, width: int) -> VisionConfig:
    """The vision encoder at another width, its MLP, heads and adapter scaled with it; heads keep their size."""
    factor = width / vision.d_model
    update = {}
    for key in MetaPBaseConfig.VISION_WIDTH_KEYS:
        value = getattr(vision, key) * factor
        if value < 1 or value != int(value):
            raise ConfigError(f"{FLAGS['vision_width']} {width}: vision.{key} ({getattr(vision, key)}) x {width}/"
                              f"{vision.d_model} is not a whole number; pick widths that scale every vision width evenly")
        update[key] = int(value)
    return vision.model_copy(update=update)


def ladder_config(cfg: Config, axis: Axis, value: int, proxy_value: int, parametrization: str, steps: int,
                  lr: float) -> Config:
    """One rung: this config at `value` of the axis, with the smallest rung as MetaP's proxy (unless the config
    names its own proxy), a constant LR from the first step, and `steps` steps."""
    base, vision = cfg.metap.base, cfg.vision
    if axis == "vision_width":
        if not vision.enabled:
            raise ConfigError(f"{FLAGS[axis]}: the config has no vision encoder (vision.enabled: false)")
        model, vision, proxy = cfg.model, scaled_vision(vision, value), scaled_vision(vision, proxy_value)
        if base.vision_d_model is None:
            base = base.model_copy(update={f"vision_{key}": getattr(proxy, key)
                                           for key in MetaPBaseConfig.VISION_WIDTH_KEYS})
    elif axis == "width":
        model, proxy = scaled_model(cfg.model, value), scaled_model(cfg.model, proxy_value)
        if base.d_model is None:
            base = base.model_copy(update={key: getattr(proxy, key) for key in base.WIDTH_KEYS})
    else:
        model = cfg.model.model_copy(update={"n_layers": value})
        if base.n_layers is None:
            base = base.model_copy(update={"n_layers": proxy_value})
    model = model.model_copy(update={"scan_layers": False})  # per-layer activations
    data = cfg.model_dump()
    data.update(model=model.model_dump(), vision=vision.model_dump(),
                metap={**cfg.metap.model_dump(), "parametrization": parametrization, "base": base.model_dump()},
                optim={**cfg.optim.model_dump(), "lr": lr, "schedule": "constant", "warmup_steps": 0},
                train={**cfg.train.model_dump(), "steps": steps})
    return build_config(data)


def module_means(intermediates: dict, by_kind: bool) -> dict[str, jax.Array]:
    """{module: mean |activation|}. Per layer ('layer3.ffn_out'), or per kind averaged over layers (for depth
    ladders, whose rungs have different layers) plus the last layer's residual stream."""
    means = {}
    for path, values in flat_paths(intermediates, is_leaf=lambda x: isinstance(x, tuple)).items():
        parts = path.split(".")
        name = parts[-1] if parts[0] != "unscanned" else f"layer{parts[1]}.{parts[-1]}"
        means[name] = jnp.mean(jnp.abs(values[0].astype(jnp.float32)))
    if not by_kind:
        return means
    layers = sorted({int(k.split(".")[0][5:]) for k in means if k.startswith("layer")})
    out = {k: v for k, v in means.items() if not k.startswith("layer")}
    for kind in ("attention_out", "ffn_out"):
        out[kind] = jnp.mean(jnp.stack([means[f"layer{i}.{kind}"] for i in layers]))
    out["last.block_out"] = means[f"layer{layers[-1]}.block_out"]
    return out


def measure(cfg: Config, batch: dict, by_kind: bool, seeds: Sequence[int]) -> Iterator[list[dict[str, float]]]:
    """Per seed, the mean |activation| per module before each of cfg.train.steps updates and after the last.
    The seeds share one compiled model and train step: only the initial parameters differ."""
    sharding = LogicalSharding(build_mesh(cfg.mesh, jax.devices()[:1]))
    model = define_model(cfg, sharding)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(cfg, model.rules, schedule)

    @jax.jit
    def activations(params, batch):
        decoder = bind(model, params)
        decoder(batch["inputs"], batch["positions"], batch["segment_ids"], images=batch_images(batch))
        return module_means(nnx.to_pure_dict(nnx.pop(decoder, nnx.Intermediate)), by_kind)

    step = jax.jit(train_step_fn(cfg, model, optimizer, schedule))
    init = initializer(cfg, model, sharding)
    for seed in seeds:
        state = init_state(init(seed), optimizer)
        rows = []
        for _ in range(cfg.train.steps):
            rows.append({k: float(v) for k, v in activations(state.params, batch).items()})
            state, _ = step(state, batch)
        rows.append({k: float(v) for k, v in activations(state.params, batch).items()})
        yield rows


@dataclasses.dataclass
class CoordCheck:
    axis: Axis
    parametrization: str
    values: list[int]  # the rungs: widths or depths
    means: dict[str, list[list[float]]]  # module -> [step][rung], averaged over seeds
    slopes: dict[str, list[float]]  # module -> [step]: d log2 |act| / d log2 value
    slope_errors: dict[str, list[float]] | None  # module -> [step]: standard error over seeds; None with one seed
    tolerance: float
    min_step: int

    def failures(self) -> list[tuple[str, int, float]]:
        return [(module, step, s) for module, per_step in self.slopes.items()
                for step, s in enumerate(per_step) if step >= self.min_step and abs(s) > self.tolerance]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        steps = len(next(iter(self.slopes.values())))
        header = ["module"] + [f"step {i}" for i in range(steps)] + ["result"]
        rows = []
        for module, per_step in self.slopes.items():
            bad = any(abs(s) > self.tolerance for s in per_step[self.min_step:])
            errors = self.slope_errors[module] if self.slope_errors else None
            cells = [f"{s:+.3f}" + (f" ±{e:.3f}" if errors else "") for s, e in zip(per_step, errors or per_step)]
            rows.append([module] + cells + ["FAIL" if bad else "pass"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"slope of log2 mean|activation| per doubling of {self.axis} ({self.parametrization}; pass: "
                 f"|slope| <= {self.tolerance} at steps >= {self.min_step})"
                 + ("; ± its standard error over seeds" if self.slope_errors else "")]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed,
                "failures": [{"module": m, "step": s, "slope": v} for m, s, v in self.failures()]}


def fit_slopes(values: Sequence[int], means: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    x = np.log2(np.asarray(values, float))
    return {module: [float(np.polyfit(x, np.log2(np.maximum(row, 1e-30)), 1)[0]) for row in per_step]
            for module, per_step in means.items()}


def slope_errors(values: Sequence[int], per_seed: Sequence[dict[str, list[list[float]]]]) -> dict[str, list[float]] | None:
    """The standard error of each slope over seeds, from every seed's own fit: how much of a slope is seed
    noise. None with fewer than two seeds."""
    if len(per_seed) < 2:
        return None
    fits = [fit_slopes(values, means) for means in per_seed]
    return {module: [float(np.std(step, ddof=1) / math.sqrt(len(fits))) for step in zip(*(f[module] for f in fits))]
            for module in fits[0]}


def coord_check(cfg: Config, axis: Axis, values: Sequence[int], parametrization: str, *, seeds: Sequence[int] = (0, 1),
                steps: int = 4, lr: float | None = None, tolerance: float = 0.1, min_step: int = 2,
                progress: Callable[[str], None] = lambda _: None) -> CoordCheck:
    values = sorted(values)
    if len(values) < 2:
        raise ConfigError(f"{FLAGS[axis]}: need at least two rungs to fit a slope, got {values}")
    batch = build_datasets(cfg).train[0]
    if axis == "vision_width" and "pixels" not in batch:
        raise ConfigError(f"{FLAGS[axis]}: the config's data has no images (data.sources: an image_caption source)")
    per_rung: dict[int, list[list[dict[str, float]]]] = defaultdict(list)
    for value in values:
        rung = ladder_config(cfg, axis, value, values[0], parametrization, steps, lr or cfg.optim.lr)
        for seed, rows in zip(seeds, measure(rung, batch, axis == "depth", seeds)):
            per_rung[value].append(rows)
            progress(f"{axis} {value}, seed {seed}")
    modules = list(per_rung[values[0]][0][0])
    per_seed = [{m: [[per_rung[v][i][step][m] for v in values] for step in range(steps + 1)] for m in modules}
                for i in range(len(seeds))]  # [seed] module -> [step][rung]
    means = {m: np.mean([run[m] for run in per_seed], axis=0).tolist() for m in modules}
    return CoordCheck(axis, parametrization, list(values), means, fit_slopes(values, means),
                      slope_errors(values, per_seed), tolerance, min_step)


def plot(check: CoordCheck, path: Path) -> None:
    steps = len(next(iter(check.means.values())))
    legend_rows = math.ceil(len(check.means) / 6)
    with figure(path, steps, (4.2, 3.4), columns=min(steps, 3), sharey=True,
                layout_rect=(0, 0.08 + 0.02 * legend_rows, 1, 0.96)) as (fig, axes):
        for step, ax in enumerate(axes):
            for module, per_step in check.means.items():
                ax.plot(check.values, per_step[step], "o-", markersize=3, label=module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            finish(ax, check.axis, "mean |activation|" if step == 0 else None, f"step {step}", legend_size=None)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7)
        verdict = "pass" if check.passed else f"FAIL ({len(check.failures())} module-steps)"
        fig.suptitle(f"coordinate check vs {check.axis}: {check.parametrization} - {verdict}")


def write(check: CoordCheck, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"coord_{check.axis}_{check.parametrization}"
    png, js = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
    plot(check, png)
    js.write_text(json.dumps(check.to_json(), indent=2))
    return png, js
