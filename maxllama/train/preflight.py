"""`maxllama preflight CONFIG`: compile the train step ahead of time for the configured mesh, from abstract
shapes (nothing is allocated), and report what each device will hold and compute."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maxllama.base.state import TrainState
from maxllama.config.schema import Config
from maxllama.model.build import define_model, param_shardings, sharded_abstract_params
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding, make_rules
from maxllama.train.flops import step_train_flops_per_token
from maxllama.train.optimizer import build_optimizer
from maxllama.train.schedules import make_schedule
from maxllama.train.step import optimizer_state_shardings, train_step_fn


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory per device than `mesh.device_memory_gb`."""


@dataclasses.dataclass
class Preflight:
    devices: int
    mesh: dict
    params_gb: float  # per device
    optimizer_gb: float
    temporaries_gb: float  # activations and scratch of the step
    total_gb: float
    flops_per_step: float  # model FLOPs of one global step
    flops_per_device: float
    replicated: list[str]  # large parameters left whole on every device

    def report(self) -> str:
        def size(gb: float) -> str:
            return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"
        lines = [f"mesh {self.mesh} ({self.devices} devices); per device: parameters {size(self.params_gb)}, "
                 f"optimizer state {size(self.optimizer_gb)}, activations and temporaries {size(self.temporaries_gb)}, "
                 f"total {size(self.total_gb)}",
                 f"model FLOPs per step {self.flops_per_step:.3e} ({self.flops_per_device:.3e} per device)"]
        if self.replicated:
            lines.append(f"warning: large parameters left replicated on every device: {', '.join(self.replicated[:5])}")
        return "\n".join(lines)


def _per_device_gb(tree) -> float:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total / 1e9


def replicated_parameters(abstract_params: dict, shardings: dict, min_size: int = 1 << 20) -> list[str]:
    """Names of parameters of at least `min_size` values that no mesh axis splits (on a mesh of > 1 device)."""
    names = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings)):
        if np.prod(leaf.shape) >= min_size and sharding.mesh.size > 1 and sharding.is_fully_replicated:
            names.append(".".join(str(getattr(k, "key", k)) for k in path))
    return names


def preflight(cfg: Config, devices=None) -> Preflight:
    mesh = build_mesh(cfg.mesh, devices)
    sharding = LogicalSharding(mesh, make_rules(cfg.mesh.rules))
    model = define_model(cfg, sharding)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(cfg, model.rules, schedule)
    shardings = param_shardings(model, sharding)
    params = sharded_abstract_params(model, sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(optimizer.init, params), optimizer_state_shardings(optimizer, params))
    state = TrainState(jax.ShapeDtypeStruct((), np.int32, sharding=replicated), params, opt_state)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    batch_sharding = sharding.named(("batch", "seq"))
    batch = {k: jax.ShapeDtypeStruct((b, t), np.int32, sharding=batch_sharding)
             for k in ("inputs", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((b, t), np.float32, sharding=batch_sharding)
    if cfg.vision.enabled:  # the tile budget of every row, as the data pipeline fills it
        v = cfg.vision
        batch["pixels"] = jax.ShapeDtypeStruct((b, v.row_tiles, 3, v.image_size, v.image_size), np.uint8,
                                               sharding=batch_sharding)
        batch["patch_mask"] = jax.ShapeDtypeStruct((b, t), np.bool_, sharding=batch_sharding)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    compiled = jax.jit(train_step_fn(cfg, model, optimizer, schedule), out_shardings=(state_shardings, None),
                       donate_argnums=0).lower(state, batch).compile()
    memory = compiled.memory_analysis()
    params_gb, optimizer_gb = _per_device_gb(params), _per_device_gb(opt_state)
    temporaries_gb = getattr(memory, "temp_size_in_bytes", 0) / 1e9
    total_gb = params_gb + optimizer_gb + temporaries_gb + _per_device_gb(batch)
    flops = step_train_flops_per_token(cfg) * b * t
    result = Preflight(mesh.size, dict(mesh.shape), params_gb, optimizer_gb, temporaries_gb, total_gb, flops,
                       flops / mesh.size, replicated_parameters(params, shardings))
    if cfg.mesh.device_memory_gb and total_gb > cfg.mesh.device_memory_gb:
        raise DoesNotFit(f"{result.report()}\nneeds {total_gb:.1f} GB per device but mesh.device_memory_gb is "
                         f"{cfg.mesh.device_memory_gb:g}: shard more (mesh.fsdp, mesh.tensor), set model.remat, "
                         f"or lower train.batch_size")
    return result
