"""The proof that early fusion sees, at test size: scikit-learn's 8 x 8 digits, trained from scratch.

`make multimodal` runs the same study on 28 x 28 MNIST digits (experiments/multimodal/README.md)."""

import importlib.util
import json

import numpy as np
import pytest

from maxllama.studies import digits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="the 8 x 8 digits ship in scikit-learn: pip install --no-deps scikit-learn")


def test_held_out_digits_are_read_from_the_pixels(tmp_path):
    accuracy = digits.run(tmp_path, "small", None, ["train.steps=300", "logging.progress=false"], copies=0,
                          max_shift=0, log=lambda *_: None)
    assert accuracy.held_out == 200
    assert accuracy.with_images >= 0.6  # chance is 0.1
    assert accuracy.blanked_images <= 0.15  # the same model without the pixels: back to chance
    assert accuracy.text_only <= 0.15  # captions alone teach the label frequencies, nothing more
    assert json.loads((tmp_path / "accuracy.json").read_text())["with_images"] == accuracy.with_images
    assert (tmp_path / "held_out.png").stat().st_size > 0


def test_held_out_digits_are_never_trained_on():
    labels = np.repeat(np.arange(10), 30)
    train, held = digits.split(labels, 5)
    assert len(held) == 50 and not set(train) & set(held) and len(train) + len(held) == len(labels)
    assert np.all(np.bincount(labels[held]) == 5)


def test_a_shifted_digit_moves_and_keeps_its_pixels():
    image = np.zeros((8, 8), np.uint8)
    image[2:5, 3:6] = np.arange(1, 10).reshape(3, 3)
    moved = digits.shifted(image, 1, -2)
    np.testing.assert_array_equal(moved[3:6, 1:4], image[2:5, 3:6])
    assert moved.sum() == image.sum()
