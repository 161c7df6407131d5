"""Interleaved image-text documents, and image sources prepared into stores: the layout of a document, bad images
and parts skipped by reason, long documents cut between parts, and a prepared store giving the batches of the
JSONL it was made from."""

import contextlib
import io
import json

import numpy as np
import pytest

from maxllama.config import ConfigError, dump_config, load_config
from maxllama.config.schema import SourceConfig
from maxllama.data.image_captions import load_image_source
from maxllama.data.image_rows import cut_document
from maxllama.data.images import decode_image, tile_image
from maxllama.data.pipeline import build_datasets
from maxllama.data.prepare import prepare
from maxllama.data.tokenizer import make_tokenizer, train_bpe
from tests.test_multimodal_data import SMALL, VISION, png

IMAGES = [*VISION, "vision.tiles_per_row=8"]  # 28-pixel tiles of 4 patch tokens, at most 4 tiles an image


def text(value):
    return {"type": "text", "text": value}


def image(path):
    return {"type": "image", "image": path}


LAYOUT = [text("ab <|patch|>"), image("img/small.png"), text("cd"), image("img/wide.png"), text("e")]
BAD = [
    [text("kept "), image("img/corrupt.png"), text("text"), image("img/small.png")],
    [image("img/missing.png")],
    [image("img/empty.png"), text("   ")],
    [{"type": "video", "video": "x.mp4"}, text("after a video"), {"type": "text"}, "not a part", image("")],
]


def jsonl(path, records, extra=()):
    path.write_text("\n".join([*(json.dumps(r) for r in records), *extra]) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    for folder in (root, root / "mixed"):
        (folder / "img").mkdir(parents=True)
        (folder / "img" / "small.png").write_bytes(png(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)))
        (folder / "img" / "wide.png").write_bytes(png(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)))
        (folder / "img" / "corrupt.png").write_bytes(b"\x89PNG not really")
        (folder / "img" / "empty.png").write_bytes(b"")
    jsonl(root / "layout.jsonl", [{"content": LAYOUT}] * 30)
    jsonl(root / "bad.jsonl", [{"content": parts} for parts in BAD] + [{"content": "not a list"}, {"text": "x"}],
          ["{not json"])
    # One source in two files (two workers prepare it): the layout documents, then the bad ones and more.
    jsonl(root / "mixed" / "a.jsonl", [{"content": LAYOUT}] * 20)
    jsonl(root / "mixed" / "b.jsonl", [{"content": parts} for parts in BAD]
          + [{"content": [text(f"number {i} "), image("img/wide.png" if i % 2 else "img/small.png")]} for i in range(20)])
    for i in range(30):
        (root / "img" / f"{i}.png").write_bytes(png(rng.integers(0, 256, (28, 28 + 2 * i, 3), dtype=np.uint8)))
    jsonl(root / "pairs.jsonl", [{"image": f"img/{i}.png", "text": f"picture {i}"} for i in range(30)]
          + [{"image": "img/corrupt.png", "text": "x"}, {"text": "no image"}])
    jsonl(root / "text.jsonl", [{"text": f"plain text number {i} " * 4} for i in range(40)])
    return root


def source(path, fmt, weight=1.0):
    return f"{{path: {path}, format: {fmt}, weight: {weight}}}"


def config(*sources, overrides=()):
    return load_config(None, [f"data.sources=[{', '.join(sources)}]", *IMAGES, *SMALL, *overrides])[0]


def special(name):
    return make_tokenizer("byte").special[f"<|{name}|>"]


def block(canvas):
    """An image's tokens, written out by hand for the canvases of these tests (4 patch tokens a tile)."""
    patches = [special("patch")] * 4
    if canvas == (1, 1):
        return [special("image_start"), special("image"), *patches, special("image_end")]
    assert canvas == (1, 2)
    return [special("image_start"), *patches, special("tile_x_separator"), *patches, special("tile_y_separator"),
            special("image"), *patches, special("image_end")]


def tiles_of(path):
    return tile_image(decode_image(path.read_bytes()), 28, 4)


