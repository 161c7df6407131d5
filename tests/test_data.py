import json
from collections import Counter

import numpy as np
import pytest

from maxllama.config import ConfigError, load_config
from maxllama.config.schema import SourceConfig
from maxllama.data.corpus import stdlib_files, stdlib_root
from maxllama.data.packing import ConcatWindows, FirstFitRows, first_fit_decreasing
from maxllama.data.pipeline import build_datasets, unigram_entropy
from maxllama.data.prepare import prepare
from maxllama.data.sources import held_out, iter_documents, resolve_files
from maxllama.data.store import concatenate_documents, open_store
from maxllama.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, make_tokenizer, train_bpe
from tests.conftest import small_config

BOS, EOS, PAD = 0, 1, 2


def arrays(*lengths, start=10):
    docs = [np.arange(start + 100 * i, start + 100 * i + n) for i, n in enumerate(lengths)]
    return docs, concatenate_documents(docs, BOS, EOS)


# --- tokenizers -----------------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_and_reserves_special_tokens():
    tok = ByteTokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert min(tok.special.values()) == 256 and len(set(tok.special.values())) == len(SPECIAL_TOKENS)


CORPUS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 20


def test_trained_bpe_and_hf_tokenizer_reserve_special_tokens(tmp_path):
    trained = train_bpe(CORPUS, 300, tmp_path / "tokenizer.json")
    loaded = make_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.vocab_size == trained.vocab_size <= 300 + len(SPECIAL_TOKENS)
    assert set(loaded.special) == set(SPECIAL_TOKENS)
    text = "def f(x):\n    return os.getcwd()\n"
    ids = loaded.encode(text)
    assert loaded.decode(ids) == text and not set(ids.tolist()) & set(loaded.special.values())
    assert len(ids) < len(text)  # merges learned


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    tok = make_tokenizer(str(tmp_path / "sp.model"))
    assert tok.bos_id == tok.sp.bos_id() and tok.eos_id == tok.sp.eos_id()
    assert tok.special["<|patch|>"] >= tok.n_pieces  # appended after the model's pieces
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"


def test_tokenizer_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer: .*missing.json not found"):
        make_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer: .*could not be loaded"):
        make_tokenizer(str(tmp_path / "bad.json"))


# --- sources and bad data ----------------------------------------------------------------------------------------

def test_missing_paths_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*nope does not exist"):
        resolve_files(SourceConfig(path=str(tmp_path / "nope")), "data.sources[0].path")
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_files(SourceConfig(path=str(tmp_path / "*.jsonl")), "data.sources[0].path")


def test_bad_jsonl_records_are_skipped_and_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good one"}\nnot json\n{"body": "no text field"}\n\n{"text": "   "}\n'
                    '{"text": 5}\n{"text": "good two"}\n')
    skipped = Counter()
    docs = list(iter_documents(str(path), "jsonl", "text", skipped, str(tmp_path) + "/"))
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [d.id for d in docs] == ["data.jsonl:1", "data.jsonl:7"]
    assert skipped == Counter(invalid_json=1, missing_field=2, empty_document=1)


def test_undecodable_bytes_are_repaired_and_counted(tmp_path):
    from maxllama.data.prepare import WorkUnit, tokenize_file
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok\n")
    bpe = train_bpe(CORPUS, 280, tmp_path / "tok.json")
    unit = WorkUnit(0, str(tmp_path / "a.txt"), "text", "text", str(tmp_path) + "/")
    docs, counts = tokenize_file(unit, bpe, 0.0)
    assert counts["repaired_undecodable_bytes"] == 1 and "\ufffd" in bpe.decode(docs["train"][0])
    docs, counts = tokenize_file(unit, ByteTokenizer(), 0.0)  # bytes need no repair with the byte tokenizer
    assert not counts and docs["train"][0].tolist() == list(b"caf\xe9 ok\n")


