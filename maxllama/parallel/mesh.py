"""Build the device mesh from the config's axis sizes (one -1 absorbs the remaining devices)."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from maxllama.config.schema import MeshConfig
from maxllama.parallel.axes import MESH_AXES



class MeshError(ValueError):
    """The configured mesh does not fit the available devices."""


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    resolved = dict(sizes)
    free = [name for name, size in sizes.items() if size == -1]
    if free:
        if n_devices % fixed:
            raise MeshError(f"mesh: fixed axes ({fixed} devices) do not divide the {n_devices} available devices")
        resolved[free[0]] = n_devices // fixed
    total = int(np.prod(list(resolved.values())))
    if total != n_devices:
        shape = " x ".join(f"{k}={v}" for k, v in resolved.items())
        raise MeshError(f"mesh: {shape} needs {total} devices but {n_devices} are available; "
                        f"set one mesh axis to -1 to absorb the rest")
    return resolved


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_axis_sizes(cfg.axes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