def test_an_interleaved_document_is_its_parts_in_order(corpus):
    cfg = config(source(corpus / "layout.jsonl", "interleaved"))
    docs, skipped = load_image_source(0, cfg.data.sources[0], make_tokenizer("byte"), cfg.vision, 0.0)
    tokens, tiles = docs["train"].document(0)
    small, wide = tiles_of(corpus / "img" / "small.png"), tiles_of(corpus / "img" / "wide.png")
    assert small.canvas == (1, 1) and wide.canvas == (1, 2) and len(wide.pixels) == 3  # two tiles, a global view
    expected = [special("bos"), *b"ab <|patch|>", *block((1, 1)), *b"cd", *block((1, 2)), *b"e", special("eos")]
    assert tokens.tolist() == expected  # the text's `<|patch|>` is bytes: special tokens are only ever ids
    np.testing.assert_array_equal(tiles, np.concatenate([small.pixels, wide.pixels]))
    assert not skipped and docs["train"].n_images == 60 and docs["train"].n_tiles == 120

    batch = build_datasets(cfg).train[0]
    row = np.concatenate([batch["inputs"][0, :1], batch["targets"][0]])
    assert row[:len(expected)].tolist() == expected and batch["positions"][0, len(expected)] == 0  # then the next
    first = batch["patch_mask"][0, :len(expected)]
    np.testing.assert_array_equal(np.nonzero(first)[0], np.nonzero(np.asarray(expected) == special("patch"))[0])
    assert batch["patch_mask"][0].sum() == 2 * 16  # two documents of 4 tiles fill the 8-tile budget
    np.testing.assert_array_equal(batch["pixels"][0], np.concatenate([tiles, tiles]))  # the k-th tile, k-th patch run


def test_a_bad_image_or_part_costs_only_itself(corpus):
    cfg = config(source(corpus / "bad.jsonl", "interleaved"))
    docs, skipped = load_image_source(0, cfg.data.sources[0], make_tokenizer("byte"), cfg.vision, 0.0)
    assert dict(skipped) == {"corrupt_image": 1, "missing_image": 1, "empty_image": 1, "empty_document": 2,
                             "unknown_part_type": 1, "malformed_part": 3, "missing_content": 2, "invalid_json": 1}
    assert docs["train"].n_docs == 2
    tokens, tiles = docs["train"].document(0)  # the corrupt image dropped, the rest of its document kept
    assert tokens.tolist() == [special("bos"), *b"kept text", *block((1, 1)), special("eos")]
    np.testing.assert_array_equal(tiles, tiles_of(corpus / "img" / "small.png").pixels)
    assert docs["train"].document(1)[0].tolist() == [special("bos"), *b"after a video", special("eos")]

    data = build_datasets(config(source(corpus / "mixed" / "*.jsonl", "interleaved")))  # the bad ones among others
    assert ("skipped records: empty_document 2, malformed_part 3, unknown_part_type 1; skipped images: "
            "corrupt_image 1, empty_image 1, missing_image 1") in data.summary()


def test_a_long_document_is_cut_between_its_parts_never_inside_an_image():
    spans = np.array([(3, 8, 1), (9, 16, 3), (18, 20, 1)])
    assert cut_document(25, spans, 10, 5) == [(0, 9, 1), (9, 18, 3), (18, 25, 1)]  # by tokens
    assert cut_document(25, spans, 20, 3) == [(0, 9, 1), (9, 18, 3), (18, 25, 1)]  # by tiles
    assert cut_document(35, np.zeros((0, 3), int), 10, 5) == [(0, 10, 0), (10, 20, 0), (20, 30, 0), (30, 35, 0)]
    assert cut_document(25, np.array([(0, 25, 1)]), 10, 5) is None  # an image-caption pair is one span: never cut
    assert cut_document(25, spans, 6, 5) is None  # an image block longer than a row


def test_rows_of_cut_documents_hold_whole_images(corpus):
    # 41-token documents, 33-token rows: each is cut before its wide image, into 22 + 19 tokens.
    data = build_datasets(config(source(corpus / "layout.jsonl", "interleaved"), overrides=["train.seq_len=32"]))
    assert data.split_documents == data.train_documents and not data.skipped
    expected = [special("bos"), *b"ab <|patch|>", *block((1, 1)), *b"cd", *block((1, 2)), *b"e", special("eos")]
    for step in range(4):
        batch = data.train[step]
        for r in range(len(batch["inputs"])):
            row = np.concatenate([batch["inputs"][r, :1], batch["targets"][r]])
            start = batch["positions"][r, 0]
            assert start in (0, 22)
            piece = row[:22] if start == 0 else row[:19]
            assert piece.tolist() == expected[start:start + len(piece)]
            tiles = batch["pixels"][r].reshape(8, -1).any(axis=1).sum()
            assert batch["patch_mask"][r].sum() == 4 * tiles and tiles == (1 if start == 0 else 3)


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory):
    """The interleaved source prepared by the command line (two files, two workers), the pairs by `prepare`;
    and what the command printed."""
    from maxllama.cli import main
    out = tmp_path_factory.mktemp("stores")
    (out / "interleaved.yaml").write_text(dump_config(config(source(corpus / "mixed" / "*.jsonl", "interleaved"))))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["prepare", "--config", str(out / "interleaved.yaml"), "--out", str(out / "interleaved"),
                     "--workers", "2", "--quiet"]) == 0
    pairs = config(source(corpus / "pairs.jsonl", "image_caption"))
    prepare(pairs.data.sources, out / "pairs", val_fraction=0.2, workers=1, progress=False, log=lambda *_: None,
            vision=pairs.vision)
    return out, printed.getvalue()


