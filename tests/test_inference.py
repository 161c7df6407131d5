import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxllama.checkpoint.manager import Checkpointer
from maxllama.config import dump_config
from maxllama.inference.sampling import generate_by_recomputation, make_generate, next_token
from maxllama.model.build import bind
from tests.test_model import make


@pytest.mark.parametrize("overrides", [[], ["model.n_layers=5"], ["model.scan_layers=false"]])
def test_cached_decoding_equals_full_recomputation(overrides):
    cfg, model, params = make(*overrides)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.model.vocab_size)
    cached = make_generate(model)(params, prompt, 20)  # 25 tokens: crosses several chunks of 8
    np.testing.assert_array_equal(cached, generate_by_recomputation(model, params, prompt, 20))


def sample_by_recomputation(model, params, prompt, max_new_tokens, temperature, top_p, seed):
    """Sampling that re-runs the whole sequence every step, drawing with the same keys as `make_generate`."""
    prompt_len = prompt.shape[1]
    buffer = jnp.zeros((prompt.shape[0], prompt_len + max_new_tokens), prompt.dtype).at[:, :prompt_len].set(prompt)

    @jax.jit
    def step(params, buffer, position, key):
        logits = bind(model, params)(buffer).logits
        last = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
        token = next_token(last, key, temperature, top_p)
        return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), position, axis=1)

    key = jax.random.key(seed)
    for position in range(prompt_len, prompt_len + max_new_tokens):
        key, step_key = jax.random.split(key)
        buffer = step(params, buffer, position, step_key)
    return buffer


def test_cached_sampling_equals_sampling_by_recomputation():
    cfg, model, params = make()
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, cfg.model.vocab_size)
    generate = make_generate(model, temperature=0.8, top_p=0.95)
    cached = generate(params, prompt, 20, seed=7)  # 25 tokens: crosses several chunks of 8
    np.testing.assert_array_equal(cached, sample_by_recomputation(model, params, prompt, 20, 0.8, 0.95, seed=7))
    np.testing.assert_array_equal(cached, generate(params, prompt, 20, seed=7))  # the seed decides the draw...
    assert not np.array_equal(cached, generate(params, prompt, 20, seed=8))  # ...another seed draws others


def test_cached_logits_equal_full_forward():
    cfg, model, params = make()
    forward = jax.jit(lambda p, t, c: bind(model, p)(t, cache=c))
    tokens = jax.random.randint(jax.random.key(2), (2, 19), 0, cfg.model.vocab_size)
    out = forward(params, tokens[:, :6], bind(model, params).init_cache(2, 19))
    steps, cache = [out.logits], out.cache
    for t in range(6, 19):
        out = forward(params, tokens[:, t:t + 1], cache)
        steps.append(out.logits)
        cache = out.cache
    full = jax.jit(lambda p, t: bind(model, p)(t).logits)(params, tokens)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 19


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(next_token(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the third is never needed
    assert {int(next_token(logits, jax.random.key(i), 1.0, 0.1)[0]) for i in range(50)} == {0}
    assert int(next_token(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg, model, params = make()
    directory = tmp_path_factory.mktemp("model")
    (directory / "config.yaml").write_text(dump_config(cfg))
    checkpointer = Checkpointer(directory / "checkpoints")
    checkpointer.save_params(7, params)
    checkpointer.close()
    return directory, model, params


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "maxllama", *map(str, args)], capture_output=True, text=True)


def test_score_command_reports_log_likelihood_and_saves_logits(model_dir, tmp_path):
    directory, model, params = model_dir
    tokens = np.random.default_rng(0).integers(0, 256, (3, 12))
    np.save(tmp_path / "ids.npy", tokens)
    result = run_cli("score", directory, "--tokens", tmp_path / "ids.npy", "--logits-out", tmp_path / "logits.npy")
    assert result.returncode == 0, result.stderr
    logits = np.asarray(bind(model, params)(jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, atol=1e-5)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    expected = np.take_along_axis(np.asarray(log_probs), tokens[:, 1:, None], -1)[..., 0].mean(-1)
    rows = [line.split() for line in result.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    np.testing.assert_allclose([float(r[1]) for r in rows], expected, atol=1e-4)
    np.testing.assert_allclose([float(r[2]) for r in rows], np.exp(-expected), rtol=1e-3)


def test_sample_command_and_its_errors(model_dir, tmp_path):
    directory, *_ = model_dir
    result = run_cli("sample", directory, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "sample 1 (step 7" in result.stdout and "def " in result.stdout
    bad = run_cli("score", directory, "--tokens", tmp_path / "missing.npy")
    assert bad.returncode == 2 and "missing.npy" in bad.stderr and "Traceback" not in bad.stderr
    np.save(tmp_path / "big.npy", np.full((1, 4), 999))
    bad = run_cli("score", directory, "--tokens", tmp_path / "big.npy")
    assert bad.returncode == 2 and "ids must be in [0, 272)" in bad.stderr
    bad = run_cli("sample", tmp_path)
    assert bad.returncode == 2 and "not a model directory" in bad.stderr
