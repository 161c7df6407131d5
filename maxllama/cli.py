"""`maxllama <command>`: the command line. `python -m maxllama` is the same.

User errors (bad config, missing file, impossible mesh) print one line naming the key or file and exit
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import yaml

DEFAULT_CONFIG = "experiments/tiny.yaml"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix from the message alone."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from maxllama.checkpoint.lock import RunDirError
    from maxllama.checkpoint.manager import ResumeError
    from maxllama.config import ConfigError
    from maxllama.interop import InteropError
    from maxllama.parallel.mesh import MeshError
    return UserError, ConfigError, MeshError, ResumeError, RunDirError, InteropError, FileNotFoundError


def _training_stopped() -> type[BaseException]:
    from maxllama.base.signals import TrainingStopped
    return TrainingStopped


def _split_config_and_overrides(args: Sequence[str], default: str | None) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return default, list(args)


def _load(args: Sequence[str], default: str | None):
    from maxllama.config import load_config
    path, overrides = _split_config_and_overrides(args, default)
    if path is not None and not Path(path).exists():
        raise UserError(f"config file not found: {path}")
    cfg, origins = load_config(path, overrides)
    return path, cfg, origins


def cmd_train(ns: argparse.Namespace) -> int:
    _, cfg, _ = _load(ns.args, DEFAULT_CONFIG)
    from maxllama.parallel.distributed import initialize, is_primary
    initialize(cfg.distributed)
    from maxllama.train.loop import train
    summary = train(cfg)
    if not is_primary():
        return 0
    ratio = summary.val_loss / summary.unigram_entropy
    print(f"final validation loss {summary.val_loss:.4f} nats/token = {ratio:.1%} of the unigram entropy "
          f"{summary.unigram_entropy:.4f} of the validation tokens")
    if summary.tokens_per_s == summary.tokens_per_s:  # not NaN: some steps ran
        print(f"throughput {summary.tokens_per_s:,.0f} tokens/s, MFU {summary.mfu:.1%}, step {summary.step_time_s * 1e3:.0f} ms, "
              f"compile {summary.compile_time_s:.1f} s, peak memory {summary.peak_memory_gb:.2f} GB")
    if summary.nonfinite_steps:
        print(f"non-finite updates skipped: {summary.nonfinite_steps} (train.nonfinite=skip); see the "
              f"'nonfinite' column of metrics.jsonl")
    print(f"metrics: {cfg.run_dir}/metrics.jsonl; curves: tensorboard --logdir {cfg.run_dir}/tensorboard")
    return 0


def _format_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_config(cfg, origins) -> str:
    """The resolved config as YAML, each leaf annotated with where its value came from."""
    from maxllama.config.loader import resolved_origins
    where = resolved_origins(cfg, origins)
    lines: list[str] = []

    def emit(tree: dict, prefix: str, indent: int) -> None:
        for key, value in tree.items():
            dotted = prefix + key
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                emit(value, dotted + ".", indent + 1)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                entry = f"{pad}{key}: {text}"
                lines.append(f"{entry:<48} # {where.get(dotted, 'default')}")

    emit(cfg.model_dump(), "", 0)
    return "\n".join(lines)


def cmd_config_show(ns: argparse.Namespace) -> int:
    path, cfg, origins = _load([ns.file, *ns.overrides], None)
    print(render_config(cfg, origins))
    from maxllama.model.build import define_model
    from maxllama.model.param_count import count_params
    from maxllama.parallel.mesh import build_mesh
    from maxllama.parallel.rules import LogicalSharding
    import jax
    # Counting needs shapes only: a one-device mesh, whatever the config's mesh says.
    mesh = build_mesh(cfg.mesh.model_copy(update={"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}), jax.devices()[:1])
    counts = count_params(cfg, define_model(cfg, LogicalSharding(mesh)))
    vision = f" (text {_format_count(counts.text_total)} + vision {_format_count(counts.vision_total)})" \
        if counts.vision_total else ""
    print(f"# parameters: {_format_count(counts.total)} total{vision}, {_format_count(counts.active)} active per token")
    return 0


def cmd_convert_import(ns: argparse.Namespace) -> int:
    from maxllama.interop.convert import hf_import
    hf_import(ns.hf_dir, ns.out_dir, ns.overrides)
    print(f"next: maxllama sample {ns.out_dir} --prompt '...', or train from it with init_from={ns.out_dir}")
    return 0


def cmd_convert_export(ns: argparse.Namespace) -> int:
    from maxllama.interop.convert import hf_export
    hf_export(ns.model_dir, ns.out_dir, max_shard_bytes=int(ns.max_shard_gb * 2**30))
    print(f"next: transformers.Llama4ForCausalLM.from_pretrained('{ns.out_dir}')")
    return 0


def _encode_prompt(tokenizer, text: str):
    import numpy as np
    # Documents start with BOS in training, so a prompt does too.
    return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)[None]


def cmd_sample(ns: argparse.Namespace) -> int:
    if ns.temperature < 0 or not 0 < ns.top_p <= 1 or ns.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.data.tokenizer import make_tokenizer
    from maxllama.inference.sampling import make_generate
    loaded = load_model_dir(ns.model_dir)
    tokenizer = make_tokenizer(loaded.cfg.data.tokenizer)
    prompt = _encode_prompt(tokenizer, ns.prompt)
    if prompt.max() >= loaded.cfg.model.vocab_size:
        raise UserError(f"the prompt has token ids beyond model.vocab_size ({loaded.cfg.model.vocab_size})")
    generate = make_generate(loaded.model, temperature=ns.temperature, top_p=ns.top_p)
    for i in range(ns.num_samples):
        tokens = generate(loaded.params, prompt, ns.max_new_tokens, seed=ns.seed + i)
        text = tokenizer.decode(tokens[0, prompt.shape[1]:])
        print(f"--- sample {i + 1} (step {loaded.step}, temperature {ns.temperature}, top-p {ns.top_p})")
        print(ns.prompt + text)
    return 0


def cmd_score(ns: argparse.Namespace) -> int:
    import numpy as np
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.inference.scoring import score
    try:
        tokens = np.load(ns.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokens {ns.tokens}: cannot read a .npy array ({e})") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise UserError(f"--tokens {ns.tokens}: need a [batch, seq] integer array with seq >= 2, "
                        f"got {tokens.dtype} {tokens.shape}")
    loaded = load_model_dir(ns.model_dir)
    if tokens.min() < 0 or tokens.max() >= loaded.cfg.model.vocab_size:
        raise UserError(f"--tokens {ns.tokens}: ids must be in [0, {loaded.cfg.model.vocab_size}), "
                        f"got [{tokens.min()}, {tokens.max()}]")
    scores = score(loaded.model, loaded.params, tokens, batch_size=ns.batch_size, keep_logits=bool(ns.logits_out))
    print(f"{'sequence':>8}  {'mean log-likelihood':>19}  {'perplexity':>10}")
    for i, ll in enumerate(scores.mean_log_likelihood):
        print(f"{i:>8}  {ll:>19.5f}  {np.exp(-ll):>10.3f}")
    print(f"{'all':>8}  {scores.mean_log_likelihood.mean():>19.5f}  {np.exp(-scores.mean_log_likelihood.mean()):>10.3f}")
    if ns.logits_out:
        np.save(ns.logits_out, scores.logits)
        print(f"logits [batch, seq, vocab] fp32 written to {ns.logits_out}")
    return 0


def _prepare_sources(ns: argparse.Namespace):
    from maxllama.config.schema import SourceConfig
    if ns.config:
        _, cfg, _ = _load([ns.config], None)
        return cfg.data.sources, cfg.data.tokenizer, cfg.data.val_fraction
    if not ns.sources:
        raise UserError("prepare: name at least one SOURCE, or --config CONFIG to use its data.sources")
    sources = [SourceConfig(path=p, format=ns.format, field=ns.field) for p in ns.sources]
    return sources, ns.tokenizer, ns.val_fraction


def cmd_prepare(ns: argparse.Namespace) -> int:
    sources, tokenizer, val_fraction = _prepare_sources(ns)
    if ns.train_tokenizer:
        from maxllama.data.prepare import plan_units
        from maxllama.data.sources import iter_documents
        from maxllama.data.tokenizer import train_bpe
        from collections import Counter

        def texts():
            skipped: Counter = Counter()
            for unit in plan_units(sources):
                for doc in iter_documents(unit.path, unit.format, unit.field, skipped, unit.id_prefix):
                    yield doc.text.decode("utf-8", errors="replace") if isinstance(doc.text, bytes) else doc.text

        trained = train_bpe(texts(), ns.train_tokenizer, ns.out)
        print(f"trained a {trained.vocab_size}-token BPE tokenizer: {ns.out}")
        print(f"next: maxllama prepare ... --tokenizer {ns.out} --out STORE_DIR")
        return 0
    from maxllama.data.prepare import prepare
    manifest = prepare(sources, ns.out, tokenizer, val_fraction=val_fraction, workers=ns.workers,
                       progress=not ns.quiet)
    for split, numbers in manifest["splits"].items():
        print(f"{split}: {numbers['documents']:,} documents, {numbers['tokens']:,} tokens")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(manifest["skipped"].items())) or "none"
    print(f"skipped records: {skipped}; {manifest.get('prepare_mb_per_s')} MB/s")
    print(f"next: train on it with data.sources=[{{path: {ns.out}}}] (and data.tokenizer={tokenizer})")
    return 0


def cmd_checkpoint_list(ns: argparse.Namespace) -> int:
    from maxllama.checkpoint.inspect import list_checkpoints
    print(list_checkpoints(ns.run_dir))
    return 0


def cmd_checkpoint_inspect(ns: argparse.Namespace) -> int:
    from maxllama.checkpoint.inspect import inspect_checkpoint
    print(inspect_checkpoint(ns.checkpoint))
    return 0


def cmd_preflight(ns: argparse.Namespace) -> int:
    _, cfg, _ = _load(ns.args, DEFAULT_CONFIG)
    from maxllama.parallel.distributed import initialize
    initialize(cfg.distributed)
    from maxllama.train.preflight import DoesNotFit, preflight
    try:
        result = preflight(cfg)
    except DoesNotFit as e:
        print(f"maxllama: does not fit: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(result.report())
    return 0


def _sweep_dir(ns: argparse.Namespace, sweep) -> Path:
    return Path(ns.dir) if ns.dir else Path("runs/sweeps") / sweep.path.stem


def cmd_sweep_plan(ns: argparse.Namespace) -> int:
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)
    print(f"{len(sweep.runs)} runs of {sweep.base}; swept: {', '.join(sweep.swept) or 'nothing'}")
    for run in sweep.runs:
        print(f"  {run.name:<40} " + " ".join(f"{k}={run.overrides[k]}" for k in sweep.swept if k in run.overrides))
    return 0


def cmd_sweep_run(ns: argparse.Namespace) -> int:
    import signal

    from maxllama.base.signals import PREEMPTED_EXIT_CODE
    from maxllama.sweep.executors import plan_local, run_local, run_slurm
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)  # validates every run's config before anything starts
    sweep_dir = _sweep_dir(ns, sweep)
    if ns.parallel is not None and ns.parallel < 1:
        raise UserError(f"--parallel: must be at least 1, got {ns.parallel}")
    executor = {**sweep.executor, **({"type": ns.executor} if ns.executor else {}),
                **({"parallel": ns.parallel} if ns.parallel else {})}
    if executor["type"] == "slurm":
        run_slurm(sweep, sweep_dir, executor, ns.dry_run)
        return 0
    if executor["type"] != "local":
        raise UserError(f"executor.type: unknown executor {executor['type']!r:.40} (local, slurm)")
    if ns.dry_run:
        plan_local(sweep, sweep_dir, executor["parallel"])
        print(f"next: maxllama sweep run {ns.file}{f' --dir {ns.dir}' if ns.dir else ''} (without --dry-run)")
        return 0
    manifest = run_local(sweep, sweep_dir, executor["parallel"], progress=not ns.quiet)
    if manifest["stopped_by"] is not None:
        stopped = [name for name, run in manifest["runs"].items() if run["status"] == "stopped"]
        print(f"sweep stopped by {signal.Signals(manifest['stopped_by']).name}: {len(stopped)} running runs saved "
              f"their step and stopped; no further run started. Resume with: maxllama sweep run {ns.file}"
              f"{f' --dir {ns.dir}' if ns.dir else ''}")
        return PREEMPTED_EXIT_CODE
    failed = [name for name, run in manifest["runs"].items() if run["status"] == "failed"]
    print(f"{len(manifest['runs']) - len(failed)} of {len(manifest['runs'])} runs finished; "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    print(f"next: maxllama sweep report {sweep_dir}")
    return 1 if failed else 0


def cmd_sweep_run_one(ns: argparse.Namespace) -> int:
    from maxllama.sweep.executors import run_one
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)
    return run_one(sweep, _sweep_dir(ns, sweep), ns.index)


def cmd_sweep_report(ns: argparse.Namespace) -> int:
    from maxllama.sweep.report import report
    text, csv_path, png, optima = report(ns.dir, ns.x, ns.curve, ns.metric)
    print(text)
    print(f"table: {csv_path}")
    if png:
        print(f"plot: {png}")
        for curve, optimum in optima.items():
            note = "" if optimum.fitted else " (best point; too few points to fit)"
            edge = "; at the edge of the swept range: widen it" if optimum.at_edge else ""
            print(f"  optimum for {curve}: {optimum.x:.4g} ({ns.metric} {optimum.value:.4f}){note}{edge}")
    return 0


def _model_summary(cfg) -> dict:
    """MetaP's resolved table for a config, from abstract shapes (nothing allocated, any mesh size)."""
    from maxllama.metap import table
    from maxllama.model.build import define_model, one_device_sharding
    return table.summary(cfg, define_model(cfg, one_device_sharding()))


