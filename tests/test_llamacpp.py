"""Exported GGUF files run in llama.cpp itself (llama-cpp-python, built by the set-up): the logits and the greedy
continuation of the JAX model, per-layer MLP widths (``deci``), Qwen2 biases and Llama 3 RoPE scaling included."""

import numpy as np
import pytest

from converters.gguf_export import write_gguf
from converters.hf_import import HFCheckpoint
from converters.resolve import embedded_model_file
from modegpt_jax.pipeline import CompressionSettings, compress

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
pytestmark = pytest.mark.real_model  # the tokenizer comes from the embedded SmolLM2 GGUF


def llama_logits(path, windows: np.ndarray) -> np.ndarray:
    """llama.cpp's logits [B, T, V] for each token window (one context, cleared between windows)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, windows.shape[1]), n_batch=windows.shape[1],
                          logits_all=True, n_threads=2, verbose=False)
    out = []
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        out.append(np.array(llm.scores[: len(window)], np.float32))
    return np.stack(out)


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Within 1e-3 of the logit scale (llama.cpp computes in its own order, float32)."""
    scale = np.abs(ours).max()
    assert np.abs(ours - theirs).max() <= 1e-3 * scale, (np.abs(ours - theirs).max(), scale)


def tiny_hf(out, kind: str, vocab: int):
    import torch
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=kind != "llama3", max_position_embeddings=256)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6)
    else:
        extra = {}
        if kind == "llama3":
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(**common, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if kind == "qwen2":  # visible biases
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(out)
    return HFCheckpoint(out)


@pytest.mark.parametrize("kind, allocation, arch", [("llama", "bi", "deci"), ("llama", "uniform", "llama"),
                                                    ("qwen2", "bi", "deci"), ("llama3", "uniform", "llama")])
def test_tiny_compressed_models_give_our_logits_in_llamacpp(smollm2, tmp_path, kind, allocation, arch):
    ckpt = tiny_hf(tmp_path / kind, kind, smollm2.config.vocab_size)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, ckpt.config.vocab_size, (16, 32)).astype(np.int32)
    settings = CompressionSettings(ratio=0.3, allocation=allocation, attention_scale=1.0,
                                   allocation_eps=0.01)  # a spread of MLP widths even on random weights
    model, _ = compress(ckpt, calib, settings, progress=False)
    specs = model.config.layers
    assert any(s.qk_dim < 16 for s in specs) and any(s.vo_dim < 16 for s in specs)  # padded in the file
    assert (len({s.mlp_width for s in specs}) > 1) == (arch == "deci")
    info = write_gguf(model, tmp_path / "m.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                      tensor_type="f32")
    assert info["architecture"] == arch and ("rope_freqs.weight" in info["tensor_types"]) == (kind == "llama3")
    tokens = rng.integers(0, ckpt.config.vocab_size, (2, 100 if kind == "llama3" else 24))  # past 64: scaled
    assert_logits_close(np.asarray(model(tokens)), llama_logits(info["path"], tokens))


@pytest.fixture(scope="module")
def smollm2_compressed(smollm2, tmp_path_factory):
    """SmolLM2 at 0.3 (block-influence allocation: per-layer MLP widths; widths multiple of 32, so that every
    matrix quantises) and its f32, q8_0 and q4_1 files."""
    from modegpt_jax.calibration import calibration_windows

    tokenizer = smollm2.load_tokenizer()
    calib = calibration_windows(tokenizer, "wikipedia", 32, 256, seed=0)
    model, _ = compress(smollm2, calib, CompressionSettings(ratio=0.3, width_multiple=32), progress=False)
    root = tmp_path_factory.mktemp("smollm2_gguf")
    files = {t: write_gguf(model, root / f"m.{t}.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                           tensor_type=t) for t in ("f32", "q8_0", "q4_1")}
    return model, tokenizer, files


def test_compressed_smollm2_runs_in_llamacpp(smollm2_compressed):
    from modegpt_jax.decoding import generate

    model, tokenizer, files = smollm2_compressed
    assert files["f32"]["architecture"] == "deci" and not files["q4_1"]["kept_f16"]
    prompt = np.asarray([tokenizer.encode("The capital of France is Paris. The river that flows through it is")])
    assert_logits_close(np.asarray(model(prompt)), llama_logits(files["f32"]["path"], prompt))
    ours = np.asarray(generate(model, prompt, 20))[0, prompt.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=files["f32"]["path"], n_ctx=128, n_threads=2, verbose=False)
    theirs = []
    for token in llm.generate(prompt[0].tolist(), temp=0.0, top_k=1):
        theirs.append(int(token))
        if len(theirs) == 20:
            break
    assert theirs == ours, (tokenizer.decode(theirs), tokenizer.decode(ours))


def test_quantised_smollm2_files_keep_the_perplexity(smollm2_compressed):
    """Held-out perplexity of the f32, q8_0 and q4_1 files in llama.cpp (printed): f32 is the JAX figure, q8_0
    within 1 %, q4_1 within 25 %."""
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    model, tokenizer, files = smollm2_compressed
    windows = token_windows(tokenize(tokenizer, embedded_text("heldout")), 256, 4)
    figures = {}
    for kind, info in files.items():
        logits = llama_logits(info["path"], windows)[:, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
        figures[kind] = float(np.exp(nll))
    ours = perplexity(model, windows, progress=False)["perplexity"]
    print(f"held-out perplexity (4 x 256 tokens): JAX {ours:.3f}, llama.cpp " +
          ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    assert abs(figures["f32"] / ours - 1) < 1e-3
    assert abs(figures["q8_0"] / figures["f32"] - 1) < 0.01
    assert 1 <= figures["q4_1"] / figures["f32"] < 1.25
