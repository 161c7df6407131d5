"""Orbax checkpoints of the train state, and the resume policy (`resume: auto | never | require`).

A checkpoint is one Orbax step with two items, `params` and `opt_state`, so a model can be restored without
its optimizer (sampling, scoring, export, `init_from:`); an imported model has `params` alone. The data order
is a function of (seed, step), so the step is all the data pipeline needs to resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from maxllama.train.step import TrainState


class ResumeError(RuntimeError):
    """The resume policy cannot be honoured (no checkpoint to require, or one in the way of `never`)."""


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings of `tree`'s arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: Path, *, every_steps: int = 0, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self.every_steps = every_steps

    @property
    def directory(self) -> Path:
        return Path(self.manager.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0 and step not in self.manager.all_steps()

    def save(self, step: int, state: TrainState, *, data_state: dict | None = None) -> bool:
        """Save `state` as checkpoint `step` (passed in, not read from `state`, so nothing waits for the
        device), with the data iterator's state as a cross-check for resuming."""
        if step in self.manager.all_steps():
            return False
        items = {"params": ocp.args.StandardSave(state.params), "opt_state": ocp.args.StandardSave(state.opt_state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def data_state(self, step: int) -> dict | None:
        """The data-iterator state saved with checkpoint `step`, if any."""
        if "data" not in (self.manager.item_metadata(step) or {}):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def save_params(self, step: int, params: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore into the structure, dtypes and shardings of `target` (abstract or concrete)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target.params)),
            opt_state=ocp.args.StandardRestore(abstract_tree(target.opt_state))))
        return TrainState(jax.numpy.asarray(step, jax.numpy.int32), restored.params, restored.opt_state)

    def restore_params(self, step: int, target: Any) -> dict:
        """Parameters alone, cast to the target's dtypes and laid out with its shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target))))
        return restored.params

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def step_to_resume(checkpointer: Checkpointer, policy: str) -> int | None:
    """The checkpoint step to restore, or None to start fresh."""
    latest = checkpointer.latest_step()
    if policy == "never":
        if latest is not None:
            raise ResumeError(f"resume: 'never' but the run directory already has checkpoints (step {latest}); "
                              "pick a new run.dir, or resume=auto to continue it")
        return None
    if policy == "require" and latest is None:
        raise ResumeError("resume: 'require' but the run directory has no checkpoint; "
                          "use resume=auto to start fresh when none exists")
    return latest
