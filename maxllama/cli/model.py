"""`maxllama convert`, `sample` and `score`: what one does with a model directory."""

from __future__ import annotations

import argparse

from maxllama.base.errors import UserError


def register(commands) -> None:
    convert = commands.add_parser("convert", help="import/export Hugging Face Llama 4 checkpoints",
                                  description="Convert between Hugging Face Llama 4 checkpoints, text-only "
                                              "(Llama4ForCausalLM) or multimodal (Llama4ForConditionalGeneration), "
                                              "and maxllama model directories (config.yaml + Orbax checkpoints/).")
    convert_commands = convert.add_subparsers(dest="convert_command", required=True, metavar="SUBCOMMAND")
    hf_import = convert_commands.add_parser(
        "hf-import", help="HF config.json + safetensors -> maxllama model directory",
        description="Read an HF Llama 4 checkpoint, text-only (llama4_text) or multimodal (llama4, vision "
                    "encoder and projector included; config.json + safetensors, sharded or not, fused or per-expert "
                    "expert tensors) tensor by tensor and write a maxllama model directory that `maxllama train` "
                    "starts from (init_from: OUT_DIR) and `sample`/`score` read.")
    hf_import.add_argument("hf_dir", metavar="HF_DIR")
    hf_import.add_argument("out_dir", metavar="OUT_DIR")
    hf_import.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the written config")
    hf_import.set_defaults(func=cmd_convert_import)
    hf_export = convert_commands.add_parser(
        "hf-export", help="maxllama model directory -> HF config.json + safetensors",
        description="Write the newest checkpoint of a model directory (or a checkpoints/STEP folder) as a "
                    "checkpoint that transformers loads: Llama4ForCausalLM.from_pretrained for a text model, "
                    "Llama4ForConditionalGeneration.from_pretrained for one with vision.enabled (its image token "
                    "ids are those of the model's data.tokenizer). What transformers cannot represent is refused, "
                    "naming the key, and nothing is written.")
    hf_export.add_argument("model_dir", metavar="CKPT_DIR")
    hf_export.add_argument("out_dir", metavar="OUT_DIR")
    hf_export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    hf_export.set_defaults(func=cmd_convert_export)

    sample = commands.add_parser(
        "sample", help="generate text from a trained or imported model, optionally given an image",
        description="Continue a prompt with a model directory's newest checkpoint (KV-cached decoding), up to "
                    "--max-new-tokens or the first EOS. --image PATH puts an image before the prompt as training "
                    "documents have it (BOS <image> text), tiled as the data pipeline tiles it; the model needs a "
                    "vision encoder. --input REQUESTS.jsonl answers one request per line, "
                    '{"prompt": TEXT, "image": optional PATH relative to the file}, writing each line\'s fields '
                    'plus the generated "text" to --output; a bad line stops the command before any decoding, '
                    "naming file:line.")
    sample.add_argument("model_dir", metavar="CKPT_DIR")
    sample.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    sample.add_argument("--image", metavar="PATH", help="an image the prompt follows (png, jpeg, ...)")
    sample.add_argument("--input", metavar="REQUESTS.jsonl", help="one request per line instead of --prompt/--image")
    sample.add_argument("--output", metavar="RESULTS.jsonl", help="with --input: where the results go")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    sample.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    sample.add_argument("--num-samples", type=int, default=1, help="samples of --prompt (not with --input)")
    sample.add_argument("--batch-size", type=int, default=8, help="with --input: requests decoded together")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)

    score = commands.add_parser(
        "score", help="log-likelihood (and logits) of token arrays, or of texts given images",
        description="Print each sequence's mean next-token log-likelihood and perplexity. --tokens: a [batch, "
                    "seq] integer .npy array, every next token scored, the fp32 logits optionally saved. --input: "
                    'a JSONL file of {"text": TEXT, "image": optional PATH relative to the file}, each scored as '
                    "BOS <image> text with only the text's tokens counted (not the image's structure tokens); a "
                    "bad line stops the command, naming file:line.")
    score.add_argument("model_dir", metavar="CKPT_DIR")
    given = score.add_mutually_exclusive_group(required=True)
    given.add_argument("--tokens", metavar="IDS.npy")
    given.add_argument("--input", metavar="REQUESTS.jsonl")
    score.add_argument("--logits-out", metavar="OUT.npy", help="with --tokens: save logits [batch, seq, vocab] (fp32)")
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=cmd_score)


def cmd_convert_import(ns: argparse.Namespace) -> int:
    from maxllama.interop.convert import hf_import
    hf_import(ns.hf_dir, ns.out_dir, ns.overrides)
    print(f"next: maxllama sample {ns.out_dir} --prompt '...', or train from it with init_from={ns.out_dir}")
    return 0


