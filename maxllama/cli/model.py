"""`maxllama convert`, `sample` and `score`: what one does with a model directory."""

from __future__ import annotations

import argparse

from maxllama.base.errors import UserError


def register(commands) -> None:
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

    score = commands.add_parser(
        "score", help="log-likelihood (and logits) of token arrays",
        description="Run a forward pass over a [batch, seq] integer .npy array; print each sequence's mean "
                    "next-token log-likelihood and perplexity; optionally save the fp32 logits.")
    score.add_argument("model_dir", metavar="CKPT_DIR")
    score.add_argument("--tokens", required=True, metavar="IDS.npy")
    score.add_argument("--logits-out", metavar="OUT.npy", help="save logits [batch, seq, vocab] (fp32)")
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=cmd_score)


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


def cmd_sample(ns: argparse.Namespace) -> int:
    if ns.temperature < 0 or not 0 < ns.top_p <= 1 or ns.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.data.tokenizer import make_tokenizer
    from maxllama.inference.sampling import encode_prompt, make_generate
    loaded = load_model_dir(ns.model_dir)
    tokenizer = make_tokenizer(loaded.cfg.data.tokenizer)
    prompt = encode_prompt(tokenizer, ns.prompt, loaded.cfg.model.vocab_size)
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
    from maxllama.inference.scoring import load_token_array, score
    loaded = load_model_dir(ns.model_dir)
    tokens = load_token_array(ns.tokens, loaded.cfg.model.vocab_size)
    scores = score(loaded.model, loaded.params, tokens, batch_size=ns.batch_size, keep_logits=bool(ns.logits_out))
    print(f"{'sequence':>8}  {'mean log-likelihood':>19}  {'perplexity':>10}")
    for i, ll in enumerate(scores.mean_log_likelihood):
        print(f"{i:>8}  {ll:>19.5f}  {np.exp(-ll):>10.3f}")
    mean = scores.mean_log_likelihood.mean()
    print(f"{'all':>8}  {mean:>19.5f}  {np.exp(-mean):>10.3f}")
    if ns.logits_out:
        np.save(ns.logits_out, scores.logits)
        print(f"logits [batch, seq, vocab] fp32 written to {ns.logits_out}")
    return 0
