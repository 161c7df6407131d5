"""`maxllama convert hf-import` / `hf-export`: Hugging Face Llama 4 checkpoints <-> maxllama model directories.

Both stream tensor by tensor (import fills the model's one host copy from memory-mapped safetensors; export
writes shards as they fill) and both write into a hidden sibling folder that is renamed into place only
when complete: a failed conversion leaves nothing at OUT_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from maxllama.checkpoint.manager import Checkpointer
from maxllama.checkpoint.model_dir import load_model_dir
from maxllama.config import ConfigError, dump_config
from maxllama.config.loader import apply_overrides, build_config
from maxllama.config.schema import Config
from maxllama.data.tokenizer import make_tokenizer
from maxllama.interop import InteropError
from maxllama.interop.hf_config import (MULTIMODAL_TEXT_PREFIX, hf_config_from_model, hf_multimodal_config_from_model,
                                        image_token_mismatches, model_config_from_hf, text_config,
                                        vision_config_from_hf)
from maxllama.interop.hf_weights import TOP_LEVEL, export_tensors, get_path, hf_names_consumed, layer_rules, layer_slot, read_hf_tensor
from maxllama.interop.hf_vision import vision_from_hf, vision_to_hf
from maxllama.interop.safetensors_io import SafetensorsReader, write_sharded
from maxllama.metap.rules import Parametrization, parametrization_for
from maxllama.model.build import define_model
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding

DEFAULT_SEQ_LEN = 256


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling of `out_dir` to write into; renamed to `out_dir` on success, removed on failure."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InteropError(f"{out_dir}: already exists and is not empty; choose a new output directory")
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.exists():
        raise InteropError(f"{path}: not found; an HF checkpoint directory has config.json and safetensors")
    try:
        hf = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8; nested too deep
        raise InteropError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{path}: must be a JSON object of fields, got {type(hf).__name__}")
    return hf


def imported_config(hf: dict, out_dir: Path, overrides: Sequence[str] = ()):
    model, vision = model_config_from_hf(hf), vision_config_from_hf(hf)
    chunk = model["attn_chunk"]
    seq_len = DEFAULT_SEQ_LEN if not chunk or chunk >= DEFAULT_SEQ_LEN else chunk * math.ceil(DEFAULT_SEQ_LEN / chunk)
    data = {"model": model, "train": {"seq_len": seq_len},
            "run": {"name": out_dir.name, "dir": str(out_dir)}, **({"vision": vision} if vision else {})}
    try:
        return build_config(apply_overrides(data, {}, overrides))
    except ConfigError as e:
        raise InteropError(f"config.json maps to an invalid maxllama config: {e}") from None


def import_config(hf_dir: Path, out_dir: Path, overrides: Sequence[str] = ()):
    """(the maxllama config of HF_DIR/config.json, the weight-name prefix of its text model, config.json)."""
    hf = _read_hf_config(hf_dir)
    try:
        _, prefix = text_config(hf)
        return imported_config(hf, out_dir, overrides), prefix, hf
    except InteropError as e:  # the mapping's messages start with 'config.json': name its folder too
        raise InteropError(f"{hf_dir}/{e}") from None


def _assign(target: np.ndarray, index: int | None, value: np.ndarray, name: str) -> None:
    expected = target.shape[1:] if index is not None else target.shape
    if value.shape != expected:
        raise InteropError(f"tensor '{name}': shape {value.shape} after conversion, the model expects {expected}")
    if index is None:
        target[...] = value
    else:
        target[index] = value


def _convert(rule, array: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    try:
        return rule.to_maxllama(array)
    except ValueError:
        raise InteropError(f"tensor '{name}': shape {array.shape} does not fit the model config") from None


def hf_import(hf_dir: str | Path, out_dir: str | Path, overrides: Sequence[str] = (), log=print) -> Path:
    """Convert an HF Llama 4 checkpoint (text-only or multimodal) into a maxllama model directory; returns it."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg, prefix, hf = import_config(hf_dir, out_dir, overrides)
    if cfg.vision.enabled:  # config.json's ids cannot become config.yaml's: the tokenizer decides them
        for mismatch in image_token_mismatches(hf, make_tokenizer(cfg.data.tokenizer).special):
            log(f"note: config.json's {mismatch} in data.tokenizer={cfg.data.tokenizer}; import with the "
                f"checkpoint's tokenizer (data.tokenizer=PATH) to keep its ids")
    reader = SafetensorsReader(hf_dir)
    sharding = LogicalSharding(build_mesh(cfg.mesh, jax.devices()[:1]))
    model = define_model(cfg, sharding)
    m = cfg.model
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), model.abstract_params)  # the one host copy
    consumed: set[str] = set()
    for rule in TOP_LEVEL(m):
        name = prefix + rule.hf_name
        for path, value in zip(rule.params, _convert(rule, reader.read(name), name)):
            _assign(get_path(params, path), None, value, name)
        consumed.add(name)
    for layer in range(m.n_layers):
        slot = layer_slot(m, layer)
        block = get_path(params, slot.block)
        for rule in layer_rules(m, layer):
            name = f"{prefix}model.layers.{layer}.{rule.hf_name}"
            array = read_hf_tensor(reader, name, m.n_experts)
            for path, value in zip(rule.params, _convert(rule, array, name)):
                _assign(get_path(block, path), slot.index, value, name)
            consumed.update(hf_names_consumed(name, m))
    if cfg.vision.enabled:
        def read(name: str) -> np.ndarray:
            consumed.add(name)
            return reader.read(name)

        vision = vision_from_hf(read, cfg.vision)
        for (path, target), value in zip(jax.tree_util.tree_leaves_with_path(params["vision"]), jax.tree.leaves(vision)):
            _assign(target, None, value, f"vision{jax.tree_util.keystr(path)}")
    unused = sorted(n for n in reader.names() - consumed if n.startswith(prefix) or cfg.vision.enabled)
    if unused:
        raise InteropError(f"tensor '{unused[0]}' has no place in the model ({len(unused)} unmapped tensors)")
    skipped = len(reader.names() - consumed)
    if skipped:
        log(f"skipped {skipped} tensors outside the text model (vision encoder, projector)")
    with staged_directory(out_dir) as staging:
        (staging / "config.yaml").write_text(dump_config(cfg))
        checkpointer = Checkpointer(staging / "checkpoints")
        checkpointer.save_params(0, params)  # straight from host memory: no device copy
        checkpointer.close()
    log(f"imported {len(consumed)} tensors into {out_dir} (config.yaml, checkpoints/0)")
    return out_dir


