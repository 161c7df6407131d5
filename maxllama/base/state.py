"""The train state: a pure pytree, so that jit, sharding and checkpoints treat it as plain arrays."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any
