"""The training loop: build everything from the config, then step, log, evaluate and checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from pathlib import Path

import jax
from tqdm import tqdm

from maxllama.base.signals import Preempted, preemption_signals
from maxllama.checkpoint.lock import hold_run_dir
from maxllama.checkpoint.manager import Checkpointer, ResumeError, check_resume_policy
from maxllama.checkpoint.model_dir import restore_params_into
from maxllama.config import ConfigError, dump_config
from maxllama.config.compat import describe
from maxllama.config.schema import Config
from maxllama.data.pipeline import batch_statistics, build_datasets, iterate, unigram_entropy
from maxllama.metap import table as metap_table
from maxllama.model.build import define_model, init_params, param_shardings
from maxllama.model.param_count import count_params
from maxllama.parallel.distributed import agree, is_primary, to_host
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding, make_rules
from maxllama.train.flops import step_train_flops_per_token
from maxllama.train.metrics import MetricsLog, read_metrics
from maxllama.train.optimizer import build_optimizer
from maxllama.train.peak import peak_flops_per_device
from maxllama.train.preflight import replicated_parameters
from maxllama.train.reporting import StepReporter
from maxllama.train.resume import record_config, resume_changes
from maxllama.train.schedules import make_schedule
from maxllama.train.step import compile_steps, init_state
from maxllama.train.throughput import Throughput


@dataclasses.dataclass
class TrainSummary:
    final_step: int
    val_loss: float
    unigram_entropy: float
    tokens_per_s: float
    mfu: float
    step_time_s: float
    compile_time_s: float
    peak_memory_gb: float
    params_total: int
    params_active: int
    nonfinite_steps: int


def global_batch(local: dict, sharding) -> dict:
    """Assemble the global batch from this process's rows (each host read only its own)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_step, params, batches, batch_sharding) -> float:
    totals = [eval_step(params, global_batch(b, batch_sharding)) for b in batches]
    nll, count = (sum(float(to_host(t[i])) for t in totals) for i in range(2))
    return nll / max(count, 1.0)


def peak_memory_gb() -> float:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host process peak RSS (KB -> GB)


def train(cfg: Config, *, log=print, devices=None) -> TrainSummary:
    """Train as `cfg` says, on `devices` (default: all of them), resuming per `cfg.resume`. With several
    processes, each reads its share of the data and process 0 writes the run directory's files. The run
    directory is locked for the run's life: a second process on it refuses before it reads anything."""
    primary = is_primary()
    log = log if primary else (lambda *_: None)
    with hold_run_dir(cfg.run_dir, primary=primary, log=log):
        return _train(cfg, log, devices, primary)