def test_prepare_stores_tiles_and_counts_images_by_reason(stores):
    stores, printed = stores
    assert "skipped images: corrupt_image 1, empty_image 1, missing_image 1" in printed
    assert "images in" in printed and "tiles" in printed
    manifest = json.loads((stores / "interleaved" / "manifest.json").read_text())
    assert manifest["format"] == "maxllama-image-store-v1"
    assert manifest["skipped_images"] == {"corrupt_image": 1, "empty_image": 1, "missing_image": 1}
    assert manifest["skipped"] == {"empty_document": 2, "malformed_part": 3, "unknown_part_type": 1}
    splits = manifest["splits"].values()
    # 20 layout documents (2 images, 4 tiles), one kept of the bad ones (1, 1) and 20 more (10 wide, 10 small).
    assert sum(s["images"] for s in splits) == 40 + 1 + 20 and sum(s["tiles"] for s in splits) == 80 + 1 + 40
    assert sum(s["documents"] for s in splits) == 20 + 2 + 20
    assert manifest["vision"] == {"image_size": 28, "max_tiles": 4, "tokens_per_tile": 4}
    shape = json.loads((stores / "interleaved" / "train" / "tiles" / "zarr.json").read_text())["shape"]
    assert shape == [manifest["splits"]["train"]["tiles"], 3, 28, 28]
    pairs = json.loads((stores / "pairs" / "manifest.json").read_text())
    assert pairs["skipped_images"] == {"corrupt_image": 1} and pairs["skipped"] == {"caption_without_image": 1}


@pytest.mark.parametrize("kind, path", [("interleaved", "mixed/*.jsonl"), ("image_caption", "pairs.jsonl")])
def test_a_prepared_store_gives_the_batches_of_its_jsonl(corpus, stores, kind, path, monkeypatch):
    stores = stores[0]
    text_source = f"{{path: {corpus / 'text.jsonl'}, weight: 0.5}}"
    direct = build_datasets(config(source(corpus / path, kind), text_source))

    def no_decoding(*_):
        raise AssertionError("training from a store decoded an image")
    monkeypatch.setattr("maxllama.data.image_captions.decode_image", no_decoding)
    stored = build_datasets(config(f"{{path: {stores / ('interleaved' if kind == 'interleaved' else 'pairs')}}}",
                                   text_source))
    assert stored.summary() == direct.summary()
    for step in [0, 1, 5, 17]:
        expected, got = direct.train[step], stored.train[step]
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), (step, key)
    for expected, got in zip(direct.validation, stored.validation, strict=True):
        for key, value in expected.items():
            assert np.array_equal(got[key], value), key
    assert any(direct.train[s]["patch_mask"].any() for s in range(4))  # image rows among the text rows


def test_image_stores_and_sources_refuse_what_does_not_fit(corpus, stores, tmp_path):
    store, vision = f"{{path: {stores[0] / 'pairs'}}}", load_config(None, IMAGES)[0].vision
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*pairs holds images tiled for .*max_tiles': 4"):
        build_datasets(config(store, overrides=["vision.max_tiles=2", "vision.tiles_per_row=3"]))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*a store of images, needs a vision encoder"):
        build_datasets(load_config(None, [f"data.sources=[{store}]", *SMALL])[0])
    interleaved = SourceConfig(path=str(corpus / "layout.jsonl"), format="interleaved")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format: interleaved needs a vision encoder"):
        prepare([interleaved], tmp_path / "a", progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format: interleaved sources make a store of images"):
        prepare([SourceConfig(path=str(corpus / "text.jsonl")), interleaved], tmp_path / "b", progress=False,
                log=lambda *_: None, vision=vision)
    missing = tmp_path / "missing.jsonl"
    jsonl(missing, [{"content": [text("x"), image("nowhere/0.png")]}])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*missing.jsonl:1: the image folder .*nowhere"):
        prepare([SourceConfig(path=str(missing), format="interleaved")], tmp_path / "c", progress=False,
                log=lambda *_: None, vision=vision)


def test_text_that_spells_a_special_token_stays_text(tmp_path):
    tokenizer = train_bpe(["a picture <|patch|> of <|image|> text"] * 20, 300, tmp_path / "tokenizer.json")
    ids = tokenizer.encode("see <|patch|><|image_start|>")
    assert not set(ids.tolist()) & set(tokenizer.special.values())
    assert tokenizer.decode(ids) == "see <|patch|><|image_start|>"