def test_parquet_source_and_unreadable_shard(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["first", "", None, "second"]}), tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    skipped = Counter()
    docs = [d.text for f in ("a.parquet", "b.parquet")
            for d in iter_documents(str(tmp_path / f), "parquet", "content", skipped)]
    assert docs == ["first", "second"]
    assert skipped == Counter(empty_document=1, missing_field=1, unreadable_file=1)
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "a.parquet"), "parquet", "text", Counter()))


def test_validation_split_is_by_document_and_stable():
    files = stdlib_files()
    held = [f for f in files if held_out(f.relative_to(stdlib_root()).as_posix(), 0.02)]
    assert 0.005 < len(held) / len(files) < 0.05
    # A function of the id alone (SHA-256), the same in every process and on every machine: these values were
    # computed once; Python's salted hash() would change them from one process to the next.
    assert [held_out(f"doc{i:02d}.txt", 0.5) for i in range(12)] == [True, True, False, False, False, True, True,
                                                                     False, True, False, False, True]
    assert not held_out("json/decoder.py", 0.5)


def _markers(batches) -> set[int]:
    """The document numbers `<07>` in a list of batches' inputs (bytes; special tokens dropped)."""
    import re
    text = b"".join(bytes(int(t) for t in row if t < 256) for batch in batches for row in batch["inputs"])
    return {int(m) for m in re.findall(rb"<(\d\d)>", text)}


def test_validation_documents_are_never_trained_on(tmp_path):
    for i in range(40):  # every document says its number, and nothing else
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<{i:02d}>" * 20)
    cfg = small_config(f"data.sources=[{{path: {tmp_path}}}]", "data.val_fraction=0.25", "train.seq_len=16",
                       "model.attn_chunk=8", "train.batch_size=2", "train.eval_batches=100")
    data = build_datasets(cfg)
    (source,) = data.sources
    split = {name: {int(bytes(doc[1:-1].tolist())[1:3]) for doc in arrays.read_ranges(
                 [(a, b) for a, b in zip(arrays.doc_starts, [*arrays.doc_starts[1:], arrays.n_tokens])])}
             for name, arrays in source.splits.items()}
    assert split["validation"] == {i for i in range(40) if held_out(f"doc{i:02d}.txt", 0.25)}
    assert split["train"] == set(range(40)) - split["validation"] and len(split["validation"]) >= 5
    # What evaluation reads is held out, and what training reads (several epochs of it) never is.
    assert _markers(data.validation) == split["validation"]
    assert _markers([data.train[step] for step in range(200)]) == split["train"]


# --- packing -------------------------------------------------------------------------------------------------------

