"""Hugging Face Llama 4 `config.json` <-> maxllama `model:` section.

maxllama describes the layer pattern by two periods (`nope_every`, `moe_every`); a checkpoint whose explicit
`no_rope_layers` / `moe_layers` lists follow no such period cannot be represented and is refused, naming
the field, rather than imported wrongly.
"""

from __future__ import annotations

from typing import Any, Mapping

from maxllama.config.schema import ModelConfig
from maxllama.interop import InteropError

TEXT_MODEL_TYPES = ("llama4_text",)
MULTIMODAL_MODEL_TYPES = ("llama4",)


def text_config(hf: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """(the text model's config, the weight-name prefix of the text model)."""
    model_type = hf.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        return hf, ""
    if model_type in MULTIMODAL_MODEL_TYPES:
        if "text_config" not in hf:
            raise InteropError("config.json: model_type 'llama4' without 'text_config'")
        return hf["text_config"], "language_model."
    raise InteropError(f"config.json: model_type {model_type!r} is not a Llama 4 model "
                       f"(expected one of {', '.join(TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES)})")


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise InteropError(f"config.json: required field '{key}' is missing")
    return hf[key]


def _period(layers: list[int], n_layers: int, field: str, default_period: int) -> int:
    """The period p with layers == [p-1, 2p-1, ...]; 0 for none."""
    if not layers:
        return 0
    candidates = [default_period] + list(range(1, n_layers + 1))
    for p in candidates:
        if p > 0 and layers == list(range(p - 1, n_layers, p)):
            return p
    raise InteropError(f"config.json: '{field}' = {layers} is not a regular interleave pattern "
                       f"(layers p-1, 2p-1, ...), which maxllama cannot represent")


def model_config_from_hf(hf_root: Mapping[str, Any]) -> dict[str, Any]:
    """The `model:` section (as a dict for the config loader) of an HF Llama 4 config."""
    hf, _ = text_config(hf_root)
    if hf.get("tie_word_embeddings"):
        raise InteropError("config.json: tie_word_embeddings=true; Llama 4 and maxllama use untied embeddings")
    if hf.get("attention_bias"):
        raise InteropError("config.json: attention_bias=true; the Llama 4 text model has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r} (only 'silu' SwiGLU is supported)")
    n_layers = _require(hf, "num_hidden_layers")
    d_model = _require(hf, "hidden_size")
    n_heads = _require(hf, "num_attention_heads")
    interval = hf.get("no_rope_layer_interval", 4)
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(no_rope) != n_layers:
        raise InteropError(f"config.json: 'no_rope_layers' has {len(no_rope)} entries for {n_layers} layers")
    nope_every = _period([i for i, uses_rope in enumerate(no_rope) if not uses_rope], n_layers,
                         "no_rope_layers", interval)
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    moe_layers = list(range(step - 1, n_layers, step)) if moe_layers is None else list(moe_layers)
    moe_every = _period(moe_layers, n_layers, "moe_layers", step)

    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InteropError(f"config.json: rope type {rope_type!r} (supported: 'default', 'llama3')")
    scaling = None
    if rope_type == "llama3":
        scaling = {"factor": float(_require(rope, "factor")),
                   "low_freq_factor": float(_require(rope, "low_freq_factor")),
                   "high_freq_factor": float(_require(rope, "high_freq_factor")),
                   "original_max_position": int(_require(rope, "original_max_position_embeddings"))}
    return {
        "vocab_size": _require(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim") or d_model // n_heads,
        "d_ff": _require(hf, "intermediate_size_mlp"),
        "d_ff_expert": _require(hf, "intermediate_size"),
        "n_experts": hf.get("num_local_experts", 16),
        "top_k": hf.get("num_experts_per_tok", 1),
        "shared_expert": True,
        "moe_every": moe_every,
        "nope_every": nope_every,
        "attn_chunk": hf.get("attention_chunk_size"),
        "qk_norm": bool(hf.get("use_qk_norm", True)),
        "attn_temperature_tuning": bool(hf.get("attn_temperature_tuning", True)),
        "attn_scale": float(hf.get("attn_scale", 0.1)),
        "floor_scale": float(hf.get("floor_scale", 8192)),
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
    }


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
    """config.json of `transformers.Llama4ForCausalLM` for this model section."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling is not None:
        r = m.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": r.factor,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position}
    if not m.shared_expert and m.moe_every:
        raise InteropError("model.shared_expert=false: Hugging Face Llama 4 always has a shared expert")
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.resolved_head_dim,
        "intermediate_size": m.d_ff_expert,
        "intermediate_size_mlp": m.d_ff,
        "num_local_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "interleave_moe_layer_step": max(m.moe_every, 1),
        "moe_layers": [i for i in range(m.n_layers) if m.is_moe(i)],
        "no_rope_layers": [int(not m.is_nope(i)) for i in range(m.n_layers)],
        "no_rope_layer_interval": m.nope_every if m.nope_every else m.n_layers + 1,
        "attention_chunk_size": m.attn_chunk,
        "use_qk_norm": m.qk_norm,
        "attn_temperature_tuning": m.attn_temperature_tuning,
        "attn_scale": m.attn_scale,
        "floor_scale": int(m.floor_scale) if float(m.floor_scale).is_integer() else m.floor_scale,
        "rope_parameters": rope,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "dtype": m.param_dtype,
    }
