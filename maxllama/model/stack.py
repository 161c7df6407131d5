"""Identical layers stacked on a leading `layers` axis, to run with one `lax.scan`: compile time stays flat in
depth."""

from __future__ import annotations

from typing import Callable, TypeVar

from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def stacked(make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
    """`n` modules from `make`, their parameters stacked (each drawn from its own split of `rngs`) and named
    with a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> M:
        return make(rngs)

    module = create(rngs)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("logical_axes", ("layers",) + variable.get_metadata("logical_axes"))
    return module
