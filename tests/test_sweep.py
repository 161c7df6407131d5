import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from maxllama.config import ConfigError
from maxllama.sweep.report import report
from maxllama.sweep.results import collect, fit_optimum
from maxllama.sweep.spec import expand, load_sweep, run_name
from tests.conftest import SMALL_MODEL


def write_sweep(tmp_path, text, name="sweep.yaml"):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 32\n")
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_zip_random_and_seeds_expand_in_order():
    spec = {"grid": {"a": [1, 2], "b": ["x", "y", "z"]}, "zip": {"c": [1, 2], "d": [3, 4]}, "seeds": [0, 1]}
    runs = expand(spec)
    assert len(runs) == 2 * 3 * 2 * 2
    assert runs[0] == {"a": 1, "b": "x", "c": 1, "d": 3, "seed": 0}
    assert runs[-1] == {"a": 2, "b": "z", "c": 2, "d": 4, "seed": 1}
    random_spec = {"random": {"n": 50, "seed": 3, "params": {"lr": {"log_uniform": [1e-4, 1e-2]},
                                                             "b2": {"choice": [0.95, 0.99]}, "w": {"uniform": [0, 1]}}}}
    first, again = expand(random_spec), expand(random_spec)
    assert first == again and len(first) == 50  # seeded
    assert all(1e-4 <= r["lr"] <= 1e-2 and r["b2"] in (0.95, 0.99) and 0 <= r["w"] <= 1 for r in first)
    logs = np.log10([r["lr"] for r in first])
    assert logs.min() < -3.5 and logs.max() > -2.5  # spread over the decades, not clustered at the top
    assert expand({**random_spec, "random": {**random_spec["random"], "seed": 4}}) != first
    with pytest.raises(ConfigError, match="equal lengths"):
        expand({"zip": {"c": [1, 2], "d": [3]}})


def test_names_budget_and_validation(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, """\
        base: base.yaml
        name: "lr{optim.lr}_s{seed}"
        grid: {optim.lr: [1.0e-3, 3.0e-3, 1.0e-2]}
        seeds: [0, 1]
        budget: 4
        overrides: {train.steps: 10, optim.warmup_steps: 2}
        """))
    assert [r.name for r in sweep.runs] == ["lr0.001_s0", "lr0.001_s1", "lr0.003_s0", "lr0.003_s1"]
    assert sweep.swept == ["optim.lr", "seed"] and sweep.runs[0].overrides["train.steps"] == 10
    assert run_name(None, {"model.d_model": 64, "optim.lr": 0.003}) == "d_model64_lr0.003"
    with pytest.raises(ConfigError, match=r"unknown key 'model.d_modl'; did you mean model.d_model"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\ngrid: {model.d_modl: [1, 2]}\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="optim.lr: must be a valid number, got 'fast'"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\ngrid: {optim.lr: [fast]}\n", "bad2.yaml"))
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\ngird: {optim.lr: [1]}\n", "bad3.yaml"))
    with pytest.raises(ConfigError, match="two runs would both be called"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\nname: same\ngrid: {optim.lr: [0.1, 0.2]}\n", "bad4.yaml"))


def test_a_zip_kept_in_its_own_file_expands_as_if_written_inline(tmp_path):
    (tmp_path / "ladder.yaml").write_text("model.d_model: [32, 64]\nmodel.d_ff: [128, 256]\n")
    inline = load_sweep(write_sweep(tmp_path, "base: base.yaml\nzip: {model.d_model: [32, 64], model.d_ff: [128, 256]}\n"
                                              "grid: {optim.lr: [1.0e-3, 2.0e-3]}\n"))
    shared = load_sweep(write_sweep(tmp_path, "base: base.yaml\nzip: ladder.yaml\ngrid: {optim.lr: [1.0e-3, 2.0e-3]}\n",
                                    "shared.yaml"))
    assert shared.runs == inline.runs and len(shared.runs) == 4
    with pytest.raises(ConfigError, match=r"zip: file not found: .*nowhere.yaml"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\nzip: nowhere.yaml\n", "bad.yaml"))
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"grid: .*list.yaml: top level must be a mapping"):
        load_sweep(write_sweep(tmp_path, "base: base.yaml\ngrid: list.yaml\n", "bad2.yaml"))


def test_fitted_optimum_of_a_parabola_in_log2_space():
    xs = [2.0 ** e for e in range(-12, -4)]
    ys = [(math.log2(x) + 8.3) ** 2 + 1.0 for x in xs]
    optimum = fit_optimum(xs, ys)
    assert optimum.fitted and not optimum.at_edge
    assert math.log2(optimum.x) == pytest.approx(-8.3, abs=1e-6) and optimum.value == pytest.approx(1.0)
    edge = fit_optimum(xs, [-math.log2(x) for x in xs])  # keeps falling: the optimum is beyond the range
    assert edge.at_edge


@pytest.fixture(scope="module")
def ran_sweep(tmp_path_factory):
    """Three learning rates x two corpora, one of which does not exist: three runs finish, three fail."""
    import yaml

    from maxllama.config.loader import parse_scalar
    tmp_path = tmp_path_factory.mktemp("sweep")
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 32\n")
    overrides = {o.split("=")[0]: parse_scalar(o.split("=")[1]) for o in SMALL_MODEL}
    overrides |= {"train.steps": 6, "train.eval_every": 6, "train.eval_batches": 1, "optim.warmup_steps": 1,
                  "checkpoint.every_steps": 3, "logging.tensorboard": False}
    spec = {"base": "base.yaml", "name": "lr{optim.lr}_{data.sources}", "overrides": overrides,
            "grid": {"optim.lr": [1e-3, 1e-2, 3e-2],
                     "data.sources": [[{"path": "stdlib"}], [{"path": "/no/such/corpus"}]]},
            "executor": {"type": "local", "parallel": 2}}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "maxllama", "sweep", "run", str(sweep_file), "--dir", str(out),
                             "--quiet"], capture_output=True, text=True, timeout=900)
    return sweep_file, out, result


