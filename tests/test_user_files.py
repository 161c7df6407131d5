"""Every parser of a file a user hands maxllama, fed truncated and corrupted copies of a valid file: it either
succeeds or raises one of the errors the CLI reports as `maxllama: error: <one line>` with exit code 2; never
another exception, never a hang. Then the same at the command line, once per kind of file."""

import contextlib
import json
import shutil
import signal
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from maxllama.cli import USER_ERRORS
from maxllama.config import load_config
from maxllama.config.schema import SourceConfig
from maxllama.data.prepare import WorkUnit, prepare, tokenize_file
from maxllama.data.sources import iter_documents
from maxllama.data.store import open_store
from maxllama.data.tokenizer import ByteTokenizer, make_tokenizer, train_bpe
from maxllama.interop import InteropError
from maxllama.interop.convert import import_config
from maxllama.interop.hf_config import hf_config_from_model
from maxllama.interop.safetensors_io import SafetensorsReader, write_file
from tests.conftest import SMALL_MODEL, small_config
from tests.test_cli import run as cli

FEW = settings(max_examples=40, deadline=None)
SOME = settings(max_examples=100, deadline=None)


# --- corrupting a file ------------------------------------------------------------------------------------------

# A corruption: where to cut the file (a fraction of its length; None keeps it whole) and bytes to overwrite
# (fraction of the length, new byte), fractions so that one strategy fits files of any size; or, now and
# then, random bytes instead of the file.
corruptions = st.tuples(st.none() | st.floats(0, 1, exclude_max=True),
                        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4)
                        ) | st.binary(max_size=200)


def corrupt(data: bytes, corruption) -> bytes:
    if isinstance(corruption, bytes):
        return corruption
    cut, writes = corruption
    out = bytearray(data[:int(cut * len(data))] if cut is not None else data)
    for where, byte in writes:
        if out:
            out[int(where * len(out))] = byte
    return bytes(out)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@contextlib.contextmanager
def within(seconds: float):
    """Fail, rather than hang the suite, when a parser loops."""
    def hung(*_):
        raise AssertionError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def succeeds_or_user_error(parse) -> None:
    with within(20):
        try:
            parse()
        except USER_ERRORS as e:
            assert str(e) and "\n" not in str(e), repr(str(e))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


# --- HF checkpoint: safetensors and config.json -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(scratch):
    """A valid config.json (of the small model) beside a small safetensors file of several dtypes."""
    directory = scratch / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(small_config().model)))
    rng = np.random.default_rng(0)
    write_file(directory / "model.safetensors", [
        ("a.weight", rng.normal(size=(3, 4)).astype(np.float32)), ("b.bias", np.arange(5, dtype=np.int64)),
        ("c.scale", rng.normal(size=(2,)).astype(np.float16)), ("empty", np.zeros((0, 3), np.float32))],
        {"format": "pt"})
    return directory


def read_every_tensor(directory: Path) -> None:
    reader = SafetensorsReader(directory)
    for name in reader.names():
        np.array(reader.read(name))  # a copy: every byte is read


def with_file(directory: Path, name: str, data: bytes) -> Path:
    """A copy of `directory` in a fresh temporary folder with `name` replaced by `data`."""
    copy = Path(tempfile.mkdtemp(dir=directory.parent)) / directory.name
    shutil.copytree(directory, copy)
    (copy / name).write_bytes(data)
    return copy