def cmd_metap_show(ns: argparse.Namespace) -> int:
    _, cfg, _ = _load([ns.file, *ns.overrides], None)
    from maxllama.metap import table
    info = _model_summary(cfg)
    print(table.format_summary(info))
    if ns.parameters:
        for name, group in info["groups"].items():
            print(f"\n{name}:")
            for path in group["parameters"]:
                print(f"  {path}")
    if cfg.metap.parametrization == "standard":
        print("\nstandard parametrization; set metap.parametrization=metap (and metap.base.*) for the MetaP rules")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cmd_metap_coord_check(ns: argparse.Namespace) -> int:
    _, cfg, _ = _load([ns.file, *ns.overrides], None)
    from maxllama.studies import coord_check as cc
    if bool(ns.widths) == bool(ns.depths):
        raise UserError("give --widths W1,W2,... or --depths L1,L2,... (one ladder per command)")
    axis, values = ("width", ns.widths) if ns.widths else ("depth", ns.depths)
    out_dir = Path(ns.out or Path(cfg.run_dir) / "coord_check")
    from tqdm import tqdm
    rungs = len(values) * len(ns.seeds)
    results = []
    for param in ns.param:
        with tqdm(total=rungs, desc=f"{param} {axis}s", unit="model") as bar:
            def progress(message: str) -> None:
                bar.set_postfix_str(message)
                bar.update(1)
            check = cc.coord_check(cfg, axis, values, param, seeds=ns.seeds, steps=ns.steps, lr=ns.lr,
                                   tolerance=ns.tolerance, min_step=ns.min_step, progress=progress)
        png, js = cc.write(check, out_dir)
        print(check.table())
        print(f"{'PASS' if check.passed else 'FAIL'}: {param}; plot {png}, slopes {js}\n")
        results.append((param, check))
    metap = [c for p, c in results if p == "metap"]
    return 1 if metap and not metap[0].passed else 0


