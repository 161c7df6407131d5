"""Hugging Face Llama 4 `config.json` <-> maxllama `model:` and `vision:` sections.

maxllama describes the layer pattern by two periods (`nope_every`, `moe_every`); a checkpoint whose explicit
`no_rope_layers` / `moe_layers` lists follow no such period cannot be represented and is refused, naming
the field, rather than imported wrongly. The same holds both ways for every field one side has and the other
cannot express.
"""

from __future__ import annotations

from typing import Any, Mapping

from maxllama.config.schema import ModelConfig, VisionConfig
from maxllama.interop import InteropError

TEXT_MODEL_TYPES = ("llama4_text",)
MULTIMODAL_MODEL_TYPES = ("llama4",)
MULTIMODAL_TEXT_PREFIX = "language_model."  # where Llama4ForConditionalGeneration keeps its Llama4ForCausalLM
# maxllama's adapter and projector have one width; HF names it three times and they must agree.
PROJECTOR_WIDTHS = ("projector_input_dim", "projector_output_dim", "vision_output_dim")
# transformers' Llama4VisionModel builds its LayerNorms with torch's default eps and never reads norm_eps: a
# checkpoint with another value would not compute in transformers what its config.json says.
HF_VISION_LAYERNORM_EPS = 1e-5
# Llama4Config's token-id fields, and the special token of maxllama's tokenizers each one names.
IMAGE_TOKEN_FIELDS = {"image_token_index": "<|patch|>", "boi_token_index": "<|image_start|>",
                      "eoi_token_index": "<|image_end|>"}


