"""The jit-compiled train and eval steps over a pure-pytree train state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from maxllama.base.state import TrainState
from maxllama.config.schema import Config
from maxllama.model.build import ModelDef, bind
from maxllama.model.decoder import DecoderOutput, Images
from maxllama.train.loss import next_token_nll, training_loss
from maxllama.train.optimizer import rule_field, weighted_global_norm


def batch_images(batch: dict) -> Images | None:
    """The images of a batch, when it has any."""
    return Images.from_uint8(batch["pixels"], batch["patch_mask"]) if "pixels" in batch else None


def forward(model: ModelDef, params: dict, batch: dict) -> DecoderOutput:
    """The model on a batch: tokens, their documents and positions, and the images when the batch has any."""
    return bind(model, params)(batch["inputs"], batch["positions"], batch["segment_ids"], images=batch_images(batch))


def train_step_fn(cfg: Config, model: ModelDef, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule) -> Callable:
    def loss_fn(params, batch):
        return training_loss(forward(model, params, batch), batch, cfg.train)

    weights = rule_field(model.rules, "clip_weight")

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A NaN/Inf loss or gradient leaves the state as it was: a non-finite state never exists to be saved.
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics |= {"grad_norm": grad_norm, "clip_norm": weighted_global_norm(grads, weights),
                    "learning_rate": schedule(state.step),
                    "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def eval_step_fn(model: ModelDef) -> Callable:
    def eval_step(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        return next_token_nll(forward(model, params, batch).logits, batch["targets"], batch["loss_mask"])

    return eval_step


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def compile_steps(cfg: Config, model: ModelDef, optimizer, schedule, state: TrainState, batch_sharding):
    """jit the steps with the state's shardings pinned, the old state donated (updated in place)."""
    state_shardings = shardings_of(state)
    train_step = jax.jit(train_step_fn(cfg, model, optimizer, schedule),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    eval_step = jax.jit(eval_step_fn(model), in_shardings=(state_shardings.params, batch_sharding))
    return train_step, eval_step


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Moments sharded like their parameters, scalars (counts) replicated. `params` may be abstract."""
    param_shardings = shardings_of(params)
    replicated = NamedSharding(jax.tree.leaves(param_shardings)[0].mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
                                 param_shardings, transform_non_params=lambda _: replicated)


def init_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """The initial train state on the params' mesh (see `optimizer_state_shardings`; the step replicated)."""
    opt_state = jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params))(params)
    replicated = NamedSharding(jax.tree.leaves(shardings_of(params))[0].mesh, PartitionSpec())
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