def cmd_metap_transfer(ns: argparse.Namespace) -> int:
    from maxllama.config.loader import parse_scalar
    from maxllama.studies.transfer import transfer, write
    where = {}
    for item in ns.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--where {item}: expected KEY=VALUE")
        where[key] = parse_scalar(value)
    result = transfer(ns.sweep_dir, metric=ns.metric, where=where)
    out = Path(ns.out)
    target_summary = None
    for key, fit in result.fits.items():
        print(f"{key}: optimum {fit.optimum:.4g} ({ns.metric} {fit.loss:.4f}; {len(fit.points)} values, "
              f"{'parabola fit' if fit.fitted else 'best point'})")
    if result.kappa is not None:
        print(f"kappa (LR ~ batch^kappa): {result.kappa:.3f}")
    if result.beta is not None:
        print(f"beta (LR ~ tokens^-beta): {result.beta:.3f}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    write(result, out, Path(ns.sweep_dir), None, None)  # the target below loads it through metap.from
    if ns.target:
        _, target, _ = _load([ns.target, f"metap.from={out.resolve()}"], None)
        target_summary = _model_summary(target)
        write(result, out, Path(ns.sweep_dir), target, target_summary)
        from maxllama.metap import table
        print(f"\ntarget {ns.target}:")
        print(table.format_summary(target_summary))
        from maxllama.studies.transfer import run_flops, sweep_flops
        cost = sweep_flops(ns.sweep_dir, result.runs) / run_flops(target)
        print(f"proxy sweep cost: {cost:.3g} x the FLOPs of one target run")
    if ns.check:
        from maxllama.studies.transfer import check_report
        print(check_report(result, ns.check, out, ns.metric))
    print(f"\nwrote {out}; a target config uses it with   metap: {{from: {out}}}   "
          f"(or the override metap.from={out})")
    return 0


def cmd_metap_drift(ns: argparse.Namespace) -> int:
    from maxllama.studies.drift import report
    text, png, js = report(ns.sweep_dirs, ns.key, ns.split, ns.metric, ns.hparam)
    print(text)
    print(f"plot: {png}\ntable: {js}")
    return 0


def cmd_metap_regret(ns: argparse.Namespace) -> int:
    from maxllama.studies.regret import regret
    text, _ = regret(ns.transferred, ns.direct, ns.proxy, ns.metric)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxllama", description="Pretrain Llama-4-style models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model from a YAML config",
        description="Train from a YAML config (default: experiments/tiny.yaml) with section.key=value overrides. "
                    "Re-running the same command resumes from the run directory's latest checkpoint.")
    train.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    train.set_defaults(func=cmd_train)

    config = commands.add_parser("config", help="inspect configs", description="Inspect configs.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser(
        "show", help="print the resolved config and where each value came from",
        description="Print the resolved config (base: chain and overrides applied), the origin of every value "
                    "(file:line, override, default) and the parameter counts.")
    show.add_argument("file", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)

    convert = commands.add_parser("convert", help="import/export Hugging Face Llama 4 checkpoints",
                                  description="Convert between Hugging Face Llama 4 checkpoints and maxllama model "
                                              "directories (config.yaml + Orbax checkpoints/).")
    convert_commands = convert.add_subparsers(dest="convert_command", required=True, metavar="SUBCOMMAND")
    hf_import = convert_commands.add_parser(
        "hf-import", help="HF config.json + safetensors -> maxllama model directory",
        description="Read an HF Llama 4 text checkpoint (config.json + safetensors, sharded or not, fused or "
                    "per-expert expert tensors) tensor by tensor and write a maxllama model directory that "
                    "`maxllama train` starts from (init_from: OUT_DIR) and `sample`/`score` read.")
    hf_import.add_argument("hf_dir", metavar="HF_DIR")
    hf_import.add_argument("out_dir", metavar="OUT_DIR")
    hf_import.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the written config")
    hf_import.set_defaults(func=cmd_convert_import)
    hf_export = convert_commands.add_parser(
        "hf-export", help="maxllama model directory -> HF config.json + safetensors",
        description="Write the newest checkpoint of a model directory (or a checkpoints/STEP folder) as a "
                    "checkpoint that transformers.Llama4ForCausalLM.from_pretrained loads.")
    hf_export.add_argument("model_dir", metavar="CKPT_DIR")
    hf_export.add_argument("out_dir", metavar="OUT_DIR")
    hf_export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    hf_export.set_defaults(func=cmd_convert_export)

    sample = commands.add_parser(
        "sample", help="generate text from a trained or imported model",
        description="Continue a prompt with a model directory's newest checkpoint (KV-cached decoding).")
    sample.add_argument("model_dir", metavar="CKPT_DIR")
    sample.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    sample.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)

    score_cmd = commands.add_parser(
        "score", help="log-likelihood (and logits) of token arrays",
        description="Run a forward pass over a [batch, seq] integer .npy array; print each sequence's mean "
                    "next-token log-likelihood and perplexity; optionally save the fp32 logits.")
    score_cmd.add_argument("model_dir", metavar="CKPT_DIR")
    score_cmd.add_argument("--tokens", required=True, metavar="IDS.npy")
    score_cmd.add_argument("--logits-out", metavar="OUT.npy", help="save logits [batch, seq, vocab] (fp32)")
    score_cmd.add_argument("--batch-size", type=int, default=8)
    score_cmd.set_defaults(func=cmd_score)

    prep = commands.add_parser(
        "prepare", help="tokenize sources into a token store (or train a tokenizer)",
        description="Tokenize text files, folders, globs, JSONL or Parquet (local or gs://, s3://) once into a "
                    "TensorStore token store with a manifest; parallel, resumable (re-run the same command). "
                    "With --train-tokenizer N, train an N-token BPE tokenizer on the sources instead.")
    prep.add_argument("sources", nargs="*", metavar="SOURCE")
    prep.add_argument("--out", required=True, help="store directory (or tokenizer.json with --train-tokenizer)")
    prep.add_argument("--config", help="take sources, tokenizer and val_fraction from this config's data section")
    prep.add_argument("--tokenizer", default="byte", help="'byte', tokenizer.json or SentencePiece .model")
    prep.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    prep.add_argument("--field", default="text", help="JSONL field / Parquet column with the text")
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    prep.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)

    pre = commands.add_parser(
        "preflight", help="compile the train step for the configured mesh and report per-device memory and FLOPs",
        description="Compile the train step ahead of time from abstract shapes (nothing allocated) for the "
                    "configured mesh; report per-device parameters, optimizer state, temporaries and FLOPs; fail "
                    "when it exceeds mesh.device_memory_gb. Simulate a mesh on CPU with MAXLLAMA_CPU_DEVICES=N.")
    pre.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    pre.set_defaults(func=cmd_preflight)

    sweep = commands.add_parser("sweep", help="plan, run and report sweeps of training runs",
                                description="Sweeps of training runs from a sweep YAML (grid, zip, random, seeds).")
    sweep_commands = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    plan = sweep_commands.add_parser("plan", help="list the runs a sweep file expands to, without running",
                                     description="List the runs (name and swept values) after validating each config.")
    plan.add_argument("file", metavar="SWEEP.yaml")
    plan.set_defaults(func=cmd_sweep_plan)
    run = sweep_commands.add_parser("run", help="run (or resume) a sweep",
                                    description="Run every unfinished run of the sweep; finished runs are skipped, "
                                                "unfinished ones resume from their checkpoints. --dry-run shows "
                                                "which, and each run's command, without running anything.")
    run.add_argument("file", metavar="SWEEP.yaml")
    run.add_argument("--dir", help="sweep directory (default runs/sweeps/<sweep file name>)")
    run.add_argument("--executor", choices=["local", "slurm"], help="override the sweep file's executor")
    run.add_argument("--parallel", type=int, help="concurrent runs (local) or array-task limit (slurm)")
    run.add_argument("--dry-run", action="store_true",
                     help="run nothing: list every run (finished, would resume, or would start) with its train "
                          "command; slurm: print the job script (written to DIR/sweep.sbatch) instead of submitting")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_sweep_run)
    one = sweep_commands.add_parser("run-one", help="run one run of a sweep (what each SLURM array task does)",
                                    description="Run the run at --index of the sweep file into --dir.")
    one.add_argument("file", metavar="SWEEP.yaml")
    one.add_argument("--dir", help="sweep directory")
    one.add_argument("--index", type=int, required=True)
    one.set_defaults(func=cmd_sweep_run_one)
    rep = sweep_commands.add_parser("report", help="table, CSV and plot of a sweep's results",
                                    description="Write DIR/report.csv, print the table, and plot METRIC against a "
                                                "swept key (default: the learning rate), one curve per value of another, "
                                                "with each curve's fitted optimum marked.")
    rep.add_argument("dir", metavar="DIR")
    rep.add_argument("--x", help="swept key on the x axis (log2)")
    rep.add_argument("--curve", help="swept key whose values make the curves")
    rep.add_argument("--metric", default="final_val_loss", choices=["final_val_loss", "best_val_loss", "final_loss"])
    rep.set_defaults(func=cmd_sweep_report)

    metap = commands.add_parser("metap", help="MetaP: resolved per-group hyperparameters, coordinate check, transfer",
                                description="MetaP: per-parameter init scales, multipliers and learning rates that "
                                            "transfer from a tuned proxy to a larger run.")
    metap_commands = metap.add_subparsers(dest="metap_command", required=True, metavar="SUBCOMMAND")
    mshow = metap_commands.add_parser(
        "show", help="the resolved init std, LR, weight decay and Adam eps of every parameter group",
        description="Resolve the config's parametrization against its proxy (metap.base) and print every group's "
                    "init std, peak LR, weight decay and Adam eps, with the forward multipliers. Allocates nothing.")
    mshow.add_argument("file", metavar="CONFIG")
    mshow.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    mshow.add_argument("--parameters", action="store_true", help="also list the parameters of each group")
    mshow.set_defaults(func=cmd_metap_show)
    coord = metap_commands.add_parser(
        "coord-check", help="mean |activation| per module vs width or depth after a few high-LR steps",
        description="Train each width (or depth) a few steps at a high LR on one fixed batch, for 2+ seeds; write a "
                    "PNG (one panel per step, log-log) and a JSON of the slopes per doubling; print a pass/fail "
                    "table, each slope with its standard error over seeds. Exit code 1 when MetaP fails.")
    coord.add_argument("file", metavar="CONFIG")
    coord.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    coord.add_argument("--widths", type=_int_list, help="residual widths, e.g. 32,64,128,256,512")
    coord.add_argument("--depths", type=_int_list, help="layer counts, e.g. 2,4,8,16,32")
    coord.add_argument("--param", type=lambda s: s.split(","), default=["metap", "standard"],
                       help="parametrizations to check: metap, standard or both (default: metap,standard)")
    coord.add_argument("--seeds", type=_int_list, default=[0, 1], help="seeds averaged (default 0,1)")
    coord.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    coord.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's optim.lr)")
    coord.add_argument("--tolerance", type=float, default=0.1, help="pass: |slope| per doubling at most this")
    coord.add_argument("--min-step", type=int, default=2, help="judge steps from this one on (default 2)")
    coord.add_argument("--out", help="output folder (default: RUN_DIR/coord_check)")
    coord.set_defaults(func=cmd_metap_coord_check)
    tr = metap_commands.add_parser(
        "transfer", help="fit a proxy sweep's optima and write the target's MetaP hyperparameters",
        description="Fit the optimum of every swept hyperparameter of a proxy sweep (parabola in log2 through the "
                    "best point and its neighbours, seeds averaged), the batch-size and horizon exponents kappa and beta when the "
                    "sweep varied them, and write metap.yaml; a target config applies it with metap.from: PATH.")
    tr.add_argument("sweep_dir", metavar="PROXY_SWEEP_DIR")
    tr.add_argument("--target", metavar="CONFIG", help="also resolve and record the target's per-group values")
    tr.add_argument("--out", default="metap.yaml", help="file to write (default metap.yaml)")
    tr.add_argument("--metric", default="final_val_loss", help="metric to minimise (default final_val_loss)")
    tr.add_argument("--check", metavar="SWEEP_DIR", help="a sweep at other batch sizes / horizons: compare its "
                                                          "measured optimal LR with the prediction")
    tr.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="use only the runs with this value of a swept key (e.g. model.d_model=32)")
    tr.set_defaults(func=cmd_metap_transfer)

    dr = metap_commands.add_parser(
        "drift", help="how far the optimal LR moves along a scaled key of a sweep (per parametrization)",
        description="For each value of KEY (e.g. model.d_model) fit the optimal LR, or another swept HPARAM "
                    "(parabola in log2, seeds averaged), and report the spread of its log2 optimum per "
                    "parametrization; writes drift.png and drift.json.")
    dr.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="one or more sweeps, pooled")
    dr.add_argument("--key", required=True, help="the scaled key, e.g. model.d_model, model.n_layers, model.n_experts")
    dr.add_argument("--split", default=None, help="one panel per value of this swept key (e.g. metap.parametrization)")
    dr.add_argument("--hparam", default="optim.lr",
                    help="the swept hyperparameter whose optimum is tracked (default optim.lr; e.g. metap.lr_readout)")
    dr.add_argument("--metric", default="final_val_loss")
    dr.set_defaults(func=cmd_metap_drift)
    rg = metap_commands.add_parser(
        "regret", help="end to end: a transferred target run against the best of a direct sweep at the target",
        description="Final loss of the target trained with transferred hyperparameters (a sweep over seeds) "
                    "against the best point of a direct LR sweep at the target; writes regret.png and regret.json.")
    rg.add_argument("transferred", metavar="TRANSFERRED_SWEEP_DIR")
    rg.add_argument("--direct", required=True, metavar="SWEEP_DIR", help="the direct LR sweep at the target")
    rg.add_argument("--proxy", nargs="*", default=[], metavar="SWEEP_DIR", help="proxy sweeps, for the cost ratio")
    rg.add_argument("--metric", default="final_val_loss")
    rg.set_defaults(func=cmd_metap_regret)
    ckpt = commands.add_parser("checkpoint", help="list and inspect checkpoints",
                               description="List a run's checkpoints or inspect one, from metadata alone.")
    ckpt_commands = ckpt.add_subparsers(dest="checkpoint_command", required=True, metavar="SUBCOMMAND")
    ckpt_list = ckpt_commands.add_parser("list", help="steps, sizes and items of a run's checkpoints",
                                         description="Steps, sizes, items and save times of RUN_DIR/checkpoints; "
                                                     "interrupted saves are shown separately.")
    ckpt_list.add_argument("run_dir", metavar="RUN_DIR")
    ckpt_list.set_defaults(func=cmd_checkpoint_list)
    ckpt_inspect = ckpt_commands.add_parser(
        "inspect", help="config summary, data position and tree of shapes of one checkpoint",
        description="Inspect RUN_DIR (its newest checkpoint) or RUN_DIR/checkpoints/STEP.")
    ckpt_inspect.add_argument("checkpoint", metavar="CKPT")
    ckpt_inspect.set_defaults(func=cmd_checkpoint_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except _user_errors() as e:
        message = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
        print(f"maxllama: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maxllama: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except _training_stopped() as e:
        print(f"maxllama: {e.kind}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
