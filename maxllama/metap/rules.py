"""The rules table of docs/metap.md: from a parameter's role and width ratio to its init std, learning-rate
multiplier, weight decay and Adam eps, and from the run's shape to the model's forward multipliers.

Every number is a function of the config alone (`metap.*`, `optim.*`) and of the ratios between this run
and the proxy it was tuned on. With every ratio 1 the rules return the proxy's own values, so a proxy is
its own target; `parametrization: standard` returns the one-std, one-LR contrast.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from maxllama.config.schema import Config
from maxllama.metap.shapes import proxy_model

Role = Literal["embedding", "hidden", "readout", "router", "vector"]
ROLES: tuple[Role, ...] = ("embedding", "hidden", "readout", "router", "vector")


@dataclasses.dataclass(frozen=True)
class Scales:
    """Ratios of this run to the proxy: m_d (residual width), m_L (depth), m_B (batch), m_D (tokens)."""

    width: float = 1.0
    depth: float = 1.0
    batch: float = 1.0
    tokens: float = 1.0


def run_scales(cfg: Config) -> Scales:
    m, t, base = cfg.model, cfg.train, cfg.metap.base
    tokens = t.steps * t.batch_size * t.seq_len
    return Scales(width=m.d_model / (base.d_model or m.d_model),
                  depth=m.n_layers / (base.n_layers or m.n_layers),
                  batch=t.batch_size / (base.batch_size or t.batch_size),
                  tokens=tokens / (base.tokens or tokens))


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """The forward multipliers the model reads (hashable: modules may hold it)."""

    name: str
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    router_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float = 1.0  # multiplies q.k


def parametrization_for(cfg: Config) -> Parametrization:
    mp, head_dim = cfg.metap, cfg.model.resolved_head_dim
    if mp.parametrization == "standard":
        return Parametrization("standard", attention_scale=head_dim ** -0.5)
    s, e = run_scales(cfg), mp.exponents
    # alpha_attn / head_dim^e, alpha_attn defaulting to proxy head_dim^(e - 1/2): 1/sqrt(head_dim) at the proxy.
    alpha_attention = mp.alpha_attention
    if alpha_attention is None:
        alpha_attention = proxy_model(cfg).resolved_head_dim ** (e.attention - 0.5)
    return Parametrization(
        "metap",
        embedding_multiplier=mp.alpha_embedding,
        output_multiplier=mp.alpha_output * s.width ** -e.output,
        router_multiplier=mp.alpha_router * s.width ** -e.output,
        residual_multiplier=mp.alpha_residual * s.depth ** -mp.depth_alpha,
        attention_scale=alpha_attention * head_dim ** -e.attention)


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """What the rules decide for one parameter."""

    role: Role
    ratio: float  # m: the fan-in ratio to the proxy (fan-out for embeddings and gains)
    init_std: Optional[float]  # None: initialised to ones (norm gains)
    lr_multiplier: float  # x optim.lr (x the schedule)
    weight_decay: float  # decoupled, x the parameter's learning rate
    adam_eps: float
    clip_weight: float = 1.0  # x this parameter's squared gradient norm in the norm that gradient clipping bounds

    def peak_lr(self, cfg: Config) -> float:
        return cfg.optim.lr * self.lr_multiplier


def global_lr_factor(cfg: Config, s: Scales) -> float:
    """m_B^kappa x m_D^-beta: what the fitted batch-size and horizon exponents do to every LR."""
    return s.batch ** cfg.metap.kappa * s.tokens ** -cfg.metap.beta


def param_rule(cfg: Config, role: Role, ratio: float, *, in_branch: bool, query: bool = False,
               fan_out_ratio: float | None = None) -> ParamRule:
    """The rules table for AdamW (docs/metap.md), one row per role. `in_branch`: the parameter sits inside a residual
    branch, so the branch multiplier m_L^-alpha scales its gradient and its output; `query`: a query projection;
    `fan_out_ratio`: how much a hidden matrix's fan-out grew against the proxy (default: as much as its fan-in)."""
    mp, o = cfg.metap, cfg.optim
    if mp.parametrization == "standard":
        vector = role == "vector"
        return ParamRule(role, ratio, None if vector else mp.init_std, 1.0,
                         0.0 if vector else o.weight_decay, o.eps)
    s, e = run_scales(cfg), mp.exponents
    alpha = mp.depth_alpha
    # CompleteP's depth factors undo what the branch multiplier does to a parameter inside a branch (its
    # gradient and its share of the residual stream scale as m_L^-alpha); the embedding, the final norm and
    # the readout sit outside every branch, so depth leaves them alone.
    depth_lr, depth_eps = (s.depth ** (alpha - 1), s.depth ** -alpha) if in_branch else (1.0, 1.0)
    eta = global_lr_factor(cfg, s)
    wd = o.weight_decay
    if mp.weight_decay_timescale:  # keep tau = B / (lr * wd * D) of the proxy
        wd *= s.batch / (eta * s.tokens)
    lr = eta * depth_lr  # x each group's constant (and the hidden matrices' 1 / m)
    eps = o.eps * s.width ** -e.eps * depth_eps
    m_lr = ratio ** e.hidden_lr
    # A hidden matrix whose fan-out grows less than its fan-in (the vision projector when only the tower widens)
    # leans towards a readout: the layer below updates along its rows, and the product would grow as
    # sqrt(fan-in / fan-out). Its init keeps the spectral norm at sqrt(fan-out / fan-in) instead.
    lean = (fan_out_ratio / ratio) ** 0.5 if fan_out_ratio is not None and fan_out_ratio < ratio else 1.0
    init_std, lr_multiplier, weight_decay = {
        "embedding": (mp.sigma_embedding, lr * mp.lr_embedding * ratio ** -e.embedding_lr, wd * mp.wd_embedding),
        "hidden": (mp.sigma_hidden * ratio ** -e.hidden_init * lean, lr * mp.lr_hidden / m_lr,
                   wd * mp.wd_hidden * m_lr),
        "vector": (None, lr * mp.lr_vector, 0.0),
        "readout": (mp.sigma_readout, lr * mp.lr_readout, wd * mp.wd_readout),
        "router": (mp.sigma_readout, lr * mp.lr_router, wd * mp.wd_router),
    }[role]
    if query and mp.zero_init_query:
        init_std = 0.0
    # Under muP the gradient of a hidden matrix keeps its norm as width grows, while every other parameter's
    # shrinks as m^-1/2 (an m_d^-1 gradient per entry over m_d x more entries). The plain global norm is thus
    # dominated by the embedding and readout at the proxy and by the hidden matrices at the target, and one
    # threshold would clip the two differently; weighting restores the proxy's norm at every width.
    clip_weight = 1.0 if role == "hidden" else ratio ** e.clip_norm
    return ParamRule(role, ratio, init_std, lr_multiplier, weight_decay, eps, clip_weight)
