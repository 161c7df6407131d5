"""Training objective: masked next-token cross-entropy plus the MoE auxiliary losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxllama.config.schema import TrainConfig
from maxllama.model.decoder import DecoderOutput


def next_token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of masked negative log-likelihoods, number of counted tokens); logits in fp32."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def training_loss(out: DecoderOutput, batch: dict, train: TrainConfig) -> tuple[jax.Array, dict]:
    nll, count = next_token_nll(out.logits, batch["targets"], batch["loss_mask"])
    loss = nll / jnp.maximum(count, 1.0)
    metrics = {"loss": loss, "loss_tokens": count}
    total = loss
    if out.moe is not None:
        balance = jnp.mean(out.moe.load_balance_loss)
        z = jnp.mean(out.moe.router_z_loss)
        total = total + train.load_balance_weight * balance + train.router_z_weight * z
        n_experts = out.moe.expert_load.shape[-1]
        metrics |= {"load_balance_loss": balance, "router_z_loss": z,
                    # 1.0 is perfect balance; n_experts means one expert takes everything.
                    "expert_load_max": jnp.max(out.moe.expert_load) * n_experts,
                    "moe_dropped_fraction": jnp.mean(out.moe.dropped_fraction)}
    metrics["total_loss"] = total
    return total, metrics
