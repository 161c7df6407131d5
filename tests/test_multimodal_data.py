"""Image-caption data: documents with whole image blocks, two budgets per row, bad images skipped by reason."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from maxllama.config import ConfigError, load_config
from maxllama.data.images import IMAGE_TOKENS
from maxllama.data.pipeline import build_datasets

VISION = ["vision.enabled=true", "vision.d_model=32", "vision.n_heads=2", "vision.d_ff=128", "vision.image_size=28",
          "vision.patch_size=7", "vision.projector_dim=32", "vision.n_layers=1", "vision.max_tiles=4",
          "vision.tiles_per_row=5"]
SMALL = ["train.seq_len=128", "train.batch_size=2", "train.eval_batches=1", "data.val_fraction=0.2",
         "model.attn_chunk=32"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):  # good ones: small (one tile) and wide (two tiles and a global view)
        shape = (28, 28, 3) if i % 2 else (30, 60, 3)
        (root / "img" / f"{i}.png").write_bytes(png(rng.integers(0, 256, shape, dtype=np.uint8)))
        records.append({"image": f"img/{i}.png", "text": f"picture {i}"})
    good = png(np.zeros((28, 28, 3), np.uint8))
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "img" / "empty.png").write_bytes(b"")
    records += [{"image": "img/corrupt.png", "text": "x"}, {"image": "img/truncated.png", "text": "x"},
                {"image": "img/empty.png", "text": "x"}, {"image": "img/missing.png", "text": "x"},
                {"text": "a caption without its image"}, {"image": "img/0.png"}]
    lines = [json.dumps(r) for r in records] + ["{not json"]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(captions, *more):
    source = f"data.sources=[{{path: {captions / 'captions.jsonl'}, format: image_caption}}]"
    return load_config(None, [source, *VISION, *SMALL, *more])[0]


def test_rows_hold_whole_images_and_the_patches_match_the_tiles(captions):
    cfg = config(captions)
    data = build_datasets(cfg)
    assert dict(data.skipped) == {"corrupt_image": 2, "empty_image": 1, "missing_image": 1,
                                  "caption_without_image": 1, "image_without_caption": 1, "invalid_json": 1}
    batch = data.train[0]
    v = cfg.vision
    assert batch["pixels"].shape == (2, 5, 3, 28, 28) and batch["pixels"].dtype == np.uint8
    patch = data.tokenizer.special["<|patch|>"]
    assert np.array_equal(batch["patch_mask"], batch["inputs"] == patch)
    for row in range(2):
        used_tiles = int(np.sum(batch["pixels"][row].reshape(5, -1).any(axis=1)))
        assert batch["patch_mask"][row].sum() == used_tiles * v.tokens_per_tile  # one feature row per patch token
        assert used_tiles > 0
    image_ids = [data.tokenizer.special[f"<|{name}|>"] for name in IMAGE_TOKENS]
    assert batch["loss_mask"][np.isin(batch["targets"], image_ids)].max() == 0  # image structure is never a target
    assert batch["loss_mask"].sum() > 0
    # The batch at a step is a function of the step.
    again = build_datasets(cfg).train[7]
    for key, value in data.train[7].items():
        np.testing.assert_array_equal(value, again[key], err_msg=key)
    assert data.validation[0]["pixels"].shape == (2, 5, 3, 28, 28)


def test_text_and_images_mix_by_weight_in_the_same_arrays(captions):
    text = captions / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain text number {i} " * 5}) + "\n" for i in range(60)))
    source = (f"data.sources=[{{path: {captions / 'captions.jsonl'}, format: image_caption}}, "
              f"{{path: {text}, weight: 1.0}}]")
    cfg = load_config(None, [source, *VISION, *SMALL])[0]
    data = build_datasets(cfg)
    kinds = set()
    for step in range(6):
        batch = data.train[step]
        assert batch["pixels"].shape == (2, 5, 3, 28, 28)
        kinds.update(bool(m.any()) for m in batch["patch_mask"])
    assert kinds == {True, False}  # rows of both kinds


def test_a_missing_image_folder_names_the_path(captions, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nowhere/0.png", "text": "x"}) + "\n")
    cfg = load_config(None, [f"data.sources=[{{path: {bad}, format: image_caption}}]", *VISION, *SMALL])[0]
    with pytest.raises(ConfigError, match="the image folder .*nowhere does not exist"):
        build_datasets(cfg)
    with pytest.raises(ConfigError, match="needs a vision encoder"):
        build_datasets(load_config(None, [f"data.sources=[{{path: {bad}, format: image_caption}}]", *SMALL])[0])


def test_batch_statistics_count_images_and_tiles(captions):
    from maxllama.data.pipeline import batch_statistics
    cfg = config(captions)
    data = build_datasets(cfg)
    batch = data.train[0]
    image_start = data.tokenizer.special["<|image_start|>"]
    stats = batch_statistics(batch, image_start)
    starts = int(np.sum(batch["inputs"] == image_start))
    assert stats["images"] == starts > 0
    assert stats["image_tiles"] == batch["patch_mask"].sum() / cfg.vision.tokens_per_tile
    assert stats["image_tokens_fraction"] == pytest.approx(batch["patch_mask"].mean())


@pytest.mark.slow
def test_a_run_with_images_resumes_bitwise(captions, tmp_path):
    from maxllama.train.loop import train
    from maxllama.train.metrics import read_metrics
    common = [*VISION, *SMALL, "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
              "model.d_ff_expert=32", "model.n_layers=2", "train.eval_every=1000", "train.log_every=1",
              "checkpoint.every_steps=3", "optim.schedule=constant", "optim.warmup_steps=0", "logging.progress=false",
              "logging.tensorboard=false", f"data.sources=[{{path: {captions / 'captions.jsonl'}, format: image_caption}}]"]
    quiet = lambda *_: None  # noqa: E731
    # A constant LR: the schedule must not depend on train.steps, which the resumed run raises from 3 to 6.
    train(load_config(None, [*common, "train.steps=6", f"run.dir={tmp_path / 'straight'}"])[0], log=quiet)
    train(load_config(None, [*common, "train.steps=3", f"run.dir={tmp_path / 'resumed'}"])[0], log=quiet)
    train(load_config(None, [*common, "train.steps=6", f"run.dir={tmp_path / 'resumed'}"])[0], log=quiet)
    straight, resumed = (read_metrics(tmp_path / name) for name in ("straight", "resumed"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight] and len(straight) == 6
    assert all(r["image_tiles"] > 0 for r in straight)


@pytest.mark.slow
def test_a_text_checkpoint_starts_a_multimodal_run(tmp_path):
    import jax

    from maxllama.checkpoint.manager import Checkpointer
    from maxllama.checkpoint.model_dir import restore_params_into
    from maxllama.config import dump_config
    from maxllama.model.build import define_abstract, init_params, one_device_sharding
    text_cfg = load_config(None, [*SMALL, "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2"])[0]
    sharding = one_device_sharding()
    text_params = init_params(text_cfg, define_abstract(text_cfg), sharding)
    (tmp_path / "config.yaml").write_text(dump_config(text_cfg))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save_params(0, jax.tree.map(np.asarray, text_params))
    checkpointer.close()
    cfg = load_config(None, [*SMALL, *VISION, "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2"])[0]
    model = define_abstract(cfg)
    fresh = init_params(cfg, model, sharding)
    logged = []
    params, _ = restore_params_into(tmp_path, cfg, model, sharding, fresh=lambda: fresh, log=logged.append)
    assert "no vision encoder" in logged[0]
    np.testing.assert_array_equal(params["embed"], text_params["embed"])  # the text part from the checkpoint
    np.testing.assert_array_equal(params["vision"]["projector"], fresh["vision"]["projector"])  # the tower new
