import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllama.config.schema import OptimConfig
from maxllama.model.build import define_model
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.train.flops import train_flops_per_token
from maxllama.train.metrics import read_metrics
from maxllama.train.optimizer import build_optimizer
from maxllama.train.schedules import make_schedule
from tests.conftest import compiled_train_step, small_config

TRAIN_ARGS = ["optim.warmup_steps=5", "optim.lr=1e-2", "train.eval_every=10", "train.log_every=5",
              "train.eval_batches=2", "logging.progress=false", "checkpoint.every_steps=10"]

# Training FLOPs per token of SMALL_MODEL at seq_len 32, by hand (the MFU convention: 6 x the parameters a
# token's matmuls use, plus attention's scores and weighted sum over the keys each query sees).
#   N = 4 layers x q, k, v, o 32 x (32 + 16 + 16 + 32) = 12,288
#     + 2 dense layers x 3 x 32 x 48 = 9,216
#     + 2 MoE layers x (router 32 x 4 + top-2 experts 2 x 3 x 32 x 24 + shared 3 x 32 x 24) = 14,080
#     + unembedding 32 x 272 = 8,704                                  (the embedding lookup is no matmul)
#   6N = 265,728
#   attention: 3 (forward + backward) x 2 x 2 x (4 heads x 8) per key = 384 per key, over the mean keys per
#   query: 4.5 in the chunked layers 0 and 2 (chunk 8), 16.5 in the global layers 1 and 3: 384 x 42 = 16,128
SMALL_MODEL_TRAIN_FLOPS_PER_TOKEN = 265_728 + 16_128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 steps, then the same command with steps=30: the second run resumes at step 20."""
    from maxllama.train import loop
    run_dir = tmp_path_factory.mktemp("run")
    logs, peaks = [], []
    real_peak = loop.peak_flops_per_device
    with pytest.MonkeyPatch.context() as patch:  # the real peak, recorded for the MFU check
        patch.setattr(loop, "peak_flops_per_device", lambda *a: peaks.append(real_peak(*a)) or peaks[-1])
        first = loop.train(small_config(*TRAIN_ARGS, "train.steps=20", f"run.dir={run_dir}"), log=logs.append)
        second = loop.train(small_config(*TRAIN_ARGS, "train.steps=30", f"run.dir={run_dir}"), log=logs.append)
        finished = loop.train(small_config(*TRAIN_ARGS, "train.steps=30", f"run.dir={run_dir}"), log=logs.append)
    assert finished.val_loss == pytest.approx(second.val_loss, rel=1e-5)  # a finished run only re-evaluates
    first.peak, second.peak = peaks[0][0], peaks[1][0]
    return run_dir, first, second, logs


def test_loss_decreases_over_20_steps(trained):
    run_dir, first, _, _ = trained
    rows = [r for r in read_metrics(run_dir) if r["step"] <= 20]
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert val[20] < val[10] and first.val_loss == val[20]


def test_metrics_rows_follow_the_run_directory_contract(trained):
    run_dir, _, second, _ = trained
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))  # one row per step, none lost or repeated on resume
    for row in rows:
        for key in ["loss", "learning_rate", "grad_norm", "clip_norm", "tokens_per_s", "mfu", "load_balance_loss",
                    "router_z_loss", "expert_load_max", "documents", "padding_fraction", "data_wait_s"]:
            assert np.isfinite(row[key]), key
        assert row["clip_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)  # standard parametrization: weights 1
    assert {r["step"] for r in rows if "val_loss" in r} == {10, 20, 30}
    assert (run_dir / "config.yaml").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert second.final_step == 30


def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak(trained):
    run_dir, first, second, _ = trained
    assert train_flops_per_token(small_config().model, 32) == SMALL_MODEL_TRAIN_FLOPS_PER_TOKEN
    rows = read_metrics(run_dir)
    for row in rows:
        peak = first.peak if row["step"] <= 20 else second.peak  # one device
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * SMALL_MODEL_TRAIN_FLOPS_PER_TOKEN / peak, rel=1e-12)
    for summary in (first, second):
        assert 0 < summary.mfu == pytest.approx(summary.tokens_per_s * SMALL_MODEL_TRAIN_FLOPS_PER_TOKEN / summary.peak,
                                                rel=1e-12)


def test_rerunning_the_command_resumes(trained):
    run_dir, _, _, logs = trained
    assert any("resumed from" in line and line.endswith("/20") for line in logs)
    assert any("already reached train.steps=30" in line for line in logs)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 30
    from maxllama.checkpoint.manager import Checkpointer
    checkpointer = Checkpointer(run_dir / "checkpoints")
    # The data position is the step, so the checkpoint keeps no second copy of it; resuming from it is bitwise
    # (test_checkpoint.py: test_sigterm_saves_the_current_step_and_resume_matches, and the kill -9 test).
    meta = checkpointer.meta(30)
    assert "data" not in meta and set(meta) == {"config", "tokenizer", "seed", "metap"}
    assert meta["seed"] == 0 and "n_layers: 4" in meta["config"]
    assert meta["metap"]["lm_head"] == {"role": "readout", "ratio": 1.0, "init_std": 0.02, "lr_multiplier": 1.0,
                                        "weight_decay": 0.1, "adam_eps": 1e-8, "clip_weight": 1.0, "peak_lr": 1e-2}
    assert (run_dir / "metap.yaml").exists()
    checkpointer.close()


def test_learning_rate_in_metrics_follows_schedule(trained):
    run_dir, *_ = trained
    schedule = make_schedule(OptimConfig(lr=1e-2, warmup_steps=5), 20)
    rows = read_metrics(run_dir)[:20]
    np.testing.assert_allclose([r["learning_rate"] for r in rows], [float(schedule(s)) for s in range(20)],
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules(kind):
    o = OptimConfig(lr=1.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.1, decay_fraction=0.2)
    s = make_schedule(o, 100)
    lr = np.array([float(s(i)) for i in range(101)])
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup to the peak
    assert lr[10] == pytest.approx(1.0)
    if kind == "cosine":
        assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90)), rel=1e-5)
        assert lr[100] == pytest.approx(0.1)
    elif kind == "wsd":
        np.testing.assert_allclose(lr[10:81], 1.0)  # stable until the last 20% of steps
        assert lr[90] == pytest.approx(0.55) and lr[100] == pytest.approx(0.1)
    else:
        np.testing.assert_allclose(lr[10:], 1.0)


def test_weight_decay_skips_norm_gains():
    cfg = small_config("optim.weight_decay=0.5", "train.grad_clip=null")
    model = define_model(cfg, LogicalSharding(build_mesh(cfg.mesh)))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), model.abstract_params)
    schedule = make_schedule(OptimConfig(lr=0.1, warmup_steps=0, schedule="constant"), 10)
    opt = build_optimizer(cfg, model.rules, schedule)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    assert float(updates["final_norm"]["weight"][0]) == 0.0
    assert float(updates["lm_head"][0, 0]) == pytest.approx(-0.1 * 0.5)  # -lr * wd * w


def test_a_nonfinite_step_leaves_the_state_bitwise_as_it_was():
    cfg = small_config("train.grad_clip=null")
    state, train_step, batch_sharding = compiled_train_step(cfg)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    batch = {"inputs": np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
             "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    poisoned = {**batch, "loss_mask": batch["loss_mask"].copy()}
    poisoned["loss_mask"][1, 5] = np.nan  # the loss, and every gradient, become NaN

    def run(state, batch):  # the step donates (overwrites) its input state: keep a host copy of it
        before = jax.device_get(state)
        after, metrics = train_step(state, jax.device_put(batch, batch_sharding))
        return before, after, jax.device_get(metrics)

    before, state, metrics = run(state, batch)
    assert metrics["nonfinite"] == 0 and int(state.step) == 1
    # A finite step changes every parameter and every moment (and the step and Adam's count)...
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state))))
    _, state, _ = run(state, batch)  # (a second step: Adam's moments are then neither zero nor their first value)
    before, after, metrics = run(state, poisoned)
    after = jax.device_get(after)
    assert metrics["nonfinite"] == 1 and not np.isfinite(metrics["loss"])
    assert int(after.step) == int(before.step) + 1  # ...a skipped one moves the step (and the data position) on...
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(a, b)  # ...but leaves the parameters and the optimizer state as they were


def test_resume_policies_never_and_require(trained, tmp_path):
    from maxllama.checkpoint.manager import Checkpointer, ResumeError, check_resume_policy
    run_dir, *_ = trained
    with_checkpoints, empty = Checkpointer(run_dir / "checkpoints"), Checkpointer(tmp_path / "checkpoints")
    try:
        assert check_resume_policy(with_checkpoints, "auto") is True
        assert check_resume_policy(with_checkpoints, "require") is True
        with pytest.raises(ResumeError, match=r"resume: 'never' but the run directory already has checkpoints \(step 30\)"):
            check_resume_policy(with_checkpoints, "never")
        assert check_resume_policy(empty, "auto") is False
        assert check_resume_policy(empty, "never") is False
        with pytest.raises(ResumeError, match="resume: 'require' but the run directory has no checkpoint"):
            check_resume_policy(empty, "require")
    finally:
        with_checkpoints.close()
        empty.close()


def _train_cli(run_dir, *extra):
    import subprocess
    import sys

    from tests.conftest import SMALL_MODEL
    return subprocess.run([sys.executable, "-m", "maxllama", "train", *SMALL_MODEL, *TRAIN_ARGS, "train.steps=30",
                           f"run.dir={run_dir}", *extra], capture_output=True, text=True, timeout=300)


def test_train_command_refuses_what_the_resume_policy_forbids(trained, tmp_path):
    run_dir, *_ = trained
    kept = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "config.yaml", "config_history.jsonl")}
    never = _train_cli(run_dir, "resume=never")
    assert never.returncode == 2, never.stderr
    assert never.stderr.splitlines() == [
        "maxllama: error: resume: 'never' but the run directory already has checkpoints (step 30); pick a new "
        "run.dir, or resume=auto to continue it"]
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # nothing in the run written
    require = _train_cli(tmp_path / "new", "resume=require")
    assert require.returncode == 2, require.stderr
    assert require.stderr.splitlines() == [
        "maxllama: error: resume: 'require' but the run directory has no checkpoint; use resume=auto to start "
        "fresh when none exists"]
    written = [p.name for p in (tmp_path / "new").rglob("*") if p.is_file() and p.name != "run.lock"]
    assert written == []  # nothing trained, nothing recorded (an empty checkpoints/ at most)


def test_init_from_starts_from_the_checkpoints_parameters_exactly(trained, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from maxllama.checkpoint.manager import Checkpointer
    from maxllama.train import loop
    run_dir, *_ = trained
    source = Checkpointer(run_dir / "checkpoints")
    expected = source.manager.restore(30, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    source.close()
    started = []  # host copies of the state the run starts from (the first step donates its buffers)
    real_init_state = loop.init_state

    def init_state(*args):
        state = real_init_state(*args)
        started.append(jax.device_get(state))
        return state

    monkeypatch.setattr(loop, "init_state", init_state)
    logs = []
    loop.train(small_config(*TRAIN_ARGS, "train.steps=5", f"run.dir={tmp_path}", f"init_from={run_dir}"),
               log=logs.append)
    (state,) = started
    assert int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the parameters of step 30, to the bit
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))  # a fresh optimizer
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    source_rows = read_metrics(run_dir)
    assert rows[0]["learning_rate"] == source_rows[0]["learning_rate"]  # the schedule from its start
    for key in ["documents", "padding_fraction"]:  # and the data from batch 0
        assert [r[key] for r in rows] == [r[key] for r in source_rows[:5]]
