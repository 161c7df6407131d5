"""The parametrization: the one place that knows init scales, forward multipliers and per-parameter LR
multipliers. The model asks it for every such number and hard-codes none.

Parameters are classified by role (how their shape relates to width, METAP.md):
  embedding  input-like: only fan-out scales with width
  hidden     both dimensions scale (attention and FFN matrices, each expert)
  readout    output-like: only fan-in scales (unembedding)
  router     readout-like matrix whose outputs are expert logits
  vector     norm gains and biases
Standard parametrization (GPT-style: one init std, one global LR, 1/sqrt(head_dim) attention) is the
contrast that MetaP is measured against and the default while MetaP is off.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from maxllama.config.schema import Config

Role = Literal["embedding", "hidden", "readout", "router", "vector"]
ROLES: tuple[Role, ...] = ("embedding", "hidden", "readout", "router", "vector")


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """Scale-dependent numbers for one model. Instances are static (hashable) so modules may hold them."""

    name: str
    base_init_std: float
    output_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale_exponent: float = 0.5  # attention logits are scaled by head_dim ** -exponent

    def init_std(self, role: Role, fan_in: int) -> float:
        """Std of the normal init of a parameter with this role; vectors are initialised to ones."""
        del fan_in  # standard parametrization: one std for every matrix
        if role == "vector":
            raise ValueError("vector parameters (norm gains) are initialised to ones, not sampled")
        return self.base_init_std

    def attention_scale(self, head_dim: int) -> float:
        return head_dim ** -self.attention_scale_exponent

    def lr_multiplier(self, role: Role, fan_in: int) -> float:
        del role, fan_in
        return 1.0

    def weight_decay_multiplier(self, role: Role) -> float:
        """Decoupled weight decay applies to matrices, never to norm gains."""
        return 0.0 if role == "vector" else 1.0


def parametrization_for(cfg: Config) -> Parametrization:
    return Parametrization(name="standard", base_init_std=cfg.metap.init_std)


def describe(parametrization: Parametrization, metadata: dict) -> dict:
    """Every parameter's resolved init std, LR and weight-decay multipliers, and the model-wide multipliers:
    what a checkpoint records so that a run can be reproduced and compared."""
    import jax
    table = jax.tree.map(
        lambda m: {"role": m["role"], "fan_in": m["fan_in"],
                   "init_std": None if m["role"] == "vector" else parametrization.init_std(m["role"], m["fan_in"]),
                   "lr_multiplier": parametrization.lr_multiplier(m["role"], m["fan_in"]),
                   "weight_decay_multiplier": parametrization.weight_decay_multiplier(m["role"])},
        metadata, is_leaf=lambda x: isinstance(x, dict) and "role" in x)
    return {"name": parametrization.name, "output_multiplier": parametrization.output_multiplier,
            "residual_multiplier": parametrization.residual_multiplier,
            "attention_scale_exponent": parametrization.attention_scale_exponent,
            "parameters": table}