def header(directory: Path) -> dict:
    data = (directory / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def with_header(directory: Path, new_header) -> bytes:
    """The safetensors file with another header (same data region)."""
    data = (directory / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    blob = json.dumps(new_header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + length:]


@SOME
@given(corruptions)
def test_corrupted_safetensors(hf_dir, corruption):
    data = corrupt((hf_dir / "model.safetensors").read_bytes(), corruption)
    succeeds_or_user_error(lambda: read_every_tensor(with_file(hf_dir, "model.safetensors", data)))


@SOME
@given(st.sampled_from(["a.weight", "b.bias", "empty"]), st.sampled_from(["dtype", "shape", "data_offsets", None]),
       json_values)
@example("a.weight", "data_offsets", [0, 10**6])  # past the end: a truncated file
@example("a.weight", "shape", [-3, -4])
@example("empty", "shape", [0, 2**40, 2**40])  # zero bytes, yet too large for numpy
@example("b.bias", None, None)  # the entry itself replaced
def test_safetensors_header_of_another_structure(hf_dir, tensor, field, value):
    new = header(hf_dir)
    if field is None:
        new[tensor] = value
    else:
        new[tensor][field] = value
    directory = with_file(hf_dir, "model.safetensors", with_header(hf_dir, new))
    succeeds_or_user_error(lambda: read_every_tensor(directory))


@FEW
@given(corruptions)
def test_corrupted_safetensors_index(hf_dir, corruption):
    from maxllama.interop.safetensors_io import INDEX_FILE, write_sharded
    sharded = Path(tempfile.mkdtemp(dir=hf_dir.parent))
    reader = SafetensorsReader(hf_dir)
    write_sharded(sharded, ((n, np.array(reader.read(n))) for n in sorted(reader.names())), max_shard_bytes=40)
    (sharded / INDEX_FILE).write_bytes(corrupt((sharded / INDEX_FILE).read_bytes(), corruption))
    succeeds_or_user_error(lambda: read_every_tensor(sharded))


def test_safetensors_errors_name_the_file_and_the_problem(hf_dir):
    truncated = with_file(hf_dir, "model.safetensors", (hf_dir / "model.safetensors").read_bytes()[:-30])
    with pytest.raises(InteropError, match=r"model.safetensors: tensor '.*': data_offsets .* the file is truncated"):
        read_every_tensor(truncated)
    garbage = with_file(hf_dir, "model.safetensors", b"\xff" * 64)  # a header length of 2**64 - 1
    with pytest.raises(InteropError, match="model.safetensors: not a safetensors file, or truncated"):
        read_every_tensor(garbage)
    listed = with_file(hf_dir, "model.safetensors", with_header(hf_dir, [1, 2]))
    with pytest.raises(InteropError, match="header must be a JSON object, got list"):
        read_every_tensor(listed)


@SOME
@given(corruptions)
def test_corrupted_hf_config(hf_dir, corruption):
    data = corrupt((hf_dir / "config.json").read_bytes(), corruption)
    directory = with_file(hf_dir, "config.json", data)
    succeeds_or_user_error(lambda: import_config(directory, directory / "out"))


@SOME
@given(st.sampled_from(sorted(hf_config_from_model(small_config().model))), json_values)
@example("hidden_size", "abc")
@example("num_attention_heads", 0)
@example("no_rope_layer_interval", 0)
@example("rope_parameters", [1])
@example("rope_theta", 10**400)  # beyond a float
@example("num_hidden_layers", 10**12)  # would take hours to lay out
def test_hf_config_fields_of_any_type(hf_dir, key, value):
    hf = json.loads((hf_dir / "config.json").read_text())
    hf[key] = value
    directory = with_file(hf_dir, "config.json", json.dumps(hf).encode())
    succeeds_or_user_error(lambda: import_config(directory, directory / "out"))


def test_hf_config_errors_name_the_file_and_field(hf_dir):
    hf = json.loads((hf_dir / "config.json").read_text())
    wrong = with_file(hf_dir, "config.json", json.dumps({**hf, "hidden_size": "abc"}).encode())
    with pytest.raises(InteropError, match=r"hf/config.json: 'hidden_size' must be an integer, got 'abc'"):
        import_config(wrong, wrong / "out")
    listed = with_file(hf_dir, "config.json", b"[1, 2]")
    with pytest.raises(InteropError, match="config.json: must be a JSON object of fields, got list"):
        import_config(listed, listed / "out")


# --- tokenizers -------------------------------------------------------------------------------------------------

CORPUS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 10


@pytest.fixture(scope="module")
def tokenizer_files(scratch):
    import sentencepiece as spm
    train_bpe(CORPUS, 280, scratch / "tokenizer.json")
    (scratch / "corpus.txt").write_text("".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(scratch / "corpus.txt"), model_prefix=str(scratch / "sp"),
                                   vocab_size=40, model_type="bpe", minloglevel=2)
    return {".json": (scratch / "tokenizer.json").read_bytes(), ".model": (scratch / "sp.model").read_bytes()}


@FEW
@given(st.sampled_from([".json", ".model"]), corruptions)
def test_corrupted_tokenizer(tokenizer_files, scratch, suffix, corruption):
    path = Path(tempfile.mkdtemp(dir=scratch)) / f"tokenizer{suffix}"
    path.write_bytes(corrupt(tokenizer_files[suffix], corruption))

    def load_and_use():
        tokenizer = make_tokenizer(str(path))
        tokenizer.decode(tokenizer.encode("def f(x): return x"))
    succeeds_or_user_error(load_and_use)


def test_tokenizer_errors_name_the_key_and_file(tokenizer_files, scratch):
    for suffix, data in tokenizer_files.items():
        path = scratch / f"truncated{suffix}"
        path.write_bytes(data[:len(data) // 2])
        with pytest.raises(USER_ERRORS, match=rf"data.tokenizer: .*truncated\{suffix} could not be loaded"):
            make_tokenizer(str(path))


# --- YAML run configs and sweep files ---------------------------------------------------------------------------

RUN_CONFIG = """\
# a small run
run: {name: tiny}
model:
  d_model: 32
  n_layers: 2
train:
  steps: 10
  seq_len: 64
optim: {lr: 3.0e-3, warmup_steps: 2}
data:
  sources: [{path: stdlib}]
"""


@SOME
@given(corruptions)
@example((0.0, []))  # empty
@example((0.05, []))  # nothing but a comment
@example((None, [(0.5, 0xff)]))  # not UTF-8
@example((None, [(0.3, 0)]))  # a NUL byte
def test_corrupted_run_config(scratch, corruption):
    path = Path(tempfile.mkdtemp(dir=scratch)) / "config.yaml"
    path.write_bytes(corrupt(RUN_CONFIG.encode(), corruption))
    succeeds_or_user_error(lambda: load_config(path))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_an_empty_config_says_what_to_write(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(USER_ERRORS, match=r"config.yaml: the config file is empty; write at least one setting"):
        load_config(tmp_path / "config.yaml")


SWEEP = """\
base: base.yaml
name: "lr{optim.lr}_s{seed}"
overrides: {train.steps: 10, optim.warmup_steps: 1}
grid: {optim.lr: [1.0e-3, 3.0e-3]}
zip: {model.d_model: [32], model.n_heads: [4]}
random: {n: 1, seed: 0, params: {optim.b2: {choice: [0.95, 0.99]}, optim.weight_decay: {uniform: [0.0, 0.1]}}}
seeds: [0]
budget: 4
executor: {type: local, parallel: 1}
"""


@pytest.fixture(scope="module")
def sweep_dir(scratch):
    directory = scratch / "sweep"
    directory.mkdir()
    (directory / "base.yaml").write_text("model:\n  d_model: 32\n")
    return directory


@SOME
@given(corruptions)
def test_corrupted_sweep_file(sweep_dir, corruption):
    from maxllama.sweep.spec import load_sweep
    path = sweep_dir / "sweep.yaml"
    path.write_bytes(corrupt(SWEEP.encode(), corruption))
    succeeds_or_user_error(lambda: load_sweep(path))


@pytest.mark.parametrize("entry,message", [
    ("grid: {optim.lr: []}", r"sweep.yaml:1: grid.optim.lr: is an empty list, which gives no runs"),
    ("grid: {optim.lr: 0.001}", r"sweep.yaml:1: grid.optim.lr: must be a list of the values to sweep, e.g. \[0.001\]"),
    ("seeds: []", r"seeds: is an empty list"),
    ("zip: [1, 2]", r"zip: must be a mapping of dotted keys to values"),
    ("random: {n: 0, params: {optim.lr: {uniform: [0, 1]}}}", r"random.n: must be a positive integer"),
    ("random: {params: {optim.lr: {log_uniform: [0, 1]}}}", r"log_uniform: must be \[low, high\] .* low > 0"),
    ("budget: 0", r"budget: must be a positive number of runs"),
    ("executor: {parallel: two}", r"executor.parallel: must be a positive integer"),
    ("name: ..", r"gives the run name '..'"),
])
def test_malformed_sweep_entries_are_named(sweep_dir, entry, message):
    from maxllama.sweep.spec import load_sweep
    path = sweep_dir / "sweep.yaml"
    path.write_text(f"{entry}\nbase: base.yaml\n")
    with pytest.raises(USER_ERRORS, match=message):
        load_sweep(path)


# --- data sources -----------------------------------------------------------------------------------------------

JSONL = "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(
    ["first document", "café ☃ naïve", "", "x = 1\ny = 2"])) + '{"body": "no text"}\n'


@SOME
@given(corruptions)
@example((None, [(0.0, 0x00), (0.4, 0xff)]))
def test_corrupted_jsonl(scratch, corruption):
    path = Path(tempfile.mkdtemp(dir=scratch)) / "data.jsonl"
    path.write_bytes(corrupt(JSONL.encode(), corruption))
    unit = WorkUnit(0, str(path), "jsonl", "text", str(path.parent) + "/")
    succeeds_or_user_error(lambda: tokenize_file(unit, ByteTokenizer(), 0.5))


def test_lone_surrogates_in_jsonl_are_repaired_and_counted(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "half \\ud800 a pair"}\n{"text": "fine"}\n')
    unit = WorkUnit(0, str(tmp_path / "data.jsonl"), "jsonl", "text", str(tmp_path) + "/")
    docs, counts = tokenize_file(unit, ByteTokenizer(), 0.0)
    assert counts == Counter(repaired_lone_surrogates=1)
    assert bytes(docs["train"][0].astype(np.uint8)) == b"half ? a pair"


@pytest.fixture(scope="module")
def parquet_bytes(scratch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first", "", None, "second ☃", "x" * 40], "n": [1, 2, 3, 4, 5]}),
                   scratch / "valid.parquet", row_group_size=2)
    return (scratch / "valid.parquet").read_bytes()


@SOME
@given(corruptions)
def test_corrupted_parquet(parquet_bytes, scratch, corruption):
    path = Path(tempfile.mkdtemp(dir=scratch)) / "data.parquet"
    path.write_bytes(corrupt(parquet_bytes, corruption))

    def read():
        skipped = Counter()
        list(iter_documents(str(path), "parquet", "text", skipped))
        assert all(reason in ("unreadable_file", "unreadable_row_group", "missing_field", "empty_document")
                   for reason in skipped), skipped
    succeeds_or_user_error(read)


# --- token stores -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(scratch):
    src = scratch / "src"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.txt").write_text(f"document {i} " * (i + 2))
    prepare([SourceConfig(path=str(src))], scratch / "store", workers=1, progress=False, val_fraction=0.3,
            log=lambda *_: None)
    return scratch / "store"


def open_and_read(store_dir: Path) -> None:
    _, splits = open_store(str(store_dir))
    for arrays in splits.values():
        arrays.read_ranges([(0, arrays.n_tokens)])


@SOME
@given(corruptions)
@example((0.5, []))
@example((None, [(0.1, ord("7"))]))
def test_corrupted_store_manifest(store, corruption):
    data = corrupt((store / "manifest.json").read_bytes(), corruption)
    succeeds_or_user_error(lambda: open_and_read(with_file(store, "manifest.json", data)))


@FEW
@given(st.sampled_from(["train/tokens/c/0", "train/tokens/zarr.json", "train/doc_starts/c/0",
                        "validation/doc_starts/zarr.json"]), corruptions)
def test_corrupted_store_arrays(store, name, corruption):
    data = corrupt((store / name).read_bytes(), corruption)
    succeeds_or_user_error(lambda: open_and_read(with_file(store, name, data)))


def test_a_store_whose_arrays_disagree_with_its_manifest_is_refused(store):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["sha256"] = "0" * 64
    changed = with_file(store, "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(USER_ERRORS, match=r"store/train: tokens differ from the manifest's checksum .*re-run the "
                                          r"`maxllama prepare` command"):
        open_store(str(changed))
    manifest["splits"]["train"]["documents"] += 1
    changed = with_file(store, "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(USER_ERRORS, match=r"doc_starts of shape \(\d+,\), the manifest says \d+ documents"):
        open_store(str(changed))


def test_an_interrupted_prepare_is_not_read_as_text(tmp_path):
    from maxllama.data.pipeline import build_datasets
    (tmp_path / "store" / ".parts").mkdir(parents=True)
    np.savez(tmp_path / "store" / ".parts" / "00000000.npz", train_tokens=np.arange(5))
    with pytest.raises(USER_ERRORS, match=r"store: an unfinished token store .*re-run the same `maxllama prepare"):
        build_datasets(small_config(f"data.sources=[{{path: {tmp_path / 'store'}}}]"))


# --- the command line: exit code 2 and one line -------------------------------------------------------------------

def assert_user_error(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maxllama: error:") and "Traceback" not in result.stderr, \
        result.stderr
    assert needle in lines[0], lines[0]


def test_cli_hf_import_of_a_truncated_safetensors(hf_dir, tmp_path):
    truncated = with_file(hf_dir, "model.safetensors", (hf_dir / "model.safetensors").read_bytes()[:-30])
    assert_user_error(cli("convert", "hf-import", str(truncated), str(tmp_path / "out")),
                      "model.safetensors: tensor ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("axis,needle", [
    ("[]", "grid.optim.lr: is an empty list, which gives no runs; list at least one value"),
    ("0.001", "grid.optim.lr: must be a list of the values to sweep, e.g. [0.001]"),
])
def test_cli_sweep_with_an_empty_or_scalar_axis(tmp_path, axis, needle):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 32\n")
    (tmp_path / "sweep.yaml").write_text(f"base: base.yaml\ngrid: {{optim.lr: {axis}}}\n")
    assert_user_error(cli("sweep", "run", str(tmp_path / "sweep.yaml"), "--dir", str(tmp_path / "out")), needle)
    assert not (tmp_path / "out").exists()


def test_cli_train_on_an_empty_config_file(tmp_path):
    (tmp_path / "config.yaml").write_text("# nothing here yet\n")
    assert_user_error(cli("train", str(tmp_path / "config.yaml"), f"run.dir={tmp_path}/run"),
                      "config.yaml: the config file is empty; write at least one setting")


def test_cli_train_on_a_store_without_manifest(tmp_path):
    (tmp_path / "store" / ".parts").mkdir(parents=True)
    np.savez(tmp_path / "store" / ".parts" / "00000000.npz", train_tokens=np.arange(5))
    result = cli("train", "experiments/tiny.yaml", f"data.sources=[{{path: {tmp_path / 'store'}}}]",
                 f"run.dir={tmp_path}/run", *SMALL_MODEL)
    assert_user_error(result, "an unfinished token store")
    assert "re-run the same `maxllama prepare" in result.stderr


def test_cli_local_sweep_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 32\n")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "grid": {"optim.lr": [1e-3, 3e-3]}, "executor": {"type": "local", "parallel": 2}}))
    out = tmp_path / "out"
    (out / "runs" / "lr0.003" / "checkpoints" / "4").mkdir(parents=True)  # as if stopped after saving step 4
    result = cli("sweep", "run", str(tmp_path / "sweep.yaml"), "--dir", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "lr0.001: would start" in result.stdout and "lr0.003: would resume from step 4" in result.stdout
    assert f"-m maxllama train {tmp_path / 'base.yaml'} optim.lr=0.001 run.dir={out}/runs/lr0.001" in result.stdout
    assert sorted(p.name for p in out.rglob("*")) == ["4", "checkpoints", "lr0.003", "runs"]  # nothing written
