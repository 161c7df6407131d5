"""One code path from one device to a mesh: the same losses under data, FSDP, tensor and expert parallelism.

Simulated devices (`--xla_force_host_platform_device_count=8`) live in a subprocess so they cannot leak into
the rest of the suite.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from maxllama.config import ConfigError, load_config
from maxllama.parallel.axes import LOGICAL_AXES
from maxllama.parallel.mesh import MeshError, resolve_axis_sizes
from maxllama.parallel.rules import DEFAULT_RULES, logical_to_spec

MESHES = {
    "dp=8": ["mesh.data=8", "mesh.fsdp=1"],
    "fsdp=8": ["mesh.fsdp=8"],
    "fsdp=4 x tensor=2": ["mesh.fsdp=4", "mesh.tensor=2"],
    "expert=4 x data=2": ["mesh.expert=4", "mesh.data=2", "mesh.fsdp=1"],
}

EQUIVALENCE = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, os.getcwd())
    import jax
    from tests.conftest import small_config
    from maxllama.train.loop import train
    from maxllama.train.metrics import read_metrics
    base = ["train.steps=10", "optim.warmup_steps=2", "train.batch_size=8", "train.eval_every=1000",
            "train.log_every=1", "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false"]
    meshes = json.loads(sys.argv[2])
    results = {}
    for name, overrides in [("1 device", None), *meshes.items()]:
        run_dir = os.path.join(sys.argv[1], str(len(results)))
        cfg = small_config(*base, f"run.dir={run_dir}", *(overrides or []))
        train(cfg, log=lambda *_: None, devices=jax.devices()[:1] if overrides is None else None)
        results[name] = [row["loss"] for row in read_metrics(run_dir)]
    print(json.dumps(results))
""")


@pytest.mark.slow  # over a minute each on 2 cores: `make test-slow`
def test_losses_match_the_one_device_run_on_every_mesh(tmp_path):
    result = subprocess.run([sys.executable, "-c", EQUIVALENCE, str(tmp_path), json.dumps(MESHES)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    reference = losses.pop("1 device")
    assert len(reference) == 10
    for name, values in losses.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(values, reference))
        print(f"\n{name:<20} max relative loss difference {worst:.1e}")
        assert worst <= 1e-5, name


def test_rules_table_covers_every_logical_axis_and_uses_a_mesh_axis_once():
    assert set(DEFAULT_RULES) == set(LOGICAL_AXES)
    mesh_axes = ("data", "fsdp", "tensor", "expert")
    # batch takes data+fsdp+expert; embed (fsdp) is then left whole in the same activation.
    spec = logical_to_spec(("batch", "seq", "embed"), DEFAULT_RULES, mesh_axes)
    assert tuple(spec) == (("data", "fsdp", "expert"), None, None)
    assert tuple(logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh_axes)) == ("fsdp", "tensor")


def test_invalid_meshes_are_clear_errors():
    assert resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 1, "expert": 1}, 8)["fsdp"] == 4
    with pytest.raises(MeshError, match="needs 6 devices but 8 are available"):
        resolve_axis_sizes({"data": 3, "fsdp": 2, "tensor": 1, "expert": 1}, 8)
    with pytest.raises(MeshError, match="do not divide the 8 available devices"):
        resolve_axis_sizes({"data": 3, "fsdp": -1, "tensor": 1, "expert": 1}, 8)
    with pytest.raises(ConfigError, match="mesh.rules.expert: names mesh axis 'experts'"):
        load_config(None, ["mesh.rules={expert: experts}"])


TWO_PROCESS_RUN = ["train.steps=10", "optim.warmup_steps=2", "train.batch_size=8", "train.eval_every=1000",
                   "train.log_every=1", "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
                   "checkpoint.every_steps=5"]


def _train_command(run_dir):
    from tests.conftest import SMALL_MODEL
    return [sys.executable, "-m", "maxllama", "train", *SMALL_MODEL, *TWO_PROCESS_RUN, f"run.dir={run_dir}"]


@pytest.mark.slow  # over a minute each on 2 cores: `make test-slow`
def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
    import os
    import signal
    import time
    from maxllama.train.metrics import read_metrics
    reference = subprocess.run(_train_command(tmp_path / "one"), capture_output=True, text=True, timeout=600,
                               env={**os.environ, "MAXLLAMA_CPU_DEVICES": "8"})
    assert reference.returncode == 0, reference.stderr[-2000:]
    launcher = ["launch/local/run.sh", "2", "4", "--", *_train_command(tmp_path / "two")]
    first = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "two" / "checkpoints" / "5").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)  # both processes save the step they agree on, then exit 75
    _, err = first.communicate(timeout=300)
    assert first.returncode in (0, 75), err[-2000:]
    second = subprocess.run(launcher, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one")}
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "two")}
    assert sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), step


def test_preflight_reports_per_device_memory_and_refuses_what_does_not_fit():
    import os
    env = {**os.environ, "MAXLLAMA_CPU_DEVICES": "8"}
    from tests.conftest import SMALL_MODEL
    args = [sys.executable, "-m", "maxllama", "preflight", *SMALL_MODEL, "train.batch_size=8"]
    one = subprocess.run([*args, "mesh.fsdp=8"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "(8 devices); per device: parameters" in one.stdout and "model FLOPs per step" in one.stdout
    small = subprocess.run([*args, "mesh.fsdp=8", "mesh.device_memory_gb=0.000001"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert small.returncode == 2 and "does not fit" in small.stderr and "mesh.device_memory_gb" in small.stderr


def test_preflight_shards_parameters_over_the_mesh():
    script = textwrap.dedent("""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, os.getcwd())
        import jax
        from tests.conftest import small_config
        from maxllama.train.preflight import preflight
        one = preflight(small_config("train.batch_size=8"), jax.devices()[:1])
        eight = preflight(small_config("train.batch_size=8", "mesh.fsdp=8"))
        print(one.params_gb / eight.params_gb, one.optimizer_gb / eight.optimizer_gb, eight.replicated)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    params_ratio, optimizer_ratio, replicated = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert float(params_ratio) > 6 and float(optimizer_ratio) > 6  # FSDP splits nearly everything 8 ways
    assert replicated == "[]"


def test_mesh_presets_and_dcn_split():
    script = textwrap.dedent("""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, os.getcwd())
        from maxllama.config import load_config
        from maxllama.parallel.mesh import MeshError, build_mesh
        for overrides in (["mesh.preset=dp"], ["mesh.preset=fsdp"], ["mesh.preset=fsdp_tp"], ["mesh.preset=ep"],
                          ["mesh.preset=fsdp_tp", "mesh.tensor=2"]):
            cfg, _ = load_config(None, overrides)
            print(" ".join(overrides), dict(build_mesh(cfg.mesh).shape))
        cfg, _ = load_config(None, ["mesh.fsdp=-1", "mesh.dcn_fsdp=2"])
        try:
            build_mesh(cfg.mesh)
        except MeshError as e:
            print("dcn:", e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "mesh.preset=dp {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}" in lines
    assert "mesh.preset=fsdp {'data': 1, 'fsdp': 8, 'tensor': 1, 'expert': 1}" in lines
    assert "mesh.preset=fsdp_tp {'data': 1, 'fsdp': 1, 'tensor': 8, 'expert': 1}" in lines  # tensor within a host
    assert "mesh.preset=ep {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 8}" in lines
    assert "mesh.preset=fsdp_tp mesh.tensor=2 {'data': 1, 'fsdp': 4, 'tensor': 2, 'expert': 1}" in lines
    assert any(line.startswith("dcn: mesh.dcn_*: cannot split") for line in lines)  # one host: nothing to split
