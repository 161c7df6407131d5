"""Build the device mesh from the config's axis sizes (one -1 absorbs the remaining devices)."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from maxllama.base.errors import UserError
from maxllama.config.schema import MeshConfig
from maxllama.parallel.rules import MESH_AXES


class MeshError(UserError, ValueError):
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
    """The mesh over `devices` (default: all). With DCN factors, the data/fsdp axes are split into an outer
    part across slices or nodes and an inner part within one, so that the heavy collectives stay inside."""
    devices = list(devices if devices is not None else jax.devices())
    local = len([d for d in devices if d.process_index == devices[0].process_index])
    axes = {axis: local if size == "local" else size for axis, size in cfg.axes.items()}
    sizes = resolve_axis_sizes(axes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = {"data": cfg.dcn_data, "fsdp": cfg.dcn_fsdp}
    if all(f == 1 for f in dcn.values()):
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    for axis, factor in dcn.items():
        if sizes[axis] % factor:
            raise MeshError(f"mesh.dcn_{axis}: {factor} does not divide mesh.{axis} ({sizes[axis]})")
    dcn_shape = tuple(dcn.get(a, 1) for a in MESH_AXES)
    ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=True)
    except (ValueError, AssertionError) as e:
        raise MeshError(f"mesh.dcn_*: cannot split {shape} into {ici_shape} within and {dcn_shape} across "
                        f"slices/hosts ({e})") from None
    return Mesh(grid, MESH_AXES)