@pytest.mark.slow  # the six-run sweep they share takes over a minute on 2 cores: make test-slow
def test_local_sweep_records_failures_and_goes_on(ran_sweep):
    _, out, result = ran_sweep
    assert result.returncode == 1  # some runs failed
    manifest = json.loads((out / "sweep.json").read_text())["runs"]
    statuses = sorted(run["status"] for run in manifest.values())
    assert statuses == ["done"] * 3 + ["failed"] * 3
    failed = [run for run in manifest.values() if run["status"] == "failed"]
    assert all(run["exit_code"] == 2 and "/no/such/corpus does not exist" in run["error"] for run in failed)


@pytest.mark.slow  # the six-run sweep they share takes over a minute on 2 cores: make test-slow
def test_report_numbers_equal_the_runs_metrics(ran_sweep):
    _, out, _ = ran_sweep
    text, csv_path, png, optima = report(out, "optim.lr", None)
    rows, _ = collect(out)
    done = [r for r in rows if r["status"] == "done"]
    for row in done:
        metrics = [json.loads(line) for line in (out / "runs" / row["name"] / "metrics.jsonl").read_text().splitlines()]
        assert row["final_val_loss"] == [m for m in metrics if "val_loss" in m][-1]["val_loss"]
        assert row["final_loss"] == metrics[-1]["loss"] and row["steps"] == 6
        assert f"{row['final_val_loss']:.4g}" in text
    assert csv_path.read_text().count("\n") == len(rows) + 1
    assert png.exists() and png.stat().st_size > 5000
    assert len(optima) == 1  # one curve: the runs on the missing corpus have no metric
    (optimum,) = optima.values()
    assert 1e-3 * 0.999 <= optimum.x <= 3e-2 * 1.001


def _saved_params(run_dir, step):
    import orbax.checkpoint as ocp

    from maxllama.checkpoint.manager import Checkpointer
    checkpointer = Checkpointer(run_dir / "checkpoints")
    params = checkpointer.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    checkpointer.close()
    return params


