"""Exported GGUF files run in llama.cpp itself (llama-cpp-python, built by the set-up): the logits and the greedy
continuation of the JAX model, per-layer MLP widths (``deci``), Qwen2 biases and Llama 3 RoPE scaling included."""

import numpy as np
import pytest

from converters import gguf_export, llamacpp
from converters.gguf_export import write_gguf
from converters.hf_import import HFCheckpoint
from converters.resolve import embedded_model_file
from modegpt_jax.pipeline import CompressionSettings, compress

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make test`")
pytestmark = pytest.mark.real_model  # the tokenizer comes from the embedded SmolLM2 GGUF


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest logit difference over the logit scale."""
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Within 1e-3 of the logit scale (llama.cpp computes in its own order, float32)."""
    assert relative_error(ours, theirs) <= 1e-3, relative_error(ours, theirs)


def gelu_as_llamacpp_cpu(x):
    """The tanh GELU as ggml's CPU backend computes it: ``gelu(float16(x))`` rounded to float16 (a table of all
    float16 inputs), 0 at or below -10, ``x`` at or above 10."""
    import jax
    import jax.numpy as jnp

    half = x.astype(jnp.float16).astype(jnp.float32)
    table = jax.nn.gelu(half, approximate=True).astype(jnp.float16).astype(x.dtype)
    return jnp.where(x <= -10.0, 0.0, jnp.where(x >= 10.0, x, table))


def tiny_hf(out, kind: str, vocab: int, qk_std: float | None = 0.1):
    """A tiny random model of ``kind`` (llama, llama3: Llama 3 RoPE scaling, qwen2: visible q/k/v biases) with
    SmolLM2's vocabulary; ``qk_std``: query/key weights drawn wider than the default, so that attention is sharp
    enough for positions (RoPE) and biases to show in the logits."""
    import torch
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=kind != "llama3", max_position_embeddings=256)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=16)
    elif kind == "phi3":  # its window is longer than the test's windows: llama.cpp runs Phi-3 without one
        config = transformers.Phi3Config(**common, sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif kind == "phi3_longrope":  # short factors up to 256 positions, long factors past them, attention factor
        # (llama.cpp rounds its context up to a multiple of 256 and picks the factors by that context)
        config = transformers.Phi3Config(
            **{**common, "max_position_embeddings": 2048}, original_max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, sliding_window=None,
            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                 short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.1],
                                 long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]))
    elif kind == "gemma3":  # a softmax scale of its own, sliding windows (5) with their RoPE base, linear scaling
        config = transformers.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    else:
        extra = {}
        if kind == "llama3":
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(**common, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if kind.startswith("phi3") and qk_std is not None:  # one qkv_proj: its query and key rows
                q_and_k = (config.num_attention_heads + config.num_key_value_heads) * 16
                layer.self_attn.qkv_proj.weight[:q_and_k].normal_(0, qk_std)
                continue
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                if qk_std is not None:
                    proj.weight.normal_(0, qk_std)
            if kind == "qwen2":
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        if kind == "gemma3":  # every norm its own weights (zeros by default), so each must land in its place
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.normal_(0, 0.3)
    model.save_pretrained(out)
    return HFCheckpoint(out)


@pytest.mark.parametrize("kind, allocation, arch", [("llama", "bi", "deci"), ("llama", "uniform", "llama"),
                                                    ("qwen2", "bi", "deci"), ("llama3", "uniform", "llama"),
                                                    ("qwen3", "uniform", "qwen3"),
                                                    ("gemma3", "uniform", "gemma3"), ("phi3", "uniform", "phi3"),
                                                    ("phi3_longrope", "uniform", "phi3")])
def test_tiny_compressed_models_give_our_logits_in_llamacpp(smollm2, tmp_path, monkeypatch, kind, allocation, arch):
    ckpt = tiny_hf(tmp_path / kind, kind, smollm2.config.vocab_size)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, ckpt.config.vocab_size, (16, 32)).astype(np.int32)
    settings = CompressionSettings(ratio=0.3, allocation=allocation, attention_scale=0.0 if arch == "qwen3" else 1.0,
                                   allocation_eps=0.01)  # a spread of MLP widths even on random weights
    model, _ = compress(ckpt, calib, settings, progress=False)
    specs = model.config.layers
    if kind in ("qwen3", "gemma3"):  # q/k norms: key-query whole
        assert all(s.mlp_width < 128 and s.qk_dim == 16 for s in specs)
    else:  # padded in the file
        assert any(s.qk_dim < 16 for s in specs) and any(s.vo_dim < 16 for s in specs)
    if kind == "gemma3":  # value-output compressed and padded back
        assert any(s.vo_dim < 16 for s in specs)
    assert (len({s.mlp_width for s in specs}) > 1) == (arch == "deci")
    info = write_gguf(model, tmp_path / "m.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                      tensor_type="f32")
    assert info["architecture"] == arch and ("rope_freqs.weight" in info["tensor_types"]) == (kind == "llama3")
    assert ("rope_factors_short.weight" in info["tensor_types"]) == (kind == "phi3_longrope")
    assert bool(info["notes"]) == (kind == "phi3")  # the window llama.cpp leaves out is said
    tokens = rng.integers(0, ckpt.config.vocab_size, (2, 100 if kind == "llama3" else 24))
    ours = np.asarray(model(tokens))
    theirs = llamacpp.logits(info["path"], tokens, kv_f32=True)  # a float16 KV cache alone costs ~2e-4
    if kind == "gemma3":
        # llama.cpp's CPU GELU reads a float16 table at the float16-rounded input (~5e-4 of the logit scale here);
        # with our GELU computed that way most of the difference goes (what stays: inputs that round to another
        # float16 than ours).
        assert_logits_close(ours, theirs)
        for layer in model.layers:
            layer.mlp.act = gelu_as_llamacpp_cpu
        emulated = np.asarray(model(tokens))
        assert relative_error(emulated, theirs) <= 0.5 * relative_error(ours, theirs)
    else:  # the same arithmetic in float32: the file holds exactly our model
        assert relative_error(ours, theirs) <= 1e-5, relative_error(ours, theirs)
    if kind == "llama3":  # the rope_freqs tensor is what makes it match
        monkeypatch.setattr(gguf_export, "rope_frequency_factors", lambda config: None)
        plain = write_gguf(model, tmp_path / "plain.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                           tensor_type="f32")
        assert relative_error(ours, llamacpp.logits(plain["path"], tokens, kv_f32=True)) > 1e-2
    if kind == "phi3_longrope":
        # the factor tensors are what make it match: without them llama.cpp rotates at the plain frequencies
        written = gguf_export.gguf_tensors
        monkeypatch.setattr(gguf_export, "gguf_tensors", lambda m: ((name, array) for name, array in written(m)
                                                                   if not name.startswith("rope_factors")))
        plain = write_gguf(model, tmp_path / "plain.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                           tensor_type="f32")
        assert relative_error(ours, llamacpp.logits(plain["path"], tokens, kv_f32=True)) > 1e-2
        monkeypatch.undo()
        # Past the original 256 positions transformers takes the long factors, and so does llama.cpp given a
        # longer context: the dense model's file against transformers itself on 300 tokens.
        import torch
        import transformers

        dense = write_gguf(ckpt.load_model(), tmp_path / "dense.gguf",
                           tokenizer_gguf=embedded_model_file("smollm2-135m"), tensor_type="f32")
        long_tokens = rng.integers(0, ckpt.config.vocab_size, (1, 300))
        with torch.no_grad():
            hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.directory).eval()
            reference = hf(torch.as_tensor(long_tokens)).logits.float().numpy()
        theirs = llamacpp.logits(dense["path"], long_tokens, kv_f32=True)
        assert relative_error(reference, theirs) <= 1e-4, relative_error(reference, theirs)
        short = np.asarray(ckpt.load_model()(long_tokens))  # ours keeps the short factors: another model there
        assert relative_error(reference, short) > 1e-2


def test_qwen3_with_per_layer_widths_is_refused_with_the_settings_that_fit(smollm2, tmp_path):
    from modegpt_jax.errors import UserError

    ckpt = tiny_hf(tmp_path / "qwen3", "qwen3", smollm2.config.vocab_size)
    calib = np.random.default_rng(0).integers(0, ckpt.config.vocab_size, (16, 32)).astype(np.int32)
    model, _ = compress(ckpt, calib, CompressionSettings(ratio=0.3, allocation_eps=0.01), progress=False)
    assert len({s.mlp_width for s in model.config.layers}) > 1
    with pytest.raises(UserError, match="--allocation uniform --attention-scale 0"):
        write_gguf(model, tmp_path / "m.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"))
    assert not list(tmp_path.glob("*.gguf*"))


# The largest logit error over the logit scale of each type on the tiny model below, about twice what was measured
# (bf16 0.0034, q8_0 0.011, q5_1 0.047, q5_0 0.048, q4_1 0.089, q4_0 0.107); a wrong layout gives errors near 1.
QUANTISED_TOLERANCE = {"bf16": 1e-2, "q8_0": 2.5e-2, "q5_1": 0.1, "q5_0": 0.1, "q4_1": 0.2, "q4_0": 0.2}


def test_every_written_type_loads_and_computes_in_llamacpp(smollm2, tmp_path):
    ckpt = tiny_hf(tmp_path / "tiny", "llama", smollm2.config.vocab_size, qk_std=None)
    model = ckpt.load_model()
    tokens = np.random.default_rng(0).integers(0, ckpt.config.vocab_size, (1, 24))
    ours = np.asarray(model(tokens))
    errors = {}
    for kind, tolerance in QUANTISED_TOLERANCE.items():
        info = write_gguf(model, tmp_path / f"m.{kind}.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                          tensor_type=kind)
        assert info["tensor_types"]["blk.0.ffn_up.weight"] == kind
        expected_embedding = "q8_0" if kind[1] in "45" else kind
        assert info["tensor_types"]["token_embd.weight"] == expected_embedding
        errors[kind] = relative_error(ours, llamacpp.logits(info["path"], tokens))
    print("largest logit error / logit scale:", errors)
    assert all(errors[kind] <= tolerance for kind, tolerance in QUANTISED_TOLERANCE.items()), errors


@pytest.fixture(scope="module")
def smollm2_files(smollm2, smollm2_compressed, tmp_path_factory):
    """SmolLM2 at 0.3 (block-influence allocation: per-layer MLP widths, every one a multiple of 32) and its f32,
    q8_0 and q4_1 files."""
    model, _ = smollm2_compressed
    root = tmp_path_factory.mktemp("smollm2_gguf")
    files = {t: write_gguf(model, root / f"m.{t}.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                           tensor_type=t) for t in ("f32", "q8_0", "q4_1")}
    return model, smollm2.load_tokenizer(), files


@pytest.mark.slow  # with the next: a compression of the real model; CI runs them in `make test-slow`
def test_compressed_smollm2_runs_in_llamacpp(smollm2_files):
    from modegpt_jax.decoding import generate

    model, tokenizer, files = smollm2_files
    assert files["f32"]["architecture"] == "deci" and not files["q4_1"]["kept_f16"]
    assert files["q4_1"]["tensor_types"]["token_embd.weight"] == "q8_0"
    prompt = np.asarray([tokenizer.encode("The capital of France is Paris. The river that flows through it is")])
    assert_logits_close(np.asarray(model(prompt)), llamacpp.logits(files["f32"]["path"], prompt))
    ours = np.asarray(generate(model, prompt, 20))[0, prompt.shape[1]:].tolist()
    theirs = llamacpp.greedy(files["f32"]["path"], prompt[0].tolist(), 20)
    assert theirs == ours, (tokenizer.decode(theirs), tokenizer.decode(ours))


@pytest.mark.slow
def test_quantised_smollm2_files_keep_the_perplexity(smollm2_files):
    """Held-out perplexity of the f32, q8_0 and q4_1 files in llama.cpp (printed): f32 is the JAX figure, q8_0
    within 1 %, q4_1 within 25 %."""
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    model, tokenizer, files = smollm2_files
    windows = token_windows(tokenize(tokenizer, embedded_text("heldout")), 256, 4)
    figures = {kind: llamacpp.perplexity(info["path"], windows) for kind, info in files.items()}
    ours = perplexity(model, windows, progress=False)["perplexity"]
    print(f"held-out perplexity (4 x 256 tokens): JAX {ours:.3f}, llama.cpp " +
          ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    assert abs(figures["f32"] / ours - 1) < 1e-3
    assert abs(figures["q8_0"] / figures["f32"] - 1) < 0.01
    assert 1 <= figures["q4_1"] / figures["f32"] < 1.25


def test_tokenizer_built_from_tokenizer_json_tokenizes_like_transformers(smollm2, tmp_path):
    """Without a GGUF of the source, the tokenizer comes from the directory's tokenizer.json: the same tokens, types
    and merges as the published GGUF, and llama.cpp splits text into the ids transformers gives."""
    import gguf
    import llama_cpp

    ckpt = tiny_hf(tmp_path / "tiny", "llama", smollm2.config.vocab_size)
    info = write_gguf(ckpt.load_model(), tmp_path / "m.gguf", tokenizer_dir=smollm2.directory, tensor_type="f32")
    ours, source = gguf.GGUFReader(info["path"]), gguf.GGUFReader(embedded_model_file("smollm2-135m"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert ours.fields[key].contents() == source.fields[key].contents(), key
    text = "In 1879, Edison's lamp burned for 13.5 hours.\n\nCafé déjà-vu:  tabs\tand  spaces  ...  ok?"
    llm = llama_cpp.Llama(model_path=info["path"], vocab_only=True, verbose=False)
    expected = smollm2.load_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected


def test_sentencepiece_tokenizer_model_tokenizes_like_transformers(tmp_path):
    """A source with a SentencePiece tokenizer.model (Llama 2, Mistral, Gemma on the Hub): llama.cpp's ``llama``
    tokenizer with the pieces' scores, byte pieces and the dummy space prefix splits held-out text, multi-byte
    characters, newlines and runs of spaces into the ids transformers gives (BOS first, as tokenizer_config says),
    and chat markers that are pieces of the model (Gemma's kind) stay whole. llama.cpp puts SentencePiece's space
    before the text after a special token, as transformers' ``legacy`` Llama tokenizer (Llama 2's) does."""
    import json

    import llama_cpp
    import torch
    import transformers

    spm = pytest.importorskip("sentencepiece")
    from modegpt_jax.wikipedia import embedded_text

    directory = tmp_path / "model"
    lines = [line for line in embedded_text("calibration").split("\n") if line.strip()][:3000]
    directory.mkdir()
    turns = ["<start_of_turn>", "<end_of_turn>"]  # chat markers inside the model's pieces, as in Gemma's
    spm.SentencePieceTrainer.train(  # a Llama-2-style model: BPE with byte fallback, <unk> <s> </s> first
        sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"), vocab_size=1200, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, user_defined_symbols=turns,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    (directory / "tokenizer.vocab").unlink()
    turn_ids = [spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).piece_to_id(t)
                for t in turns]
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,  # as Llama 2 ships it
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in zip(turn_ids, turns)}}))
    config = transformers.LlamaConfig(vocab_size=1216, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    model = HFCheckpoint(directory).load_model()
    info = write_gguf(model, tmp_path / "m.gguf", tokenizer_dir=directory, tensor_type="f32")
    assert info["tokenizer"].endswith("tokenizer.model")

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    llm = llama_cpp.Llama(model_path=info["path"], vocab_only=True, verbose=False)
    assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, 1216)  # padded to the embedding's rows
    texts = [line for line in embedded_text("heldout").split("\n") if line.strip()][:100]
    texts += ["Café déjà-vu: 日本語 €5", "two  spaces\nand\n\nnewlines\tand tabs", "1879 and 13.5"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    chat = "<start_of_turn>user\nWhere is Paris?<end_of_turn>\n<start_of_turn>model\n"
    expected = tok(chat)["input_ids"]
    assert set(turn_ids) <= set(expected)  # each marker one token
    assert llm.tokenize(chat.encode(), add_bos=True, special=True) == expected
