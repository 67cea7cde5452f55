"""The embedded SmolLM2-135M: our logits and perplexity agree with transformers' PyTorch model."""

import numpy as np
import pytest

from modegpt_jax.perplexity import perplexity, token_windows, tokenize
from modegpt_jax.wikipedia import embedded_text

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.real_model


def test_config_is_the_published_architecture(smollm2):
    cfg = smollm2.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert cfg.tie_word_embeddings


def test_logits_match_on_a_real_sentence(smollm2_models):
    ours, hf, tok = smollm2_models
    text = "The Eiffel Tower was completed in 1889 and remains one of the most visited monuments in Paris."
    ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), ref, atol=1e-3, rtol=0)
    # And the model is a language model, not noise: it predicts "Paris"-like continuations sensibly.
    assert np.mean(np.argmax(ref[0, :-1], -1) == ids[0, 1:]) > 0.2


def test_perplexity_matches_transformers(smollm2_models):
    ours, hf, tok = smollm2_models
    windows = token_windows(tokenize(tok, embedded_text("heldout")), 256, max_windows=6)
    result = perplexity(ours, windows, batch_size=3, progress=False)
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            t = torch.as_tensor(w[None]).long()
            nll += hf(t, labels=t).loss.item()  # mean over the window's seqlen-1 predicted tokens
    ref = float(np.exp(nll / len(windows)))
    assert result["tokens"] == 6 * 255 and result["windows"] == 6
    assert abs(result["perplexity"] - ref) / ref < 1e-3
    assert 5 < ref < 100  # a real model on real English text
