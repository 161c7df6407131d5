"""The command line as a user meets it: exit codes, one-line errors, --help everywhere."""

import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "maxllama", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args,needle", [
    (["train", "experiments/tiny.yaml", "model.d_modle=64"], "unknown key 'model.d_modle'; did you mean model.d_model"),
    (["train", "experiments/tiny.yaml", "train.steps=many"], "train.steps: must be a valid integer, got 'many'"),
    (["train", "experiments/missing.yaml"], "config file not found: experiments/missing.yaml"),
    (["train", "experiments/tiny.yaml", "model.n_kv_heads=3"], "model.n_kv_heads: n_heads (4) must be a multiple"),
    (["train", "experiments/tiny.yaml", "mesh.fsdp=4"], "needs 4 devices but 1 are available"),
    (["train", "experiments/tiny.yaml", "model.vocab_size=100", "train.steps=1", "optim.warmup_steps=0"],
     "model.vocab_size: 100 is smaller than the tokenizer's 265 tokens"),
    (["config", "show", "experiments/tiny.yaml", "optim.schedule=linear"], "optim.schedule: must be one of"),
    (["convert", "hf-import", "no/such/dir", "out"], "no/such/dir/config.json: not found"),
    (["prepare", "no/such/file.txt", "--out", "unused"], "data.sources[0].path: no/such/file.txt does not exist"),
    (["train", "experiments/tiny.yaml", "data.sources=[{path: no/such/dir}]"],
     "data.sources[0].path: no/such/dir does not exist"),
    (["convert", "hf-export", "no/such/run", "out"], "no/such/run: not a model directory"),
])
def test_user_errors_exit_2_with_one_line(args, needle, tmp_path):
    result = run(*args, f"run.dir={tmp_path}/run") if args[0] == "train" else run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert needle in lines[0]


def test_help_on_every_command():
    for args in [[], ["train"], ["config"], ["config", "show"], ["convert"], ["convert", "hf-import"],
                 ["convert", "hf-export"], ["sample"], ["score"], ["prepare"], ["preflight"], ["checkpoint"],
                 ["checkpoint", "list"], ["checkpoint", "inspect"], ["sweep"], ["sweep", "plan"], ["sweep", "run"],
                 ["sweep", "run-one"], ["sweep", "report"], ["metap"], ["metap", "show"], ["metap", "coord-check"],
                 ["metap", "transfer"], ["metap", "drift"]]:
        result = run(*args, "--help")
        assert result.returncode == 0 and "usage: maxllama" in result.stdout


def test_config_show_prints_origins_and_published_sizes():
    result = run("config", "show", "experiments/llama4_maverick.yaml", "train.steps=5000")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("n_experts: 128") and "llama4_maverick.yaml:" in line for line in lines)
    assert any(line.strip().startswith("d_model: 5120") and "llama4_scout.yaml:" in line for line in lines)
    assert any(line.strip().startswith("steps: 5000") and line.endswith("# override") for line in lines)
    assert "401.6B total" in result.stdout and "17.2B active" in result.stdout