def test_concat_windows_carry_segments_positions_and_mask():
    _, tokens = arrays(5, 3, 10)  # with BOS and EOS: 7, 5, 12 tokens
    windows = ConcatWindows(tokens, 8, PAD)
    assert len(windows) == (7 + 5 + 12 - 1) // 8
    w = windows.read([0, 1])
    np.testing.assert_array_equal(w["inputs"][0], [0, 10, 11, 12, 13, 14, 1, 0])
    np.testing.assert_array_equal(w["targets"][0], [10, 11, 12, 13, 14, 1, 0, 110])
    np.testing.assert_array_equal(w["segment_ids"][0], [1, 1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(w["positions"][0], [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(w["loss_mask"][0], [1, 1, 1, 1, 1, 1, 0, 1])  # EOS -> next BOS: masked
    assert w["inputs"][1][0] == 110 and w["positions"][1][0] == 1 and w["segment_ids"][1][0] == 1


def test_concat_windows_lose_and_duplicate_no_token():
    _, tokens = arrays(50, 3, 17, 120, 1)
    windows = ConcatWindows(tokens, 16, PAD)
    rows = windows.read(range(len(windows)))
    stream = np.concatenate([rows["inputs"].reshape(-1), rows["targets"][-1, -1:]])
    np.testing.assert_array_equal(stream, tokens.tokens_np[:len(stream)])
    assert tokens.n_tokens - len(stream) < 16  # only the incomplete last window is left for the next epoch


def test_first_fit_packs_every_token_exactly_once_and_splits_long_documents():
    docs, tokens = arrays(5, 3, 40, 10, 2, 25, 7)  # 40 + 2 and 25 + 2 exceed a row of 17: split, not cut
    packer = FirstFitRows(tokens, 16, PAD, seed=3, block=4)
    assert packer.split_documents == 2
    layout = [packer.row_pieces(0, r) for r in range(len(packer))]
    pieces = sorted((int(packer.piece_start[p]), int(packer.piece_stop[p])) for row in layout for p in row)
    assert pieces[0][0] == 0 and pieces[-1][1] == tokens.n_tokens  # the pieces tile the stream exactly:
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(pieces, pieces[1:]))  # none lost or twice
    assert all(sum(packer.piece_stop[p] - packer.piece_start[p] for p in row) <= 17 for row in layout)
    rows = packer.read(range(len(packer)))
    stream = np.concatenate([[BOS, *d, EOS] for d in docs])
    for r, row in enumerate(layout):
        at = 0
        for p in row:
            start, stop = int(packer.piece_start[p]), int(packer.piece_stop[p])
            n = min(stop - start, 16 - at)  # the row's inputs: its first 16 tokens
            if n <= 0:
                break
            np.testing.assert_array_equal(rows["inputs"][r, at:at + n], stream[start:start + n])
            doc = np.searchsorted(tokens.doc_starts, start, side="right") - 1
            np.testing.assert_array_equal(rows["positions"][r, at:at + n], np.arange(n) + start - tokens.doc_starts[doc])
            assert len(set(rows["segment_ids"][r, at:at + n].tolist())) == 1
            at += n
    real = rows["segment_ids"] > 0
    assert (rows["inputs"][~real] == PAD).all() and (rows["loss_mask"][~real] == 0).all()
    assert 0 < (~real).mean() < 0.5


def test_first_fit_decreasing_respects_capacity():
    lengths = np.array([9, 2, 7, 3, 5, 5, 1])
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 4  # 32 tokens need at least 4 bins


# --- the pipeline -------------------------------------------------------------------------------------------------

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


def test_seek_equals_sequential_reading(datasets):
    sequential = iter(datasets.train.to_iter_dataset())
    batches = [next(sequential) for _ in range(6)]
    np.testing.assert_array_equal(datasets.train[5]["inputs"], batches[5]["inputs"])
    resumed = iter(datasets.train[4:].to_iter_dataset())
    np.testing.assert_array_equal(next(resumed)["targets"], batches[4]["targets"])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_hosts_read_disjoint_shares_of_the_same_global_batch(packing):
    cfg = small_config(f"data.packing={packing}", "train.batch_size=8")
    whole = build_datasets(cfg)
    hosts = [build_datasets(cfg, process_index=i, process_count=4) for i in range(4)]
    for step in [0, 3, 101]:
        for key in ["inputs", "segment_ids", "positions", "loss_mask"]:
            union = np.concatenate([h.train[step][key] for h in hosts])
            np.testing.assert_array_equal(union, whole.train[step][key])
    np.testing.assert_array_equal(np.concatenate([h.validation[0]["inputs"] for h in hosts]),
                                  whole.validation[0]["inputs"])


def test_store_gives_the_same_batches_as_in_memory_tokenization(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.txt").write_text(f"document {i}\n" + "x = 1\n" * (i + 3))
    (src / "empty.txt").write_text("  \n")
    manifest = prepare([SourceConfig(path=str(src))], tmp_path / "store", workers=2, progress=False,
                       val_fraction=0.2, log=lambda *_: None)
    assert manifest["skipped"] == {"empty_document": 1}
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 30
    overrides = ["train.batch_size=2", "train.seq_len=16", "model.attn_chunk=8", "data.val_fraction=0.2",
                 "train.eval_batches=1"]
    direct = build_datasets(small_config(*overrides, f"data.sources=[{{path: {src}}}]"))
    stored = build_datasets(small_config(*overrides, f"data.sources=[{{path: {tmp_path / 'store'}}}]"))
    for step in [0, 5, 40]:
        for key, value in direct.train[step].items():
            np.testing.assert_array_equal(stored.train[step][key], value)
    _, splits = open_store(str(tmp_path / "store"))
    assert splits["train"].n_tokens == manifest["splits"]["train"]["tokens"]


def test_prepare_resumes_after_interruption(tmp_path, monkeypatch):
    import maxllama.data.prepare as prep
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i:02d}.txt").write_text(f"text {i} " * (i + 1))
    clean = prepare([SourceConfig(path=str(src))], tmp_path / "clean", workers=1, progress=False,
                    log=lambda *_: None)
    real_process, calls = prep._process, []

    def dies_after_five(job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job[0].index)
        return real_process(job)

    monkeypatch.setattr(prep, "_process", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        prepare([SourceConfig(path=str(src))], tmp_path / "store", workers=1, progress=False, log=lambda *_: None)
    assert not (tmp_path / "store" / "manifest.json").exists()  # incomplete: no manifest
    calls.clear()
    monkeypatch.setattr(prep, "_process", lambda job: (calls.append(job[0].index), real_process(job))[1])
    resumed = prepare([SourceConfig(path=str(src))], tmp_path / "store", workers=1, progress=False,
                      log=lambda *_: None)
    assert sorted(calls) == list(range(5, 12))  # only the files not done before the interruption
    assert resumed["splits"] == clean["splits"]  # same tokens, same checksums


def test_store_tokenized_differently_is_refused(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    prepare([SourceConfig(path=str(src))], tmp_path / "store", progress=False, log=lambda *_: None)
    train_bpe(CORPUS, 280, tmp_path / "tok.json")
    with pytest.raises(ConfigError, match="was tokenized with byte"):
        build_datasets(small_config(f"data.sources=[{{path: {tmp_path / 'store'}}}]",
                                    f"data.tokenizer={tmp_path / 'tok.json'}"))


def test_mixture_follows_weights(tmp_path):
    for name, char in [("a", "a"), ("b", "b")]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": char * 40}) + "\n" for _ in range(60)))
    cfg = small_config(f"data.sources=[{{path: {tmp_path / 'a.jsonl'}, weight: 3.0}}, "
                       f"{{path: {tmp_path / 'b.jsonl'}, weight: 1.0}}]", "train.seq_len=16", "model.attn_chunk=8",
                       "data.val_fraction=0.2", "train.eval_batches=1")
    data = build_datasets(cfg)
    counts = Counter()
    for step in range(50):
        inputs = data.train[step]["inputs"]
        counts["a"] += int((inputs == ord("a")).sum())
        counts["b"] += int((inputs == ord("b")).sum())
    assert 2.5 < counts["a"] / counts["b"] < 3.5


def test_unigram_entropy_is_correct(datasets):
    batches = [{"targets": np.array([[0, 0, 1, 2]]), "loss_mask": np.array([[1, 1, 1, 0]])}]
    assert unigram_entropy(batches) == pytest.approx(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))
    assert 2.0 < unigram_entropy(datasets.validation) < 4.0  # bytes of Python source


def test_config_rejects_bad_sources():
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources\[0\].pth'; did you mean path"):
        load_config(None, ["data.sources=[{pth: x}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: must be positive"):
        load_config(None, ["data.sources=[{path: stdlib, weight: 0}]"])


def test_remote_filesystems_through_fsspec():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.txt", b"first document")
    fs.pipe("/corpus/sub/b.txt", b"second document")
    files = resolve_files(SourceConfig(path="memory://corpus"), "data.sources[0].path")
    assert len(files) == 2
    from maxllama.data.sources import document_root
    root = document_root(files)
    docs = [d for f in files for d in iter_documents(f, "text", "text", Counter(), root)]
    assert [(d.id, d.text) for d in docs] == [("a.txt", b"first document"), ("sub/b.txt", b"second document")]
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_files(SourceConfig(path="memory://corpus/*.jsonl"), "data.sources[0].path")
