"""Request files: JSONL lines `{"<text field>": TEXT, "image": optional PATH}` read into prompts, and results
written back as the request's fields plus the answer's.

Every line is read and its image decoded before any compute, and a bad line (not a JSON object, no text, an
unusable image) is a UserError naming `file:line`: a request file is the user's own list, so one that cannot
be answered whole is refused rather than answered in part. Image paths are relative to the file's folder
(absolute paths and URLs as they are). Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from maxllama.base.errors import UserError
from maxllama.config.schema import Config
from maxllama.inference.prompts import Prompt, encode_prompt


class Request(NamedTuple):
    record: dict  # the line's fields, written back with its result
    where: str  # "file:line"
    prompt: Prompt


def read_requests(path: str | Path, text_field: str, tokenizer, cfg: Config, *,
                  allow_empty_text: bool = True) -> list[Request]:
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read requests {path}: {e.strerror or e}") from None
    folder = os.path.dirname(str(path))
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{where}: not a JSON line") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get(text_field)
        if not isinstance(text, str) or not (allow_empty_text or text):
            raise UserError(f"{where}: needs a{'' if allow_empty_text else ' non-empty'} \"{text_field}\" string")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise UserError(f"{where}: \"image\" must be a path string")
        if image is not None and "://" not in image and not os.path.isabs(image):
            image = os.path.join(folder, image)
        try:
            prompt = encode_prompt(tokenizer, text, cfg.model.vocab_size, image=image, vision=cfg.vision)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        requests.append(Request(record, where, prompt))
    if not requests:
        raise UserError(f"{path}: no requests in the file")
    return requests


def write_results(path: str | Path, requests: Sequence[Request], answers: Sequence[dict]) -> None:
    """One line per request, in the file's order: its fields, then the answer's (which win on a clash)."""
    with open(path, "w") as out:
        for request, answer in zip(requests, answers, strict=True):
            out.write(json.dumps({**request.record, **answer}, ensure_ascii=False) + "\n")
