"""One table maps Hugging Face Llama 4 tensor names to maxllama parameters, both ways.

HF stores `torch.nn.Linear` weights as [out, in]; maxllama stores every matrix in `x @ W` orientation with
heads split out ([d_model, heads, head_dim]). Experts are fused in HF ([E, D, 2I] gate|up, [E, I, D] down)
and sliced apart here; older checkpoints with one tensor per expert are fused on reading.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from maxllama.config.schema import ModelConfig
from maxllama.interop import InteropError
from maxllama.interop.safetensors_io import SafetensorsReader

KeyPath = tuple  # a path of keys into the params pure dict


class TensorRule(NamedTuple):
    hf_name: str  # relative to the layer prefix ("model.layers.{i}.") or to the model prefix
    params: tuple[KeyPath, ...]  # the maxllama parameters it becomes (relative to the block, or absolute)
    to_maxllama: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _q_or_kv(heads_of: Callable[[ModelConfig], int]):
    def make(m: ModelConfig):
        shape = (m.d_model, heads_of(m), m.resolved_head_dim)
        return (lambda w: (np.asarray(w).T.reshape(shape),),
                lambda p: np.asarray(p).reshape(m.d_model, -1).T)
    return make


def _out_projection(m: ModelConfig):
    shape = (m.n_heads, m.resolved_head_dim, m.d_model)
    return (lambda w: (np.asarray(w).T.reshape(shape),),
            lambda p: np.asarray(p).reshape(-1, m.d_model).T)


def _transpose(m: ModelConfig):
    del m
    return (lambda w: (np.asarray(w).T,), lambda p: np.asarray(p).T)


def _identity(m: ModelConfig):
    del m
    return (lambda w: (np.asarray(w),), lambda p: np.asarray(p))


def _gate_up(m: ModelConfig):
    f = m.d_ff_expert
    return (lambda w: (np.asarray(w)[..., :f], np.asarray(w)[..., f:]),
            lambda gate, up: np.concatenate([np.asarray(gate), np.asarray(up)], axis=-1))


def _rules(entries) -> Callable[[ModelConfig], list[TensorRule]]:
    def build(m: ModelConfig) -> list[TensorRule]:
        return [TensorRule(name, params, *make(m)) for name, params, make in entries]
    return build


ATTENTION = _rules([
    ("self_attn.q_proj.weight", (("attention", "q"),), _q_or_kv(lambda m: m.n_heads)),
    ("self_attn.k_proj.weight", (("attention", "k"),), _q_or_kv(lambda m: m.n_kv_heads)),
    ("self_attn.v_proj.weight", (("attention", "v"),), _q_or_kv(lambda m: m.n_kv_heads)),
    ("self_attn.o_proj.weight", (("attention", "o"),), _out_projection),
    ("input_layernorm.weight", (("attention_norm", "weight"),), _identity),
    ("post_attention_layernorm.weight", (("ffn_norm", "weight"),), _identity),
])
DENSE_FFN = _rules([
    ("feed_forward.gate_proj.weight", (("ffn", "gate"),), _transpose),
    ("feed_forward.up_proj.weight", (("ffn", "up"),), _transpose),
    ("feed_forward.down_proj.weight", (("ffn", "down"),), _transpose),
])
MOE_FFN = _rules([
    ("feed_forward.router.weight", (("ffn", "router"),), _transpose),
    ("feed_forward.experts.gate_up_proj", (("ffn", "gate"), ("ffn", "up")), _gate_up),
    ("feed_forward.experts.down_proj", (("ffn", "down"),), _identity),
    ("feed_forward.shared_expert.gate_proj.weight", (("ffn", "shared", "gate"),), _transpose),
    ("feed_forward.shared_expert.up_proj.weight", (("ffn", "shared", "up"),), _transpose),
    ("feed_forward.shared_expert.down_proj.weight", (("ffn", "shared", "down"),), _transpose),
])
TOP_LEVEL = _rules([
    ("model.embed_tokens.weight", (("embed",),), _identity),
    ("model.norm.weight", (("final_norm", "weight"),), _identity),
    ("lm_head.weight", (("lm_head",),), _transpose),
])


def layer_rules(m: ModelConfig, layer: int) -> list[TensorRule]:
    return ATTENTION(m) + (MOE_FFN(m) if m.is_moe(layer) else DENSE_FFN(m))


class LayerSlot(NamedTuple):
    block: KeyPath  # path of the layer's block in the params dict
    index: int | None  # position on the stacked `layers` axis, for scanned groups


def layer_slot(m: ModelConfig, layer: int) -> LayerSlot:
    if not m.scan_layers:
        return LayerSlot(("unscanned", layer, "blocks", 0), None)
    period = m.pattern_period
    n_groups = m.n_layers // period
    if layer < n_groups * period:
        group, position = divmod(layer, period)
        return LayerSlot(("groups", "blocks", position), group)
    return LayerSlot(("tail", "blocks", layer - n_groups * period), None)


def read_hf_tensor(reader: SafetensorsReader, name: str, expert_count: int) -> np.ndarray:
    """A tensor by its fused name; fused on the fly from per-expert tensors when the checkpoint has those."""
    if name in reader or not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return reader.read(name)
    base = name.rsplit(".", 1)[0]
    per_expert = f"{base}.0.gate_proj.weight"
    if per_expert not in reader:
        raise InteropError(f"tensor '{name}' is missing from the checkpoint (nor is '{per_expert}' there)")
    # Per-expert tensors are torch Linear weights: [out, in]; fused ones are x @ W: [in, out].
    try:
        if name.endswith("gate_up_proj"):
            return np.stack([np.concatenate([reader.read(f"{base}.{e}.gate_proj.weight").T,
                                             reader.read(f"{base}.{e}.up_proj.weight").T], axis=-1)
                             for e in range(expert_count)])
        return np.stack([reader.read(f"{base}.{e}.down_proj.weight").T for e in range(expert_count)])
    except InteropError:
        raise
    except ValueError as e:  # the experts' shapes differ
        raise InteropError(f"tensors '{base}.*': the per-expert tensors cannot be fused into '{name}' ({e})") from None


def hf_names_consumed(name: str, m: ModelConfig) -> list[str]:
    """Names a fused rule may read: itself, or the per-expert tensors it is built from."""
    if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return [name]
    base = name.rsplit(".", 1)[0]
    projections = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
    return [name] + [f"{base}.{e}.{p}.weight" for e in range(m.n_experts) for p in projections]


def get_path(tree: dict, path: Sequence) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def export_tensors(m: ModelConfig, params: dict, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """HF (name, array) pairs of a params dict, one tensor at a time, layer by layer."""
    for rule in TOP_LEVEL(m):
        values = [np.asarray(get_path(params, path)) for path in rule.params]
        yield prefix + rule.hf_name, np.ascontiguousarray(rule.to_hf(*values))
    for layer in range(m.n_layers):
        slot = layer_slot(m, layer)
        block = get_path(params, slot.block)
        for rule in layer_rules(m, layer):
            values = []
            for path in rule.params:
                value = get_path(block, path)
                values.append(np.asarray(value[slot.index] if slot.index is not None else value))
            yield f"{prefix}model.layers.{layer}.{rule.hf_name}", np.ascontiguousarray(rule.to_hf(*values))