def cmd_convert_export(ns: argparse.Namespace) -> int:
    import json

    from maxllama.interop.convert import hf_export
    out_dir = hf_export(ns.model_dir, ns.out_dir, max_shard_bytes=int(ns.max_shard_gb * 2**30))
    architecture = json.loads((out_dir / "config.json").read_text())["architectures"][0]  # what from_pretrained builds
    print(f"next: transformers.{architecture}.from_pretrained('{ns.out_dir}')")
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    if ns.temperature < 0 or not 0 < ns.top_p <= 1 or ns.max_new_tokens < 1 or ns.batch_size < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens and --batch-size >= 1")
    if ns.input and (ns.prompt or ns.image or ns.num_samples != 1):
        raise UserError("--input takes the prompts and images from its file: drop --prompt, --image, --num-samples")
    if bool(ns.input) != bool(ns.output):
        raise UserError("--input and --output go together")
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.inference.prompts import encode_prompt
    from maxllama.inference.sampling import completion_text, make_generate
    cfg, tokenizer = _model_config(ns.model_dir)
    if ns.input:
        return _sample_requests(ns, cfg, tokenizer)
    prompt = encode_prompt(tokenizer, ns.prompt, cfg.model.vocab_size, image=ns.image, vision=cfg.vision)
    loaded = load_model_dir(ns.model_dir)
    generate = make_generate(loaded.model, temperature=ns.temperature, top_p=ns.top_p)
    for i in range(ns.num_samples):
        tokens = generate(loaded.params, prompt.tokens, ns.max_new_tokens, seed=ns.seed + i, images=prompt.images())
        print(f"--- sample {i + 1} (step {loaded.step}, temperature {ns.temperature}, top-p {ns.top_p}"
              f"{', image ' + ns.image if ns.image else ''})")
        print(ns.prompt + completion_text(tokenizer, tokens[0, prompt.tokens.shape[1]:]))
    return 0


def _sample_requests(ns: argparse.Namespace, cfg, tokenizer) -> int:
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.inference.requests import read_requests, write_results
    from maxllama.inference.sampling import completion_text, generate_all, make_generate
    requests = read_requests(ns.input, "prompt", tokenizer, cfg)
    loaded = load_model_dir(ns.model_dir)
    generate = make_generate(loaded.model, temperature=ns.temperature, top_p=ns.top_p)
    with _progress_bar(len(requests)) as bar:
        new_tokens = generate_all(generate, loaded.params, [r.prompt for r in requests], ns.max_new_tokens,
                                  batch_size=ns.batch_size, seed=ns.seed, progress=bar.update)
    write_results(ns.output, requests, [{"text": completion_text(tokenizer, t)} for t in new_tokens])
    print(f"{len(requests)} results (step {loaded.step}, temperature {ns.temperature}) written to {ns.output}")
    return 0


def _model_config(model_dir: str):
    """(config, tokenizer) of a model directory: enough to check a command's inputs before any weight loads."""
    from maxllama.checkpoint.model_dir import load_model_config
    from maxllama.data.tokenizer import make_tokenizer
    cfg = load_model_config(model_dir)
    return cfg, make_tokenizer(cfg.data.tokenizer)


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="request", disable=None)  # None: shown on a terminal only


def cmd_score(ns: argparse.Namespace) -> int:
    import numpy as np
    if ns.input and ns.logits_out:
        raise UserError("--logits-out needs --tokens: the texts of --input have different lengths")
    from maxllama.checkpoint.model_dir import load_model_dir
    cfg, tokenizer = _model_config(ns.model_dir)
    if ns.input:
        from maxllama.data.image_captions import image_token_ids
        from maxllama.inference.requests import read_requests
        from maxllama.inference.scoring import score_prompts
        requests = read_requests(ns.input, "text", tokenizer, cfg, allow_empty_text=False)
        loaded = load_model_dir(ns.model_dir)
        with _progress_bar(len(requests)) as bar:
            lls = score_prompts(loaded.model, loaded.params, [r.prompt for r in requests],
                                list(image_token_ids(tokenizer).values()), batch_size=ns.batch_size,
                                progress=bar.update)
        _print_scores("request", lls)
        return 0
    from maxllama.inference.scoring import load_token_array, score
    tokens = load_token_array(ns.tokens, cfg.model.vocab_size)
    loaded = load_model_dir(ns.model_dir)
    scores = score(loaded.model, loaded.params, tokens, batch_size=ns.batch_size, keep_logits=bool(ns.logits_out))
    _print_scores("sequence", scores.mean_log_likelihood)
    if ns.logits_out:
        np.save(ns.logits_out, scores.logits)
        print(f"logits [batch, seq, vocab] fp32 written to {ns.logits_out}")
    return 0


def _print_scores(label: str, lls) -> None:
    import numpy as np
    print(f"{label:>8}  {'mean log-likelihood':>19}  {'perplexity':>10}")
    for i, ll in enumerate(lls):
        print(f"{i:>8}  {ll:>19.5f}  {np.exp(-ll):>10.3f}")
    mean = np.mean(lls)
    print(f"{'all':>8}  {mean:>19.5f}  {np.exp(-mean):>10.3f}")
