import numpy as np
import pytest

from maxllama.data.corpus import held_out, split_files, stdlib_files, stdlib_root
from maxllama.data.packing import PackedStream
from maxllama.data.pipeline import build_datasets, unigram_entropy
from maxllama.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from tests.conftest import small_config


def test_byte_tokenizer_round_trips_and_reserves_special_tokens():
    tok = ByteTokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.special["<|patch|>"]}) == 4
    assert min(tok.special.values()) == 256


def test_packing_windows_carry_segments_positions_and_mask():
    docs = [np.arange(10, 15), np.arange(20, 23), np.arange(30, 40)]  # lengths 5, 3, 10 (+ BOS and EOS each)
    stream = PackedStream(docs, bos_id=0, eos_id=1, seq_len=8)
    assert len(stream) == (7 + 5 + 12 - 1) // 8
    w = stream.window(0)
    np.testing.assert_array_equal(w["inputs"], [0, 10, 11, 12, 13, 14, 1, 0])
    np.testing.assert_array_equal(w["targets"], [10, 11, 12, 13, 14, 1, 0, 20])
    np.testing.assert_array_equal(w["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(w["positions"], [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(w["loss_mask"], [1, 1, 1, 1, 1, 1, 0, 1])  # EOS -> next BOS: masked
    w1 = stream.window(1)
    assert w1["inputs"][0] == 20 and w1["positions"][0] == 1 and w1["segment_ids"][0] == 1


def test_split_by_file_is_stable_and_disjoint():
    root = stdlib_root()
    files = stdlib_files(root)
    split = split_files(files, root, 0.02)
    assert not set(split.train) & set(split.validation)
    assert len(split.train) + len(split.validation) == len(files)
    assert 0.005 < len(split.validation) / len(files) < 0.05
    assert held_out("json/decoder.py", 0.5) == held_out("json/decoder.py", 0.5)


@pytest.fixture(scope="module")
def datasets():
    return build_datasets(small_config())


def test_batch_at_step_is_a_function_of_seed_and_step(datasets):
    again = build_datasets(small_config())
    other_seed = build_datasets(small_config("seed=1"))
    for step in [0, 7, 12345]:
        np.testing.assert_array_equal(datasets.train[step]["inputs"], again.train[step]["inputs"])
        assert not np.array_equal(datasets.train[step]["inputs"], other_seed.train[step]["inputs"])
    assert datasets.train[3]["inputs"].shape == (4, 32)
    # Seeking: iterating from step 5 yields exactly train[5], train[6], ...
    it = iter(datasets.train[5:].to_iter_dataset())
    for step in (5, 6):
        np.testing.assert_array_equal(next(it)["inputs"], datasets.train[step]["inputs"])


def test_validation_is_fixed_and_unigram_entropy_is_correct(datasets):
    batches = [{"targets": np.array([[0, 0, 1, 2]]), "loss_mask": np.array([[1, 1, 1, 0]])}]
    assert unigram_entropy(batches) == pytest.approx(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))
    assert 2.0 < unigram_entropy(datasets.validation) < 4.0  # bytes of Python source
