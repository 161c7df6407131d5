"""A model directory: `config.yaml` + `checkpoints/<step>/` — a run directory, or what `convert hf-import`
writes. Sampling, scoring, export and `init_from:` all load models through here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import jax
import orbax.checkpoint as ocp

from maxllama.checkpoint.manager import Checkpointer
from maxllama.config import ConfigError, load_config
from maxllama.config.schema import Config
from maxllama.model.build import ModelDef, define_model, sharded_abstract_params
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding, make_rules


class LoadedModel(NamedTuple):
    cfg: Config
    model: ModelDef
    params: dict
    sharding: LogicalSharding
    step: int


def locate_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(model directory, step) for a model directory (newest checkpoint) or one of its step folders."""
    path = Path(path)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if not (path / "checkpoints").is_dir():
        raise ConfigError(f"{path}: not a model directory (expected config.yaml and checkpoints/ inside)")
    steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
        raise ConfigError(f"{path}/checkpoints: no checkpoint saved yet")
    return path, steps[-1]


def saved_parts(step_dir: Path) -> set[str]:
    """The top-level parts (`embed`, `groups`, `vision`, ...) of the parameters saved in a checkpoint."""
    tree = ocp.StandardCheckpointHandler().metadata(step_dir.resolve() / "params")
    return {str(getattr(path[0], "key", path[0])) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def restore_params_into(path: str | Path, cfg: Config, model: ModelDef, sharding: LogicalSharding,
                        fresh: Callable[[], dict] | None = None, log=print) -> tuple[dict, int]:
    """Parameters of the checkpoint at `path`, shaped and sharded for `model`; errors name the mismatch. A text
    checkpoint can start a model with a vision encoder: `fresh()` gives the encoder, newly initialised."""
    directory, step = locate_checkpoint(path)
    target = sharded_abstract_params(model, sharding)
    new_vision = fresh is not None and set(target) - saved_parts(directory / "checkpoints" / str(step)) == {"vision"}
    if new_vision:
        log(f"{directory}/checkpoints/{step} has no vision encoder: it starts freshly initialised")
        target = {k: v for k, v in target.items() if k != "vision"}
    checkpointer = Checkpointer(directory / "checkpoints", read_only=True)
    try:
        restored = checkpointer.restore_params(step, target)
        return ({**restored, "vision": fresh()["vision"]} if new_vision else restored), step
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{directory}/checkpoints/{step}: parameters do not fit model config "
                          f"({str(e).splitlines()[0][:200]})") from None
    finally:
        checkpointer.close()


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The config of a model directory (or one of its step folders), for one host's devices; no parameters are
    read: what checking the inputs of a command against the model needs, before a large checkpoint loads."""
    directory, _ = locate_checkpoint(path)
    config_path = directory / "config.yaml"
    if not config_path.exists():
        raise ConfigError(f"{directory}: config.yaml missing; a model directory needs the config it was saved with")
    cfg, _ = load_config(config_path, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "mesh.expert=1",
                                       *(overrides or [])])
    return cfg


def load_model_dir(path: str | Path, overrides: list[str] | None = None, devices=None) -> LoadedModel:
    cfg = load_model_config(path, overrides)
    mesh = build_mesh(cfg.mesh, devices)
    sharding = LogicalSharding(mesh, make_rules(cfg.mesh.rules))
    model = define_model(cfg, sharding)
    params, step = restore_params_into(path, cfg, model, sharding)
    return LoadedModel(cfg, model, params, sharding, step)