def _train(cfg: Config, log, devices, primary: bool) -> TrainSummary:
    run_dir = Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh, devices)
    sharding = LogicalSharding(mesh, make_rules(cfg.mesh.rules))
    data = build_datasets(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size} tokens")
    model = define_model(cfg, sharding)
    counts = count_params(cfg, model)
    left_whole = replicated_parameters(model.abstract_params, param_shardings(model, sharding))
    if left_whole:
        log(f"warning: {len(left_whole)} large parameters are replicated on every device "
            f"({', '.join(left_whole[:3])}...): check mesh.rules")
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(cfg, model.rules, schedule)

    # Nothing in the run directory is written until the run it holds is known to be this one.
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    look_for_checkpoint = check_resume_policy(checkpointer, cfg.resume)
    tokenizer = data.tokenizer.fingerprint()

    def changes(meta: dict, source: str) -> dict:
        return resume_changes(meta.get("config"), meta.get("tokenizer"), cfg, tokenizer, run_dir, source)

    if not look_for_checkpoint and cfg.init_from:
        params, init_step = restore_params_into(cfg.init_from, cfg, model, sharding, log=log,
                                                fresh=lambda: init_params(cfg, model, sharding))
        log(f"initialised from {cfg.init_from} (step {init_step}); optimizer and data start fresh")
    else:
        params = init_params(cfg, model, sharding)
    state = init_state(params, optimizer)
    if look_for_checkpoint:
        found = checkpointer.restore_newest(state, log, check=lambda meta: changes(meta, "its checkpoints"))
        if found is None:
            raise ResumeError(f"none of the checkpoints in {checkpointer.directory} can be restored (see the "
                              f"warnings above); nothing was changed. Move the damaged ones away to resume from "
                              f"an earlier one, or give a new run.dir to start over")
        state, meta = found
        step = int(to_host(state.step))
        accepted = changes(meta, "its checkpoints")
        log(f"resumed from {checkpointer.directory}/{step}")
        if accepted:
            log(f"changed since the checkpoint: {describe(accepted)}")
    else:
        saved = run_dir / "config.yaml"
        accepted = changes({"config": saved.read_text()}, "its config.yaml") if saved.exists() else {}
        logged = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        if logged:
            log(f"notice: {run_dir} holds {logged} logged steps but no checkpoint; training again from step 0")
    start = int(to_host(state.step))
    if primary:
        record_config(run_dir, cfg, start, accepted, resumed=look_for_checkpoint)
        metap_table.write(run_dir / "metap.yaml", cfg, model)
    metap_parameters = metap_table.per_parameter(cfg, model)

    batch_sharding = sharding.named(("batch", "seq"))
    train_step, eval_step = compile_steps(cfg, model, optimizer, schedule, state, batch_sharding)
    t0 = time.perf_counter()
    train_step = train_step.lower(state, global_batch(data.validation[0], batch_sharding)).compile()
    compile_time = time.perf_counter() - t0

    flops_per_token = step_train_flops_per_token(cfg)
    peak, peak_source = peak_flops_per_device(cfg.model.compute_dtype)
    entropy = unigram_entropy(data.validation)
    log(f"model: {counts.total / 1e6:.2f}M parameters, {counts.active / 1e6:.2f}M active per token; "
        f"{flops_per_token / 1e6:.1f} MFLOPs per token")
    log(f"data: {data.summary()}")
    log(f"mesh {dict(mesh.shape)}; peak {peak / 1e9:.1f} GFLOP/s "
        f"per device ({peak_source}); compiled in {compile_time:.1f}s")
    log(f"run directory: {run_dir}  (metrics.jsonl, tensorboard/, checkpoints/)")

    def validation_loss(params) -> float:
        return evaluate(eval_step, params, data.validation, batch_sharding)

    def save(step: int, state, *, wait: bool = False) -> None:
        reporter.flush()  # fetches the step's metrics first: a non-finite run stops before it saves
        checkpointer.save(step, state, wait=wait, meta={
            "config": dump_config(cfg), "tokenizer": tokenizer, "seed": cfg.seed, "metap": metap_parameters})

    throughput = Throughput(cfg.train.batch_size * cfg.train.seq_len, flops_per_token, peak * mesh.size)
    val_loss = float("nan")
    if start >= cfg.train.steps:
        log(f"the run already reached train.steps={cfg.train.steps}; raise train.steps to train further")
        val_loss = validation_loss(state.params)
    # The batch at a step is a function of the step: the step is the data position, and a resumed run reads
    # from it on.
    batches = iter(iterate(data.train, start, prefetch=cfg.data.prefetch, workers=cfg.data.workers))
    image_start = data.tokenizer.special["<|image_start|>"]
    with contextlib.ExitStack() as cleanup:
        preemption = cleanup.enter_context(preemption_signals())
        cleanup.callback(checkpointer.close)
        metrics_log = MetricsLog(run_dir, resume_step=start, tensorboard=cfg.logging.tensorboard, enabled=primary)
        cleanup.callback(metrics_log.close)
        progress = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.logging.progress and primary),
                        unit="step", dynamic_ncols=True)
        cleanup.callback(progress.close)
        reporter = StepReporter(metrics_log, progress, throughput, nonfinite=cfg.train.nonfinite,
                                constant={f"skipped_{reason}": n for reason, n in data.skipped.items()})
        for step in range(start + 1, cfg.train.steps + 1):
            with throughput.waiting_for_data():
                local = next(batches)
                batch = global_batch(local, batch_sharding)
            state, metrics = train_step(state, batch)
            reporter.add(step, {**metrics, **batch_statistics(local, image_start)})
            last = step == cfg.train.steps

            if step % cfg.train.eval_every == 0 or last:
                jax.block_until_ready(state)  # the step's compute belongs to its interval, the evaluation to none
                with throughput.paused():
                    val_loss = validation_loss(state.params)
                reporter.add_validation(step, val_loss, entropy)
            if step % cfg.train.log_every == 0 or step in reporter.val_losses or last:
                reporter.flush()
            # One collective per step decides for every process at once: stop (preempted) or save (due).
            preempted, due = agree(preemption.requested, checkpointer.due(step))
            if preempted:
                t_save = time.perf_counter()
                save(step, state, wait=True)
                took = time.perf_counter() - t_save
                late = f" (over the {cfg.checkpoint.grace_seconds:.0f} s grace period)" if took > cfg.checkpoint.grace_seconds else ""
                raise Preempted(f"{preemption.name or 'another process was signalled'}: saved step {step} in {took:.1f} s{late}; "
                                f"re-run the same command to resume")
            if last or due:
                save(step, state)

    measured = throughput.summary()
    return TrainSummary(
        final_step=int(to_host(state.step)), val_loss=val_loss, unigram_entropy=entropy,
        tokens_per_s=measured.tokens_per_s, mfu=measured.mfu, step_time_s=measured.step_time_s,
        compile_time_s=compile_time, peak_memory_gb=peak_memory_gb(), params_total=counts.total,
        params_active=counts.active, nonfinite_steps=reporter.nonfinite_steps)
