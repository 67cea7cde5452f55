"""The embedded Gemma 3 270M (``gemma3-270m``, a Q4_K_M GGUF dequantised to float32): the published architecture,
and logits and perplexity that agree with transformers' PyTorch model."""

import numpy as np
import pytest

from modegpt_jax.perplexity import tokenize, token_windows
from modegpt_jax.wikipedia import embedded_text

torch = pytest.importorskip("torch")
# Slow: loading the real model takes a minute; CI runs these in `make test-slow`.
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma3():
    from transformers import AutoModelForCausalLM

    from converters.hf_import import HFCheckpoint

    ckpt = HFCheckpoint("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(ckpt.directory, dtype=torch.float32).eval()
    return ckpt, ckpt.load_model(), hf, ckpt.load_tokenizer()


def test_config_is_the_published_architecture(gemma3):
    cfg = gemma3[0].config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("gemma3_text", 18, 640, 2048)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 1, 256, 262144)
    # five local (sliding-window, RoPE base 10000) layers, then one global (base 1e6), repeated
    assert [s.sliding_window for s in cfg.layers[:6]] == [512] * 5 + [None]
    assert (cfg.local_rope_theta, cfg.rope_theta, cfg.attn_scale) == (10000.0, 1_000_000.0, 256**-0.5)
    assert cfg.norm == "rms_offset" and cfg.sandwich_norms and cfg.qk_norm and cfg.tie_word_embeddings


def test_logits_and_perplexity_match_transformers(gemma3):
    _, ours, hf, tok = gemma3
    text = "The Eiffel Tower was completed in 1889 and remains one of the most visited monuments in Paris."
    ids = np.asarray([tok(text)["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), ref, atol=1e-3, rtol=0)
    assert np.mean(np.argmax(ref[0, :-1], -1) == ids[0, 1:]) > 0.2  # a language model, not noise

    windows = token_windows(tokenize(tok, embedded_text("heldout")), 128, 2)  # 2 held-out windows of 128
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.as_tensor(windows)).logits.double(), -1).numpy()
    mine = np.asarray(ours(windows), np.float64)
    top = mine.max(-1, keepdims=True)
    mine = mine - top - np.log(np.exp(mine - top).sum(-1, keepdims=True))
    nll = [-np.take_along_axis(lp[:, :-1], windows[:, 1:, None], -1).mean() for lp in (mine, ref)]
    assert abs(np.exp(nll[0]) / np.exp(nll[1]) - 1) < 1e-3, nll


def test_compressed_export_loads_in_transformers_and_generates(gemma3, tmp_path):
    """The real model compressed with key-query under its q/k norms (per-head norms, the remote-code export)."""
    from converters.hf_export import save_model
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.pipeline import CompressionSettings, compress
    from tests.test_export import load_in_clean_process

    ckpt, _, _, tok = gemma3
    calib = calibration_windows(tok, "wikipedia", 8, 256, 0)
    settings = CompressionSettings(ratio=0.3, qk_norm_mode="corrected", attention_scale=0.5, bi_samples=4)
    model, report = compress(ckpt, calib, settings, progress=False)
    assert any(spec.qk_dim < 256 for spec in model.config.layers)
    out = save_model(model, tmp_path / "export", base_hf_config=ckpt.hf_config, tokenizer_dir=ckpt.directory)
    ids = np.asarray([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    result, logits = load_in_clean_process(out, ids, tmp_path)
    assert result["class"] == "ModeGPTForCausalLM" and result["generate_equals_greedy"]
    assert result["params"] == report["params_after"]
    np.testing.assert_allclose(logits, np.asarray(model(ids)), atol=2e-4, rtol=0)


def test_uniform_compression_runs_in_llamacpp(gemma3, tmp_path):
    """Compressed with one MLP width and key-query whole (what llama.cpp's gemma3 architecture holds), value-output
    compressed and padded back: the GGUF gives our logits in llama.cpp and continues the text as we do."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make test`")
    from converters import llamacpp
    from converters.gguf_export import write_gguf
    from converters.resolve import embedded_model_file
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.decoding import generate
    from modegpt_jax.pipeline import CompressionSettings, compress

    ckpt, _, _, tok = gemma3
    calib = calibration_windows(tok, "wikipedia", 8, 256, 0)
    model, _ = compress(ckpt, calib, CompressionSettings(ratio=0.3, allocation="uniform"), progress=False)
    specs = model.config.layers
    assert len({s.mlp_width for s in specs}) == 1 and all(s.qk_dim == 256 for s in specs)
    assert any(s.vo_dim < 256 for s in specs)
    info = write_gguf(model, tmp_path / "g.gguf", tokenizer_gguf=embedded_model_file("gemma3-270m"),
                      tensor_type="f32")
    assert info["architecture"] == "gemma3"
    ids = np.asarray([tok("The Eiffel Tower was completed in 1889 and remains one of the most visited monuments "
                          "in Paris. It was designed by")["input_ids"]])
    ours = np.asarray(model(ids))
    theirs = llamacpp.logits(info["path"], ids, kv_f32=True)
    # within 2e-3 of the logit scale (the AVX2 build `make` installs gave 1.03e-3, a native build under 1e-3);
    # llama.cpp's CPU GELU (a float16 table) is most of what differs. A wrong tensor moves logits by units.
    assert np.abs(ours - theirs).max() <= 2e-3 * np.abs(ours).max(), np.abs(ours - theirs).max()
    steps = 12
    expected = np.asarray(generate(model, ids, steps))[0, ids.shape[1]:].tolist()
    assert llamacpp.greedy(info["path"], ids[0].tolist(), steps) == expected
