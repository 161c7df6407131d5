"""Model FLOPs per token, counted per layer from the config (no tracing).

Conventions (those of MFU reports): a matmul of [m, k] x [k, n] costs 2mkn; a training step costs 3x the
forward pass (backward = 2x forward); element-wise work, norms and the embedding lookup are not counted;
the unembedding is. Attention scores and the weighted sum cost 2 * 2 * heads * head_dim per attended key,
and a query attends to the keys its mask allows: causal attention counts each (query, key) pair once,
chunked attention only its window. MoE counts the router, the shared expert and top_k routed experts.

`executed=True` counts what a plain implementation actually computes instead: full [T, T] score matrices
and every expert on every token (dense dispatch). That is the number XLA's cost analysis reports.
"""

from __future__ import annotations

from maxllama.config.schema import Config, ModelConfig, VisionConfig


def mean_attended_keys(seq_len: int, chunk: int | None) -> float:
    """Average over query positions 0..T-1 of how many keys a causal (optionally chunked) query sees."""
    if chunk is None or chunk >= seq_len:
        return (seq_len + 1) / 2
    full, rest = divmod(seq_len, chunk)
    return (full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2) / seq_len


def layer_forward_flops(cfg: ModelConfig, layer: int, seq_len: int, executed: bool = False) -> float:
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    projections = 2 * d * (h * hd + 2 * kv * hd) + 2 * h * hd * d
    chunk = None if cfg.is_nope(layer) else cfg.attn_chunk
    keys = seq_len if executed else mean_attended_keys(seq_len, chunk)
    attention = 2 * 2 * h * hd * keys
    if cfg.is_moe(layer):
        expert = 2 * 3 * d * cfg.d_ff_expert
        routed = cfg.n_experts if executed else cfg.top_k
        ffn = 2 * d * cfg.n_experts + routed * expert + (expert if cfg.shared_expert else 0)
    else:
        ffn = 2 * 3 * d * cfg.d_ff
    return projections + attention + ffn


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, executed: bool = False) -> float:
    layers = sum(layer_forward_flops(cfg, i, seq_len, executed) for i in range(cfg.n_layers))
    return layers + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, executed: bool = False) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len, executed)


def vision_forward_flops_per_tile(v: VisionConfig, text_d_model: int) -> float:
    """The vision encoder on one tile: the patch embedding, every layer over the patches and the class token
    (attention without a mask: each token attends to all), the adapter and the projector after the shuffle."""
    d, f, n = v.d_model, v.d_ff, v.grid ** 2 + 1
    patch_embedding = 2 * v.grid ** 2 * (3 * v.patch_size ** 2) * d
    layer = n * (4 * 2 * d * d + 2 * 2 * d * f) + 2 * 2 * n * n * d
    shuffled = v.tokens_per_tile
    adapter = shuffled * (2 * (d / v.pixel_shuffle_ratio ** 2) * v.projector_dim + 2 * v.projector_dim ** 2)
    return patch_embedding + v.n_layers * layer + adapter + shuffled * 2 * v.projector_dim * text_d_model


def step_train_flops_per_token(cfg: Config) -> float:
    """A train step's model FLOPs per text token: the decoder's, and with a vision encoder, the encoder's on every
    tile of the step's budget (the encoder runs on each, used or left blank) shared over the step's tokens."""
    text = train_flops_per_token(cfg.model, cfg.train.seq_len)
    if not cfg.vision.enabled:
        return text
    tiles_per_token = cfg.vision.row_tiles / cfg.train.seq_len
    return text + 3 * vision_forward_flops_per_tile(cfg.vision, cfg.model.d_model) * tiles_per_token
