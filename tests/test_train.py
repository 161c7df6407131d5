import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllama.config.schema import OptimConfig
from maxllama.model.build import define_model
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.train.metrics import read_metrics
from maxllama.train.optimizer import build_optimizer
from maxllama.train.schedules import make_schedule
from tests.conftest import small_config

TRAIN_ARGS = ["optim.warmup_steps=5", "optim.lr=1e-2", "train.eval_every=10", "train.log_every=5",
              "train.eval_batches=2", "logging.progress=false", "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 steps, then the same command with steps=30: the second run resumes at step 20."""
    from maxllama.train.loop import train
    run_dir = tmp_path_factory.mktemp("run")
    logs = []
    first = train(small_config(*TRAIN_ARGS, "train.steps=20", f"run.dir={run_dir}"), log=logs.append)
    second = train(small_config(*TRAIN_ARGS, "train.steps=30", f"run.dir={run_dir}"), log=logs.append)
    finished = train(small_config(*TRAIN_ARGS, "train.steps=30", f"run.dir={run_dir}"), log=logs.append)
    assert finished.val_loss == pytest.approx(second.val_loss, rel=1e-5)  # a finished run only re-evaluates
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


def test_rerunning_the_command_resumes(trained):
    run_dir, _, _, logs = trained
    assert any("resumed from" in line and line.endswith("/20") for line in logs)
    assert any("already reached train.steps=30" in line for line in logs)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 30
    from maxllama.checkpoint.manager import Checkpointer
    checkpointer = Checkpointer(run_dir / "checkpoints")
    # The Grain iterator position saved with the checkpoint agrees with the step (the cross-check on resume).
    meta = checkpointer.meta(30)
    assert meta["data"] == {"step": 30, "iterator_start": 20, "iterator": {"next_index": 10}}
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
