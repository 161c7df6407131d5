"""Fault tolerance: exact resume, kill -9, SIGTERM, resharding, corrupted checkpoints, non-finite steps.

Processes that must die run as subprocesses (`python -m maxllama train ...`); the small model trains a step
in tens of milliseconds, so a run of 30 steps is over in seconds.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from maxllama.checkpoint.manager import Checkpointer
from maxllama.train.metrics import read_metrics
from tests.conftest import SMALL_MODEL, compiled_train_step, small_config

STEPS = 30
RUN = [*SMALL_MODEL, f"train.steps={STEPS}", "optim.warmup_steps=5", "train.eval_every=1000", "train.log_every=1",
       "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every_steps=5"]


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "maxllama", "train", *RUN, f"run.dir={run_dir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir, *extra):
    process = start(run_dir, *extra)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out + err


def wait_for_step(run_dir, step, process):
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()[-3:]
                                 if line.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


def final_params(run_dir):
    checkpointer = Checkpointer(run_dir / "checkpoints")
    step = checkpointer.latest_step()
    import orbax.checkpoint as ocp
    params = checkpointer.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    checkpointer.close()
    return step, params


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(run_dir)
    return run_dir


def assert_same_run(run_dir, reference):
    ours, theirs = losses(run_dir), losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))  # every step logged once, none lost or repeated
    assert ours == theirs  # bitwise: the same floats, not merely close
    (step, params), (ref_step, ref_params) = final_params(run_dir), final_params(reference)
    assert step == ref_step == STEPS
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_resume_matches(uninterrupted, tmp_path):
    process = start(tmp_path)
    wait_for_step(tmp_path, 12, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err  # "preempted: requeue me"
    saved = Checkpointer(tmp_path / "checkpoints").latest_step()
    assert saved >= 12  # the step it was at when the signal came
    assert f"saved step {saved}" in err and "re-run the same command to resume" in err
    out = finish(tmp_path)
    assert f"resumed from {tmp_path / 'checkpoints'}/{saved}" in out
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_kill_9_loses_only_steps_since_the_last_checkpoint(uninterrupted, tmp_path):
    process = start(tmp_path)
    wait_for_step(tmp_path, random.Random(os.getpid()).randint(8, 24), process)
    while not (tmp_path / "checkpoints" / "5").exists():  # saves are asynchronous: let the first one land
        assert process.poll() is None
        time.sleep(0.01)
    process.kill()
    process.wait()
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    saved = checkpointer.latest_step()
    checkpointer.close()
    assert saved is not None and saved % 5 == 0
    out = finish(tmp_path)
    assert f"/checkpoints/{saved}" in out
    assert f"took over the lock of {tmp_path} from pid {process.pid}" in out  # its holder is gone
    assert_same_run(tmp_path, uninterrupted)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """Args of a run whose rows hold image-caption documents, and that run trained without interruption."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as captions:
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (14, 14 * (1 + i % 2), 3), dtype=np.uint8)).save(root / f"{i}.png")
            captions.write(json.dumps({"image": f"{i}.png", "text": f"picture {i}"}) + "\n")
    args = ["vision.enabled=true", "vision.d_model=16", "vision.n_heads=2", "vision.d_ff=64", "vision.n_layers=1",
            "vision.image_size=14", "vision.patch_size=7", "vision.projector_dim=16", "vision.max_tiles=2",
            "vision.tiles_per_row=3", "train.seq_len=64", "model.attn_chunk=64", "data.val_fraction=0.2",
            f"data.sources=[{{path: {root / 'captions.jsonl'}, format: image_caption}}]"]
    finish(root / "uninterrupted", *args)
    return args, root / "uninterrupted"


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_kill_9_with_images_resumes_bitwise(image_run, tmp_path):
    args, reference = image_run
    process = start(tmp_path, *args)
    wait_for_step(tmp_path, random.Random(os.getpid()).randint(8, 24), process)
    while not (tmp_path / "checkpoints" / "5").exists():
        assert process.poll() is None
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert f"resumed from {tmp_path / 'checkpoints'}/" in finish(tmp_path, *args)
    assert_same_run(tmp_path, reference)
    assert all(row["image_tiles"] > 0 for row in read_metrics(reference))  # the rows really held images


