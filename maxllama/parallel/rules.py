"""The single table that maps logical axis names to mesh axes, and the helpers that apply it.

Parameters and activations name their dimensions logically (`embed`, `heads`, `expert`, ...); only this
table knows how those names land on the mesh. A mesh axis is used at most once per array: a later
logical axis that maps to an axis already taken stays replicated (so activations can reuse parameter
names: `batch` takes `fsdp`, and `embed` of the same activation is then left whole).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxllama.config import ConfigError

MeshAxes = tuple[str, ...]
MESH_AXES = ("data", "fsdp", "tensor", "expert")  # how devices are arranged, outermost first

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "vocab": ("tensor",),
    "layers": (),
    "patch": (),  # the pixels of one flattened image patch
}
LOGICAL_AXES = tuple(DEFAULT_RULES)  # what a dimension means: every name the model may use


def make_rules(overrides: Optional[Mapping[str, Optional[str | Sequence[str]]]] = None) -> dict[str, MeshAxes]:
    """The default table with `mesh.rules` applied; an unknown logical or mesh axis is a ConfigError."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if name not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis; rules map one of {', '.join(LOGICAL_AXES)}")
        rules[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in rules[name]:
            if axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{name}: names mesh axis '{axis}', which the mesh lacks "
                                  f"(axes: {', '.join(MESH_AXES)})")
    return rules


def logical_to_spec(names: Sequence[Optional[str]], rules: Mapping[str, MeshAxes],
                    mesh_axes: Sequence[str]) -> PartitionSpec:
    used: set[str] = set()
    spec = []
    for name in names:
        axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a in mesh_axes and a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True, eq=False)
class LogicalSharding:
    """A mesh plus the rules table: turns logical names into shardings and constrains activations."""

    mesh: Mesh
    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def spec(self, names: Sequence[Optional[str]]) -> PartitionSpec:
        return logical_to_spec(names, self.rules, self.mesh.axis_names)

    def named(self, names: Sequence[Optional[str]]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def constrain(self, x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.named(names))
