"""Image sources: JSONL records with images become documents of tokens and tiles (maxllama/data/image_store.py).

Two kinds of record, one layout, `BOS parts EOS`: each text part's tokens and each image's block
(maxllama/data/images.py), in order.

- `format: image_caption`, `{"image": PATH, "text": CAPTION}`: `BOS <image block> caption EOS`. A pair is kept
  whole: a record whose image is skipped is dropped with it, one without an image or a caption is skipped
  (`caption_without_image`, `image_without_caption`), and a row never holds a caption without its image.
- `format: interleaved`, `{"content": [{"type": "text", "text": ...}, {"type": "image", "image": PATH}, ...]}`,
  the content parts of chat datasets (the keys are the source's content_field, field and image_field). A
  skipped image is dropped from its document and the rest kept; a part of another type (`unknown_part_type`)
  or without its string (`malformed_part`) is skipped, a record without a list of parts (`missing_content`)
  too, and a document left with no text and no image (`empty_document`).

An image path is relative to the JSONL file's folder (or any fsspec URL). An image that is missing, unreadable
or refused by the decoder is skipped and counted by reason (images.IMAGE_SKIP_REASONS); a local image folder
that does not exist is a config error. Special tokens are inserted as ids, so text that spells `<|patch|>` stays
text; the image-structure tokens are inputs, never targets.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterator, NamedTuple

import numpy as np

from maxllama.config import ConfigError
from maxllama.config.schema import SourceConfig, VisionConfig
from maxllama.data.image_store import ImageDocument, ImageDocuments
from maxllama.data.images import IMAGE_TOKENS, BadImage, decode_image, image_tokens, tile_image
from maxllama.data.sources import (WorkUnit, encodable, file_id, held_out, is_remote, json_records, plan_units,
                                   read_bytes, read_counted, read_files)
from maxllama.data.store import SPLITS
from maxllama.data.tokenizer import Tokenizer


class Part(NamedTuple):
    kind: str  # "text" or "image"
    value: str  # the text, or the image's path or URL


class ImageRecord(NamedTuple):
    line_number: int
    parts: list[Part]
    whole: bool  # an image-caption pair: dropped with a skipped image, one span that rows never cut


def image_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.special[f"<|{name}|>"] for name in IMAGE_TOKENS}


def require_vision(key: str, what: str, vision: VisionConfig) -> None:
    if not vision.enabled:
        raise ConfigError(f"{key}: {what} needs a vision encoder (vision.enabled: true)")


def _caption_parts(record, unit: WorkUnit, skipped: Counter) -> list[Part] | None:
    if not isinstance(record, dict) or not record.get(unit.image_field):
        skipped["caption_without_image"] += 1
        return None
    caption = record.get(unit.field)
    if not isinstance(caption, str) or not caption.strip():
        skipped["image_without_caption"] += 1
        return None
    return [Part("image", str(record[unit.image_field])), Part("text", caption)]


def _interleaved_parts(record, unit: WorkUnit, skipped: Counter) -> list[Part] | None:
    content = record.get(unit.content_field) if isinstance(record, dict) else None
    if not isinstance(content, list):
        skipped["missing_content"] += 1
        return None
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image"):
            skipped["unknown_part_type" if isinstance(kind, str) else "malformed_part"] += 1
            continue
        value = part.get(unit.field if kind == "text" else unit.image_field)
        if not isinstance(value, str) or (kind == "image" and not value):
            skipped["malformed_part"] += 1
            continue
        parts.append(Part(kind, value))
    return parts


def image_records(unit: WorkUnit, skipped: Counter) -> Iterator[ImageRecord]:
    """The records of one JSONL file of an image source, as parts; bad records and parts are counted."""
    data = read_counted(unit.path, skipped)
    if data is None:
        return
    parts_of = _caption_parts if unit.format == "image_caption" else _interleaved_parts
    for line_number, line, record in json_records(data, skipped):
        parts = parts_of(record, unit, skipped)
        if parts is None:
            continue
        if b"\\u" in line:  # only escapes make lone surrogates (see sources.encodable)
            parts = [Part(p.kind, encodable(p.value, skipped)) if p.kind == "text" else p for p in parts]
        yield ImageRecord(line_number, parts, unit.format == "image_caption")


def _image_bytes(location: str, where: str) -> bytes:
    try:
        return read_bytes(location)
    except FileNotFoundError:
        folder = os.path.dirname(location)
        if not is_remote(location) and not os.path.isdir(folder):
            raise ConfigError(f"{where}: the image folder {folder} does not exist") from None
        raise BadImage("missing_image") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise BadImage("unreadable_image", str(e)[:100]) from None


class DocumentLayout:
    """Lays records out as documents: their text tokenized, their images read, decoded, tiled and laid out."""

    def __init__(self, tokenizer: Tokenizer, vision: VisionConfig):
        self.tokenizer, self.vision = tokenizer, vision
        self.ids = image_token_ids(tokenizer)

    def document(self, record: ImageRecord, unit: WorkUnit, skipped: Counter) -> ImageDocument | None:
        v = self.vision
        tokens, tiles, spans, has_text = [self.tokenizer.bos_id], [], [], False
        for part in record.parts:
            if part.kind == "text":
                tokens.extend(self.tokenizer.encode(part.value))
                has_text = has_text or bool(part.value.strip())
                continue
            location = part.value if is_remote(part.value) or os.path.isabs(part.value) else os.path.join(
                os.path.dirname(unit.path), part.value)
            try:
                image = tile_image(decode_image(_image_bytes(location, f"{unit.key}.path: {unit.path}:"
                                                                       f"{record.line_number}")),
                                   v.image_size, v.max_tiles)
            except BadImage as e:
                skipped[e.reason] += 1
                if record.whole:
                    return None
                continue
            block = image_tokens(image.canvas, v.tokens_per_tile, self.ids)
            spans.append((len(tokens), len(tokens) + len(block), len(image.pixels)))
            tokens.extend(block)
            tiles.append(image.pixels)
        if not has_text and not tiles:
            skipped["empty_document"] += 1
            return None
        tokens.append(self.tokenizer.eos_id)
        pixels = np.concatenate([np.zeros((0, 3, v.image_size, v.image_size), np.uint8), *tiles])
        if record.whole:
            spans = [(0, len(tokens), len(pixels))]
        return ImageDocument(np.asarray(tokens, np.int32), pixels, spans)


def read_image_file(unit: WorkUnit, tokenizer: Tokenizer, vision: VisionConfig,
                    val_fraction: float) -> tuple[dict[str, list[ImageDocument]], Counter]:
    """Documents of one JSONL file of an image source, split by record id; returns (docs, skipped counts)."""
    skipped: Counter = Counter()
    docs: dict[str, list[ImageDocument]] = {split: [] for split in SPLITS}
    layout, doc_id = DocumentLayout(tokenizer, vision), file_id(unit.path, unit.id_prefix)
    for record in image_records(unit, skipped):
        doc = layout.document(record, unit, skipped)
        if doc is not None:
            docs["validation" if held_out(f"{doc_id}:{record.line_number}", val_fraction) else "train"].append(doc)
    return docs, skipped


def load_image_source(index: int, source: SourceConfig, tokenizer: Tokenizer, vision: VisionConfig,
                      val_fraction: float) -> tuple[dict[str, ImageDocuments], Counter]:
    """An image source decoded in memory, file by file in this process (`maxllama prepare` decodes in parallel,
    once): ({split: documents}, skipped counts)."""
    require_vision(f"data.sources[{index}].format", source.format, vision)
    docs, skipped = read_files(plan_units([source], first_index=index),
                               lambda unit: read_image_file(unit, tokenizer, vision, val_fraction))
    return {split: ImageDocuments.from_documents(docs[split], vision.image_size) for split in SPLITS}, skipped