def copy_run(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def snapshot(run_dir):
    """Every file's bytes (the lock file aside: it is the one file any attempt may touch)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "run.lock"}


def refused(process_or_args, run_dir):
    result = subprocess.run([sys.executable, "-m", "maxllama", "train", *RUN, f"run.dir={run_dir}", *process_or_args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maxllama: error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_unreadable_checkpoints_fall_back_quietly_and_the_run_matches(uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path)
    (run_dir / "checkpoints" / "30" / "meta" / "metadata").unlink()  # the newest lacks its metadata
    for path in (run_dir / "checkpoints" / "25" / "params").rglob("*"):  # the next one has torn arrays
        if path.is_file() and path.stat().st_size > 0 and "manifest" not in path.name and path.suffix != ".json":
            path.write_bytes(b"\0" * 7)
    listing = subprocess.run([sys.executable, "-m", "maxllama", "checkpoint", "list", str(run_dir)],
                             capture_output=True, text=True)
    marked = [line.split()[0] for line in listing.stdout.splitlines() if "UNREADABLE" in line]
    assert listing.returncode == 0 and marked == ["25", "30"], listing.stdout
    process = start(run_dir)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 2 and "/30 cannot be read" in warnings[0] and "/25 cannot be restored" in warnings[1]
    assert f"resumed from {run_dir / 'checkpoints'}/20" in out
    assert "Traceback" not in out + err and "asyncio" not in out + err and err.strip() == ""
    # Set aside, not deleted; saved again by the resumed run, which is the uninterrupted one bit for bit.
    assert (run_dir / "checkpoints" / "30.unreadable").is_dir() and (run_dir / "checkpoints" / "25.unreadable").is_dir()
    assert_same_run(run_dir, uninterrupted)


def test_an_incompatible_config_is_refused_and_the_run_directory_left_alone(uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path)
    before = snapshot(run_dir)
    message = refused(["model.d_model=64", "seed=1", "train.batch_size=8", "train.steps=40"], run_dir)
    for change in ("model.d_model: 32 -> 64", "seed: 0 -> 1", "train.batch_size: 4 -> 8"):
        assert change in message
    assert "train.steps" not in message and "init_from=" in message  # a safe change is not refused
    assert snapshot(run_dir) == before
    # With no checkpoint the run directory's config.yaml is what a new config is compared with.
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    assert "model.n_layers: 4 -> 8" in refused(["model.n_layers=8"], run_dir)
    assert snapshot(run_dir) == before


def test_safe_changes_resume_and_are_recorded_in_the_config_history(uninterrupted, tmp_path):
    from maxllama.train.resume import read_config_history
    run_dir = copy_run(uninterrupted, tmp_path)
    out = finish(run_dir, "train.steps=33", "optim.lr=1e-3")
    assert "changed since the checkpoint: optim.lr: 0.003 -> 0.001; train.steps: 30 -> 33" in out
    history = read_config_history(run_dir)
    assert [(row["step"], row["event"]) for row in history] == [(0, "start"), (30, "resume")]
    assert history[1]["changes"] == {"optim.lr": [0.003, 0.001], "train.steps": [30, 33]}
    assert sorted(losses(run_dir)) == list(range(1, 34))


def test_a_changed_tokenizer_is_refused_even_under_the_same_name(tmp_path):
    from maxllama.config import dump_config
    from maxllama.train.resume import IncompatibleConfig, resume_changes
    cfg = small_config()
    saved = dump_config(cfg)
    assert resume_changes(saved, "abc123", cfg, "abc123", tmp_path, "its checkpoints") == {}
    with pytest.raises(IncompatibleConfig, match=r"data.tokenizer \(its contents\): fingerprint abc123 -> fingerprint def456"):
        resume_changes(saved, "abc123", cfg, "def456", tmp_path, "its checkpoints")


def test_no_restorable_checkpoint_is_refused_rather_than_restarted(uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path)
    for step in ("20", "25", "30"):
        (run_dir / "checkpoints" / step / "meta" / "metadata").unlink()
    before = snapshot(run_dir)
    assert "none of the checkpoints" in refused([], run_dir)
    assert snapshot(run_dir) == before


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_a_second_process_on_a_run_directory_is_refused(uninterrupted, tmp_path):
    first = start(tmp_path)
    wait_for_step(tmp_path, 3, first)
    first.send_signal(signal.SIGSTOP)  # holds the first mid-run, however slow the second is to start
    try:
        message = refused([], tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"is in use by pid {first.pid} on host" in message
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert_same_run(tmp_path, uninterrupted)  # the refused process wrote nothing into the first's run


def can_mount_tmpfs(path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_a_full_disk_ends_the_run_with_one_line_and_the_resume_matches(uninterrupted, tmp_path):
    mount = tmp_path / "small"
    if not can_mount_tmpfs(mount):
        pytest.skip("needs a tmpfs mount (root)")
    try:
        run_dir = mount / "run"
        process = start(run_dir, "logging.tensorboard=false")
        wait_for_step(run_dir, 12, process)
        with open(mount / "filler", "wb") as filler:  # the disk fills up under the running job
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
        _, err = process.communicate(timeout=600)
        lines = err.strip().splitlines()
        assert process.returncode == 74, err
        assert len(lines) == 1 and lines[0].startswith("maxllama: error: cannot ") and "No space left" in lines[0]
        (mount / "filler").unlink()
        finish(run_dir, "logging.tensorboard=false")
        assert_same_run(run_dir, uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_nonfinite_updates_are_skipped_or_stop_the_run(tmp_path):
    out = finish(tmp_path / "skip", "optim.lr=1e30", "train.grad_clip=null")
    rows = read_metrics(tmp_path / "skip")
    assert sum(r["nonfinite"] for r in rows) > 0 and "skipped the non-finite update" in out
    _, params = final_params(tmp_path / "skip")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))  # never a non-finite state saved
    process = start(tmp_path / "stop", "optim.lr=1e30", "train.grad_clip=null", "train.nonfinite=stop")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 3 and "non-finite loss or gradient at step" in err and "Traceback" not in err


RESHARD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, os.getcwd())
    from tests.conftest import small_config
    from maxllama.checkpoint.manager import Checkpointer
    from maxllama.model.build import define_model, init_params
    from maxllama.parallel.mesh import build_mesh
    from maxllama.parallel.rules import LogicalSharding
    from maxllama.train.optimizer import build_optimizer
    from maxllama.train.schedules import make_schedule
    from maxllama.train.step import init_state

    def state_on(mesh_overrides, devices):
        cfg = small_config(*mesh_overrides)
        sharding = LogicalSharding(build_mesh(cfg.mesh, devices))
        model = define_model(cfg, sharding)
        optimizer = build_optimizer(cfg, model.rules, make_schedule(cfg.optim, 10))
        return init_state(init_params(cfg, model, sharding), optimizer), sharding

    saved, sharding = state_on(["mesh.fsdp=8"], jax.devices())
    embed = saved.params["embed"]
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape[1] == 32 // 8
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, saved, wait=True)
    for overrides, devices in [(["mesh.fsdp=-1"], jax.devices()[:1]), (["mesh.data=2", "mesh.fsdp=4"], jax.devices())]:
        target, _ = state_on(overrides, devices)
        restored = checkpointer.restore(1, target)
        for a, b, t in zip(*(jax.tree.leaves((s.params, s.opt_state)) for s in (restored, saved, target))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding == t.sharding  # laid out for the new mesh
    print("resharded", [d.id for d in restored.params["embed"].sharding.device_set])
""")