def _refuse_forward_multipliers(cfg: Config) -> None:
    """transformers' Llama 4 has no place for MetaP's forward multipliers (embedding, output, router, residual
    branch, attention scale): a model trained with ones other than its own would load and compute other logits."""
    p = parametrization_for(cfg)
    standard = Parametrization("metap", attention_scale=cfg.model.resolved_head_dim ** -0.5)
    differ = [f.name for f in dataclasses.fields(p) if f.name != "name"
              and not math.isclose(getattr(p, f.name), getattr(standard, f.name), rel_tol=1e-6)]
    if differ:
        raise InteropError(f"metap.parametrization: this model's forward multipliers ({', '.join(differ)}) are not "
                           f"those of transformers' Llama 4, so the export would compute other logits; export "
                           f"models trained with metap.parametrization=standard, or at the proxy's own shape")


def hf_checkpoint(cfg: Config, params: dict) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """(config.json, the named tensors) of the `transformers` model of a maxllama model: Llama4ForCausalLM, or
    Llama4ForConditionalGeneration with its vision encoder and projector."""
    _refuse_forward_multipliers(cfg)
    if not cfg.vision.enabled:
        return hf_config_from_model(cfg.model), export_tensors(cfg.model, params)
    hf_cfg = hf_multimodal_config_from_model(cfg.model, cfg.vision, make_tokenizer(cfg.data.tokenizer).special)
    tensors = itertools.chain(export_tensors(cfg.model, params, prefix=MULTIMODAL_TEXT_PREFIX),
                              vision_to_hf(params["vision"], cfg.vision).items())
    return hf_cfg, tensors


def hf_export(model_dir: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30, log=print) -> Path:
    """Write a maxllama model directory as config.json + safetensors for `transformers`."""
    loaded = load_model_dir(model_dir, devices=jax.devices()[:1])
    hf_cfg, tensors = hf_checkpoint(loaded.cfg, loaded.params)  # refusals come before anything is written
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        write_sharded(staging, tensors, max_shard_bytes)
    log(f"exported step {loaded.step} of {model_dir} to {out_dir}")
    return out_dir