def text_config(hf: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """(the text model's config, the weight-name prefix of the text model)."""
    if not isinstance(hf, Mapping):
        raise InteropError(f"config.json: must be a JSON object of fields, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        return hf, ""
    if model_type in MULTIMODAL_MODEL_TYPES:
        return _get(hf, "text_config", dict), MULTIMODAL_TEXT_PREFIX
    raise InteropError(f"config.json: model_type {model_type!r:.40} is not a Llama 4 model "
                       f"(expected one of {', '.join(TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES)})")


_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object"}


MAX_LAYERS = 4096  # far beyond any Llama 4 (48): a larger count is a corrupt file, and layer lists are built per layer


def _get(hf: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED, minimum: int | None = None,
         maximum: int | None = None) -> Any:
    """hf[key], checked to be of `kind` (and within [minimum, maximum]); `default` when absent or null. Checked
    here, before any arithmetic on it, so a wrong type is reported by name rather than as a crash."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InteropError(f"config.json: required field '{key}' is missing")
        return default
    if kind in (float, bool):  # flags may be written as 0/1 (early Llama 4 configs have attn_temperature_tuning: 4)
        ok = isinstance(value, (int, float) if kind is float else int)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise InteropError(f"config.json: '{key}' must be {_KINDS[kind]}, got {value!r:.40}")
    if kind is float and maximum is None:
        maximum = 1e308  # float() of a larger integer overflows
    if minimum is not None and value < minimum:
        raise InteropError(f"config.json: '{key}' must be >= {minimum}, got {value!r:.40}")
    if maximum is not None and abs(value) > maximum:
        raise InteropError(f"config.json: '{key}' must be at most {maximum}, got {value!r:.40}")
    return kind(value) if kind in (float, bool) else value


def _layer_list(hf: Mapping[str, Any], key: str) -> list[int] | None:
    layers = _get(hf, key, list, None)
    if layers is not None and not all(isinstance(i, int) for i in layers):
        raise InteropError(f"config.json: '{key}' must be a list of integers, got {layers!r:.40}")
    return layers


def _period(layers: list[int], n_layers: int, field: str, default_period: int) -> int:
    """The period p with layers == [p-1, 2p-1, ...]; 0 for none."""
    if not layers:
        return 0
    candidates = [default_period] + list(range(1, n_layers + 1))
    for p in candidates:
        if p > 0 and layers == list(range(p - 1, n_layers, p)):
            return p
    raise InteropError(f"config.json: '{field}' = {layers!r:.60} is not a regular interleave pattern "
                       f"(layers p-1, 2p-1, ...), which maxllama cannot represent")


def model_config_from_hf(hf_root: Mapping[str, Any]) -> dict[str, Any]:
    """The `model:` section (as a dict for the config loader) of an HF Llama 4 config."""
    hf, _ = text_config(hf_root)
    if _get(hf, "tie_word_embeddings", bool, False):
        raise InteropError("config.json: tie_word_embeddings=true; Llama 4 and maxllama use untied embeddings")
    if _get(hf, "attention_bias", bool, False):
        raise InteropError("config.json: attention_bias=true; the Llama 4 text model has no biases")
    if _get(hf, "hidden_act", str, "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r:.40} (only 'silu' SwiGLU is supported)")
    n_layers = _get(hf, "num_hidden_layers", int, minimum=1, maximum=MAX_LAYERS)
    d_model = _get(hf, "hidden_size", int, minimum=1)
    n_heads = _get(hf, "num_attention_heads", int, minimum=1)
    interval = _get(hf, "no_rope_layer_interval", int, 4, minimum=1)
    no_rope = _layer_list(hf, "no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(no_rope) != n_layers:
        raise InteropError(f"config.json: 'no_rope_layers' has {len(no_rope)} entries for {n_layers} layers")
    nope_every = _period([i for i, uses_rope in enumerate(no_rope) if not uses_rope], n_layers,
                         "no_rope_layers", interval)
    step = _get(hf, "interleave_moe_layer_step", int, 1, minimum=1)
    moe_layers = _layer_list(hf, "moe_layers")
    moe_layers = list(range(step - 1, n_layers, step)) if moe_layers is None else moe_layers
    moe_every = _period(moe_layers, n_layers, "moe_layers", step)

    rope = _get(hf, "rope_parameters", dict, None) or _get(hf, "rope_scaling", dict, None) or {}
    theta = _get(rope, "rope_theta", float, _get(hf, "rope_theta", float, 500000.0))
    rope_type = _get(rope, "rope_type", str, _get(rope, "type", str, "default"))
    if rope_type not in ("default", "llama3"):
        raise InteropError(f"config.json: rope type {rope_type!r:.40} (supported: 'default', 'llama3')")
    scaling = None
    if rope_type == "llama3":
        scaling = {"factor": _get(rope, "factor", float),
                   "low_freq_factor": _get(rope, "low_freq_factor", float),
                   "high_freq_factor": _get(rope, "high_freq_factor", float),
                   "original_max_position": _get(rope, "original_max_position_embeddings", int, minimum=1)}
    return {
        "vocab_size": _get(hf, "vocab_size", int, minimum=1),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": _get(hf, "num_key_value_heads", int, None, minimum=1) or n_heads,
        "head_dim": _get(hf, "head_dim", int, None, minimum=1),  # unset: the model's d_model // n_heads
        "d_ff": _get(hf, "intermediate_size_mlp", int, minimum=1),
        "d_ff_expert": _get(hf, "intermediate_size", int, minimum=1),
        "n_experts": _get(hf, "num_local_experts", int, 16, minimum=1),
        "top_k": _get(hf, "num_experts_per_tok", int, 1, minimum=1),
        "shared_expert": True,
        "moe_every": moe_every,
        "nope_every": nope_every,
        "attn_chunk": _get(hf, "attention_chunk_size", int, None),
        "qk_norm": _get(hf, "use_qk_norm", bool, True),
        "attn_temperature_tuning": _get(hf, "attn_temperature_tuning", bool, True),
        "attn_scale": _get(hf, "attn_scale", float, 0.1),
        "floor_scale": _get(hf, "floor_scale", float, 8192.0),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": _get(hf, "rms_norm_eps", float, 1e-5),
    }


def vision_config_from_hf(hf_root: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `vision:` section of a multimodal checkpoint's `vision_config` (None for a text-only one)."""
    if hf_root.get("model_type") not in MULTIMODAL_MODEL_TYPES or hf_root.get("vision_config") is None:
        return None
    hf = _get(hf_root, "vision_config", dict)
    widths = {key: _get(hf, key, int, minimum=1) for key in PROJECTOR_WIDTHS}
    if len(set(widths.values())) != 1:
        raise InteropError(f"config.json: vision_config has projector_input_dim, projector_output_dim and "
                           f"vision_output_dim {tuple(widths.values())}; maxllama's adapter needs them equal")
    if _get(hf, "hidden_act", str, "gelu") != "gelu":
        raise InteropError(f"config.json: vision_config.hidden_act {hf['hidden_act']!r:.40} (only 'gelu' is supported)")
    norm_eps = float(_get(hf, "norm_eps", float, HF_VISION_LAYERNORM_EPS))
    if norm_eps != HF_VISION_LAYERNORM_EPS:
        raise InteropError(f"config.json: vision_config.norm_eps is {norm_eps:g}, but transformers' "
                           f"Llama4VisionModel ignores it (its LayerNorms use {HF_VISION_LAYERNORM_EPS:g}), so "
                           f"which one the weights were trained with is unknown; set it to "
                           f"{HF_VISION_LAYERNORM_EPS:g} to import what transformers computes")
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    return {
        "enabled": True,
        "d_model": _get(hf, "hidden_size", int, minimum=1),
        "n_layers": _get(hf, "num_hidden_layers", int, minimum=1, maximum=MAX_LAYERS),
        "n_heads": _get(hf, "num_attention_heads", int, minimum=1),
        "d_ff": _get(hf, "intermediate_size", int, minimum=1),
        "image_size": _get(hf, "image_size", int, minimum=1),
        "patch_size": _get(hf, "patch_size", int, minimum=1),
        "pixel_shuffle_ratio": float(_get(hf, "pixel_shuffle_ratio", float, 0.5)),
        "projector_dim": widths["projector_output_dim"],
        "norm_eps": norm_eps,
        "rope_theta": float(_get(rope, "rope_theta", float, _get(hf, "rope_theta", float, 10000.0))),
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


def hf_vision_config_from_model(v: VisionConfig) -> dict[str, Any]:
    """The `vision_config` of `transformers.Llama4ForConditionalGeneration` for this vision section (the inverse
    of `vision_config_from_hf`; `max_tiles` and `tiles_per_row` shape the data, not the model, and stay out)."""
    if v.norm_eps != HF_VISION_LAYERNORM_EPS:
        raise InteropError(f"vision.norm_eps={v.norm_eps:g}: transformers' Llama4VisionModel always uses LayerNorm "
                           f"eps {HF_VISION_LAYERNORM_EPS:g}, so it would not compute this model")
    return {
        "model_type": "llama4_vision_model",
        "hidden_size": v.d_model,
        "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads,
        "intermediate_size": v.d_ff,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        **dict.fromkeys(PROJECTOR_WIDTHS, v.projector_dim),
        "multi_modal_projector_bias": False,
        "norm_eps": v.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
        "hidden_act": "gelu",
    }


def image_token_ids(special: Mapping[str, int], vocab_size: int) -> dict[str, int]:
    """Llama4Config's image token fields from a tokenizer's special-token ids; each must have an embedding."""
    ids = {field: special[token] for field, token in IMAGE_TOKEN_FIELDS.items()}
    for field, token in IMAGE_TOKEN_FIELDS.items():
        if ids[field] >= vocab_size:
            raise InteropError(f"data.tokenizer: its {token} id {ids[field]} ({field} in config.json) is outside "
                               f"model.vocab_size {vocab_size}: the model has no embedding for it")
    return ids


def image_token_mismatches(hf_root: Mapping[str, Any], special: Mapping[str, int]) -> list[str]:
    """The image token fields of a multimodal config.json whose ids the tokenizer gives other tokens."""
    return [f"{field} {hf_root[field]!r:.40} is not {token} ({special[token]})"
            for field, token in IMAGE_TOKEN_FIELDS.items() if field in hf_root and hf_root[field] != special[token]]


def hf_multimodal_config_from_model(m: ModelConfig, v: VisionConfig, special: Mapping[str, int]) -> dict[str, Any]:
    """config.json of `transformers.Llama4ForConditionalGeneration`: the text model's config nested as
    `text_config`, the vision tower's as `vision_config`, and the ids the tokenizer gives the image tokens."""
    text = {key: value for key, value in hf_config_from_model(m).items() if key != "architectures"}
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": MULTIMODAL_MODEL_TYPES[0],
        "text_config": text,
        "vision_config": hf_vision_config_from_model(v),
        **image_token_ids(special, m.vocab_size),
        "tie_word_embeddings": False,
        "dtype": m.param_dtype,
    }