def test_checkpoint_saved_on_8_devices_restores_on_1_and_on_2x4(tmp_path):
    result = subprocess.run([sys.executable, "-c", RESHARD, str(tmp_path / "ckpt")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "resharded" in result.stdout


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    cfg = small_config("checkpoint.keep=2", "checkpoint.keep_every=10")
    from maxllama.base.state import TrainState
    from maxllama.model.build import define_model, init_params
    from maxllama.parallel.mesh import build_mesh
    from maxllama.parallel.rules import LogicalSharding
    sharding = LogicalSharding(build_mesh(cfg.mesh))
    params = init_params(cfg, define_model(cfg, sharding), sharding)
    checkpointer = Checkpointer(tmp_path, cfg.checkpoint)
    for step in range(5, 35, 5):
        checkpointer.save(step, TrainState(step, params, params), wait=True)
    assert checkpointer.steps() == [10, 20, 25, 30]
    checkpointer.close()


def test_checkpoint_list_and_inspect_commands(uninterrupted):
    listing = subprocess.run([sys.executable, "-m", "maxllama", "checkpoint", "list", str(uninterrupted)],
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    steps = [int(line.split()[0]) for line in listing.stdout.splitlines()[1:] if line.split()[0].isdigit()]
    assert steps == [20, 25, 30]  # checkpoint.keep = 3
    assert "meta, opt_state, params" in listing.stdout
    inspected = subprocess.run([sys.executable, "-m", "maxllama", "checkpoint", "inspect",  # a relative path, too
                                f"{uninterrupted.name}/checkpoints/25"], capture_output=True, text=True,
                               cwd=uninterrupted.parent)
    assert inspected.returncode == 0, inspected.stderr
    out = inspected.stdout
    assert "step 25" in out and "d_model 32, 4 layers" in out and "data position: batch 25" in out
    assert "lm_head" in out and "(32, 272)" in out and "params: 25 arrays, 62,496 values" in out
    missing = subprocess.run([sys.executable, "-m", "maxllama", "checkpoint", "list", "no/such/run"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no/such/run/checkpoints" in missing.stderr


def test_save_policy_by_steps_and_by_minutes(tmp_path, monkeypatch):
    from maxllama.checkpoint import manager
    clock = [1000.0]
    monkeypatch.setattr(manager.time, "monotonic", lambda: clock[0])
    by_time = Checkpointer(tmp_path / "time", small_config("checkpoint.every_minutes=2").checkpoint)
    assert not by_time.due(1)
    clock[0] += 119
    assert not by_time.due(2)
    clock[0] += 2
    assert by_time.due(3)
    by_steps = Checkpointer(tmp_path / "steps", small_config("checkpoint.every_steps=5").checkpoint)
    assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
    by_time.close()
    by_steps.close()


def test_init_from_starts_from_another_runs_parameters_only(uninterrupted, tmp_path):
    out = finish(tmp_path, f"init_from={uninterrupted}", "train.steps=5")
    assert f"initialised from {uninterrupted} (step 30); optimizer and data start fresh" in out
    first = losses(tmp_path)[1]
    assert abs(first - losses(uninterrupted)[STEPS]) < 0.5 < losses(uninterrupted)[1] - first


def test_async_save_is_not_corrupted_by_the_donated_steps_after_it(tmp_path):
    from maxllama.data.pipeline import build_datasets
    cfg = small_config("model.d_model=256", "model.d_ff=1024", "model.d_ff_expert=512")  # ~10 MB of state
    state, train_step, batch_sharding = compiled_train_step(cfg)
    batches = build_datasets(cfg).train
    state, _ = train_step(state, jax.device_put(batches[0], batch_sharding))
    expected = jax.device_get(state.params)
    checkpointer = Checkpointer(tmp_path, cfg.checkpoint)
    checkpointer.save(1, state)  # returns while the write goes on
    for step in range(1, 4):  # each step donates (reuses) the buffers of the state being written
        state, _ = train_step(state, jax.device_put(batches[step], batch_sharding))
    jax.block_until_ready(state)
    checkpointer.manager.wait_until_finished()
    restored = checkpointer.restore_params(1, state.params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)
    checkpointer.close()
