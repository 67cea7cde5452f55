"""KV-cache decoding (modegpt_jax.decoding) gives the full forward pass's logits and greedy tokens."""

import numpy as np
import pytest

from converters.hf_import import HFCheckpoint
from modegpt_jax.decoding import (
    CachedDecoder,
    decode_step,
    generate,
    init_cache,
    prefill,
)
from modegpt_jax.pipeline import compress
from tests.hf_models import make_hf_model, save_hf_model
from tests.test_pipeline import equal_split

pytest.importorskip("torch")


def calibration(n=16, length=24):
    return np.random.default_rng(0).integers(0, 128, (n, length)).astype(np.int32)


@pytest.fixture(scope="module", params=["llama_gqa_untied", "opt", "mistral_sliding_window", "qwen3", "gemma3",
                                        "phi3_longrope"])
def compressed(request, tmp_path_factory):
    """A tiny random model compressed at 0.3, so its layers have different, odd widths."""
    root = tmp_path_factory.mktemp(request.param)
    ckpt = HFCheckpoint(save_hf_model(make_hf_model(request.param), root / "dense"))
    model, _ = compress(ckpt, calibration(), equal_split(ratio=0.3), progress=False)
    specs = model.config.layers
    assert any(s != model.config.dense_layer(s.sliding_window) for s in specs)
    return model


def greedy_without_cache(model, prompt, steps):
    """Argmax decoding with full forward passes. The buffer has a fixed length (one compilation): with causal
    attention the logits at position t do not depend on the zeros after it."""
    B, T = prompt.shape
    tokens = np.zeros((B, T + steps), prompt.dtype)
    tokens[:, :T] = prompt
    for t in range(T, T + steps):
        tokens[:, t] = np.asarray(model(tokens))[:, t - 1].argmax(-1)
    return tokens


@pytest.mark.parametrize(("width_multiple", "fuse"), [(1, False), (8, True)])
def test_cached_steps_match_full_forward(compressed, width_multiple, fuse):
    """Exact-width or zero-padded cache rows, separate or concatenated projections: the full pass's logits."""
    model = compressed
    decoder = CachedDecoder(model, fuse=fuse)
    tokens = np.random.default_rng(1).integers(0, 128, (2, 14))
    full = np.asarray(model(tokens))
    cache = init_cache(model, batch=2, max_length=16, width_multiple=width_multiple)
    widths = {k.shape[2] for k in cache.keys} | {v.shape[3] for v in cache.values}
    assert all(w % width_multiple == 0 for w in widths)
    logits, cache = decoder.prefill(tokens[:, :8], cache, last_only=False)
    np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=1e-4, rtol=0)
    for t in range(8, 14):  # one token at a time through the cache
        logits, cache = decoder.decode_step(tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-4, rtol=0)
    assert int(cache.length) == 14


def test_cached_greedy_equals_cache_free_greedy(compressed):
    prompt = np.random.default_rng(2).integers(0, 128, (2, 6))
    out = np.asarray(generate(compressed, prompt, max_new_tokens=8))  # the decode loop runs in one jitted call
    assert out.shape == (2, 14)
    np.testing.assert_array_equal(out, greedy_without_cache(compressed, prompt, 8))
    decoder = CachedDecoder(compressed)  # the same through the split-once decoder, step by step
    logits, cache = decoder.prefill(prompt, decoder.init_cache(2, 14))
    steps = []
    for _ in range(8):
        steps.append(np.asarray(logits).argmax(-1))
        logits, cache = decoder.decode_step(steps[-1], cache)
    np.testing.assert_array_equal(np.stack(steps, 1), out[:, 6:])


def test_padded_prompt_matches_full_forward(compressed):
    """Left padding: the cache keeps the prompt's key mask, and learned positions count real tokens only."""
    model = compressed
    tokens = np.random.default_rng(3).integers(0, 128, (2, 9))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    full = np.asarray(model(tokens, attention_mask=mask))
    cache = init_cache(model, batch=2, max_length=9)
    logits, cache = prefill(model, tokens[:, :7], cache, attention_mask=mask[:, :7])
    np.testing.assert_allclose(np.asarray(logits), full[:, 6], atol=1e-4, rtol=0)
    for t in (7, 8):
        logits, cache = decode_step(model, tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-4, rtol=0)
