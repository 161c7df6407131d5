"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay, or constant.

Warmup reaches the peak at step `warmup_steps` and starts at lr/warmup (not 0), so no step is wasted.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from maxllama.config.schema import OptimConfig


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, warmup, floor = optim.lr, optim.warmup_steps, optim.lr * optim.min_lr_ratio
    decay_steps = int(round(optim.decay_fraction * total_steps))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
        if optim.schedule == "constant":
            after = peak
        elif optim.schedule == "cosine":
            progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        else:  # wsd: hold the peak, then decay linearly to the floor over the last decay_steps
            start = total_steps - decay_steps
            progress = jnp.clip((step - start) / max(decay_steps, 1), 0.0, 1.0)
            after = peak + (floor - peak) * progress
        return jnp.where(step < warmup, warm, after)

    return schedule