@pytest.mark.slow  # the six-run sweep they share takes over a minute on 2 cores: make test-slow
def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(ran_sweep):
    import jax

    from maxllama.train.resume import read_config_history
    sweep_file, out, _ = ran_sweep
    sweep = load_sweep(sweep_file)
    done = [r for r in sweep.runs if "stdlib" in r.name]
    untouched, partial = out / "runs" / done[0].name, out / "runs" / done[1].name
    stamp = (untouched / "metrics.jsonl").stat().st_mtime
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    uninterrupted = [json.loads(line)["loss"] for line in lines], _saved_params(partial, 6)
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # as if it died after step 3...
    shutil.rmtree(partial / "checkpoints" / "6")  # ...having saved step 3 only
    result = subprocess.run([sys.executable, "-m", "maxllama", "sweep", "run", str(sweep_file), "--dir", str(out),
                             "--quiet"], capture_output=True, text=True, timeout=900)
    assert "already finished" in result.stdout
    assert (untouched / "metrics.jsonl").stat().st_mtime == stamp  # finished: not run again
    assert read_config_history(partial)[-1]["event"] == "resume" and read_config_history(partial)[-1]["step"] == 3
    rows = (partial / "metrics.jsonl").read_text().splitlines()
    assert rows[:3] == lines[:3]  # steps 1-3 kept as logged (their timings too), not trained again
    assert [json.loads(line)["step"] for line in rows] == list(range(1, 7))
    # Resumed at step 3, the run ends where it ended uninterrupted: the same losses and parameters, bitwise.
    assert [json.loads(line)["loss"] for line in rows] == uninterrupted[0]
    for a, b in zip(jax.tree.leaves(_saved_params(partial, 6)), jax.tree.leaves(uninterrupted[1]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # the six-run sweep they share takes over a minute on 2 cores: make test-slow
def test_a_run_trained_with_other_settings_is_neither_counted_nor_resumed(ran_sweep):
    import yaml

    from maxllama.sweep.executors import finished
    sweep_file, out, _ = ran_sweep
    spec = yaml.safe_load(sweep_file.read_text())
    spec["overrides"]["optim.weight_decay"] = 0.5  # the sweep file changed after its runs were trained
    changed = sweep_file.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(changed)
    done = next(r for r in sweep.runs if "stdlib" in r.name)
    with pytest.raises(ConfigError, match=r"optim.weight_decay: .* -> 0.5.*new --dir"):
        finished(sweep, out, done)
    original = load_sweep(sweep_file)
    assert finished(original, out, next(r for r in original.runs if r.name == done.name))  # unchanged: counted
    moved = out.with_name("moved")
    shutil.copytree(out, moved)
    assert finished(original, moved, next(r for r in original.runs if r.name == done.name))  # a moved sweep too


def test_slurm_dry_run_prints_a_job_array(tmp_path):
    sweep_file = write_sweep(tmp_path, """\
        base: base.yaml
        grid: {optim.lr: [1.0e-3, 3.0e-3, 1.0e-2]}
        overrides: {train.steps: 100}
        executor: {type: slurm, partition: gpu, gpus_per_run: 8, time: "02:00:00", parallel: 2}
        """)
    result = subprocess.run([sys.executable, "-m", "maxllama", "sweep", "run", str(sweep_file), "--dir",
                             str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus=8" in script and "#SBATCH --time=02:00:00" in script
    assert f"sweep run-one {sweep_file}" in script and '--index "$SLURM_ARRAY_TASK_ID"' in script
    assert (tmp_path / "out" / "sweep.sbatch").read_text().strip() == script.strip()


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_a_signalled_sweep_stops_its_runs_as_preemption_and_starts_no_more(tmp_path):
    """SIGTERM to `sweep run` (a scheduler's kill, or Ctrl-C passed on): each running run saves its step and
    exits, the runs not yet started stay pending, and no train process outlives the sweep."""
    import signal
    import time

    import yaml

    from maxllama.config.loader import parse_scalar
    overrides = {o.split("=")[0]: parse_scalar(o.split("=")[1]) for o in SMALL_MODEL}
    overrides |= {"train.steps": 100000, "train.log_every": 1, "train.eval_every": 100000, "checkpoint.every_steps": 100000,
                  "logging.tensorboard": False}
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 32\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": "base.yaml", "name": "lr{optim.lr}", "overrides": overrides,
                                          "grid": {"optim.lr": [1e-3, 2e-3, 3e-3]},
                                          "executor": {"type": "local", "parallel": 2}}))
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "maxllama", "sweep", "run", str(sweep_file), "--dir", str(out),
                              "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [out / "runs" / name for name in ("lr0.001", "lr0.002", "lr0.003")]
    deadline = time.time() + 600
    while not all((r / "metrics.jsonl").exists() and (r / "metrics.jsonl").stat().st_size for r in runs[:2]):
        assert sweep.poll() is None and time.time() < deadline, sweep.communicate()[0]
        time.sleep(0.5)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=300)[0]
    assert sweep.returncode == 75, output
    assert "Resume with: maxllama sweep run" in output
    manifest = json.loads((out / "sweep.json").read_text())["runs"]
    assert [manifest[r.name]["status"] for r in runs] == ["stopped", "stopped", "pending"]
    assert not runs[2].exists()
    for run in runs[:2]:
        assert "saved step" in (run / "train.log").read_text()
        assert list((run / "checkpoints").iterdir())
    from pathlib import Path

    def cmdline(path):
        try:
            return path.read_bytes()
        except OSError:  # the process ended meanwhile
            return b""
    survivors = [p.parent.name for p in Path("/proc").glob("[0-9]*/cmdline") if str(out).encode() in cmdline(p)]
    assert not survivors, f"train processes outlived the sweep: {survivors}"


def test_every_shipped_sweep_expands_to_valid_runs():
    """A typo in a sweep file under experiments/ would otherwise surface hours into `make metap-all`."""
    from pathlib import Path

    import yaml
    sweeps = [p for p in sorted(Path("experiments").rglob("*.yaml"))
              if isinstance(doc := yaml.safe_load(p.read_text()), dict) and "base" in doc and doc.keys() & {"grid", "zip", "random"}]
    assert len(sweeps) >= 15
    for path in sweeps:
        try:
            assert load_sweep(path).runs, path  # load_sweep validates every run's config
        except ConfigError as e:  # the end-to-end sweeps start from what `metap transfer` writes first
            assert "metap.from: file not found: runs/metap/" in str(e), e
