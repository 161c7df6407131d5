"""Hugging Face names of the vision encoder, adapter and projector (`Llama4VisionModel` under `vision_model.`,
`Llama4MultiModalProjector` as `multi_modal_projector.`), both ways. HF linear weights are [out, in]; maxllama
stores `x @ W` with heads split out, and the encoder's layers stacked on a leading axis."""

from __future__ import annotations

from typing import Callable

import numpy as np

from maxllama.config.schema import VisionConfig

LAYER = "vision_model.model.layers.{i}."
NORMS = {"layernorm_pre": "vision_model.layernorm_pre", "layernorm_post": "vision_model.layernorm_post"}
LAYER_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}


def vision_from_hf(get: Callable[[str], np.ndarray], v: VisionConfig) -> dict:
    """The vision parameters (a pure dict) from a reader of HF tensors by name."""
    d, h = v.d_model, v.n_heads
    hd = d // h
    stack = lambda name: np.stack([np.asarray(get(LAYER.format(i=i) + name)) for i in range(v.n_layers)])  # noqa: E731
    layers = {}
    for ours, theirs in PROJECTIONS.items():
        layers[ours] = stack(f"{theirs}.weight").transpose(0, 2, 1).reshape(v.n_layers, d, h, hd)
        layers[f"{ours}_bias"] = stack(f"{theirs}.bias").reshape(v.n_layers, h, hd)
    layers["o"] = stack("self_attn.o_proj.weight").transpose(0, 2, 1).reshape(v.n_layers, h, hd, d)
    layers["o_bias"] = stack("self_attn.o_proj.bias")
    for name in ("fc1", "fc2"):
        layers[name] = stack(f"mlp.{name}.weight").transpose(0, 2, 1)
        layers[f"{name}_bias"] = stack(f"mlp.{name}.bias")
    for ours, theirs in LAYER_NORMS.items():
        layers[ours] = {"weight": stack(f"{theirs}.weight"), "bias": stack(f"{theirs}.bias")}
    out = {
        "patch_embedding": np.asarray(get("vision_model.patch_embedding.linear.weight")).T,
        "class_embedding": np.asarray(get("vision_model.class_embedding")).reshape(1, d),
        "positional_embedding": np.asarray(get("vision_model.positional_embedding_vlm")),
        "layers": layers,
        "adapter_fc1": np.asarray(get("vision_model.vision_adapter.mlp.fc1.weight")).T,
        "adapter_fc2": np.asarray(get("vision_model.vision_adapter.mlp.fc2.weight")).T,
        "projector": np.asarray(get("multi_modal_projector.linear_1.weight")).T,
    }
    for ours, theirs in NORMS.items():
        out[ours] = {"weight": np.asarray(get(f"{theirs}.weight")), "bias": np.asarray(get(f"{theirs}.bias"))}
    return out


def vision_to_hf(params: dict, v: VisionConfig) -> dict[str, np.ndarray]:
    """HF tensors by name from the vision parameters (the inverse of `vision_from_hf`)."""
    d = v.d_model
    layers = {k: (np.asarray(x) if not isinstance(x, dict) else {n: np.asarray(y) for n, y in x.items()})
              for k, x in params["layers"].items()}
    out = {
        "vision_model.patch_embedding.linear.weight": np.asarray(params["patch_embedding"]).T,
        "vision_model.class_embedding": np.asarray(params["class_embedding"]).reshape(d),
        "vision_model.positional_embedding_vlm": np.asarray(params["positional_embedding"]),
        "vision_model.vision_adapter.mlp.fc1.weight": np.asarray(params["adapter_fc1"]).T,
        "vision_model.vision_adapter.mlp.fc2.weight": np.asarray(params["adapter_fc2"]).T,
        "multi_modal_projector.linear_1.weight": np.asarray(params["projector"]).T,
    }
    for ours, theirs in NORMS.items():
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = (np.asarray(params[ours][k]) for k in ("weight", "bias"))
    for i in range(v.n_layers):
        prefix = LAYER.format(i=i)
        for ours, theirs in PROJECTIONS.items():
            out[f"{prefix}{theirs}.weight"] = layers[ours][i].reshape(d, -1).T
            out[f"{prefix}{theirs}.bias"] = layers[f"{ours}_bias"][i].reshape(-1)
        out[f"{prefix}self_attn.o_proj.weight"] = layers["o"][i].reshape(-1, d).T
        out[f"{prefix}self_attn.o_proj.bias"] = layers["o_bias"][i]
        for name in ("fc1", "fc2"):
            out[f"{prefix}mlp.{name}.weight"] = layers[name][i].T
            out[f"{prefix}mlp.{name}.bias"] = layers[f"{name}_bias"][i]
        for ours, theirs in LAYER_NORMS.items():
            out[f"{prefix}{theirs}.weight"] = layers[ours]["weight"][i]
            out[f"{prefix}{theirs}.bias"] = layers[ours]["bias"][i]
    return out
