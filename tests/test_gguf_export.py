"""GGUF export for llama.cpp (``modegpt export-gguf``): tensors laid out as llama.cpp's own converter writes them,
attention padded back to the full head dimension without changing a logit."""

import json
import shutil

import numpy as np
import pytest

from converters.gguf_export import interleave_pairs, pad_heads, padding_cost
from converters.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, fields_from_hf, pre_tokenizer_name
from converters.hf_import import HFCheckpoint
from modegpt_jax.errors import UserError
from tests.test_cli_errors import assert_user_error, run_cli

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")


def test_padding_puts_every_kept_pair_back_in_its_place():
    rows = np.arange(2 * 6).reshape(2 * 6, 1).astype(np.float32)  # 2 heads of 6 kept channels (3 pairs)
    padded = pad_heads(rows, 2, 6, 10, [[0, 2, 4]], group_size=2)[:, 0]
    assert padded.tolist() == [0, 0, 1, 0, 2, 3, 0, 4, 0, 5] + [6, 0, 7, 0, 8, 9, 0, 10, 0, 11]
    assert interleave_pairs(np.arange(8.0).reshape(8, 1), 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.real_model
def test_dense_export_has_the_source_files_tensors_and_tokenizer(smollm2, tmp_path):
    from converters.gguf_export import write_gguf
    from converters.resolve import embedded_model_file

    source = embedded_model_file("smollm2-135m")
    info = write_gguf(smollm2.load_model(), tmp_path / "dense.gguf", tokenizer_gguf=source, tensor_type="f32")
    assert info["padding"]["attention_params_restored"] == 0
    ours, theirs = gguf.GGUFReader(info["path"]), gguf.GGUFReader(source)
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:  # the source's quantised values, dequantised, are exactly the model's weights
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(mine[t.name].data).reshape(expected.shape), expected, err_msg=t.name)
    for key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


@pytest.mark.real_model
def test_compressed_export_gives_the_same_logits_through_another_reader(smollm2, tmp_path):
    """A compressed model with narrower key-query and value-output heads, padded back: transformers' own GGUF
    reader (independent of this project) computes the JAX model's logits."""
    from transformers import AutoModelForCausalLM

    from modegpt_jax.pipeline import CompressionSettings, compress
    from tests.test_cli_compress import make_tiny_with_tokenizer

    ckpt = HFCheckpoint(make_tiny_with_tokenizer(tmp_path / "tiny", smollm2, layers=2))
    calib = np.random.default_rng(0).integers(0, ckpt.config.vocab_size, (16, 32)).astype(np.int32)
    model, _ = compress(ckpt, calib, CompressionSettings(ratio=0.3, allocation="uniform", attention_scale=1.0),
                        progress=False)
    specs = model.config.layers
    assert all(s.qk_dim < 16 and s.vo_dim < 16 for s in specs) and len({s.mlp_width for s in specs}) == 1
    from converters.gguf_export import write_gguf
    from converters.resolve import embedded_model_file

    info = write_gguf(model, tmp_path / "out" / "m.gguf", tokenizer_gguf=embedded_model_file("smollm2-135m"),
                      tensor_type="f32")
    assert info["padding"] == padding_cost(model.config, 4) and info["padding"]["attention_params_restored"] > 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, ckpt.config.vocab_size, (2, 17))
    with torch.no_grad():
        reference = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens)), reference, atol=1e-4, rtol=0)


@pytest.mark.real_model
def test_export_gguf_command(tiny_compressed, tmp_path):
    _, compressed = tiny_compressed
    # no report naming an embedded source and no tokenizer.json: the tokenizer must be named
    bare = tmp_path / "bare"
    shutil.copytree(compressed, bare)
    (bare / "tokenizer.json").unlink()
    assert_user_error(run_cli("export-gguf", "--model", str(bare), "--output", str(tmp_path / "a.gguf")),
                      "--tokenizer-gguf")
    from converters.resolve import embedded_model_file

    out = tmp_path / "m.gguf"
    proc = run_cli("export-gguf", "--model", str(compressed), "--output", str(out), "--type", "q8_0",
                   "--tokenizer-gguf", str(embedded_model_file("smollm2-135m")))
    assert proc.returncode == 0, proc.stderr
    assert "attention padded back" in proc.stdout and "--attention-scale 0" in proc.stdout
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    widths = [s.mlp_width for s in HFCheckpoint(compressed).config.layers]
    assert reader.fields[f"{arch}.feed_forward_length"].contents() == (widths if arch == "deci" else widths[0])
    assert (arch == "deci") == (len(set(widths)) > 1) and ("`deci`" in proc.stdout) == (arch == "deci")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    # widths that are no multiple of 32 stay f16, and the command says so
    assert types["blk.0.ffn_down.weight"] == ("F16" if widths[0] % 32 else "Q8_0")
    assert ("written f16" in proc.stdout) == any(w % 32 for w in widths)
    assert_user_error(run_cli("export-gguf", "--model", str(compressed), "--output", str(out), "--tokenizer-gguf",
                              str(embedded_model_file("smollm2-135m"))), "exists")


def test_unsupported_families_and_types_are_refused(tmp_path):
    from converters.gguf_export import write_gguf
    from tests.hf_models import make_hf_model, save_hf_model

    opt = HFCheckpoint(save_hf_model(make_hf_model("opt"), tmp_path / "opt")).load_model()
    with pytest.raises(UserError, match="GGUF export of 'opt' models is not supported yet"):
        write_gguf(opt, tmp_path / "o.gguf", tokenizer_gguf=tmp_path / "none.gguf", tensor_type="f32")
    with pytest.raises(UserError, match="llama-quantize FILE.gguf OUT.gguf Q4_K_M"):
        write_gguf(opt, tmp_path / "o.gguf", tokenizer_gguf=tmp_path / "none.gguf", tensor_type="q4_k_m")
    windowed = HFCheckpoint(save_hf_model(make_hf_model("mistral_sliding_window"), tmp_path / "m")).load_model()
    with pytest.raises(UserError, match="sliding-window attention"):
        write_gguf(windowed, tmp_path / "m.gguf", tokenizer_gguf=tmp_path / "none.gguf", tensor_type="f32")
    # Gemma 3 is written as llama.cpp's gemma3, which has one sliding-window size and a tanh GELU
    import dataclasses

    from converters.gguf_export import check_supported

    gemma = HFCheckpoint(save_hf_model(make_hf_model("gemma3"), tmp_path / "g")).config
    check_supported(gemma)
    layers = list(gemma.layers)
    layers[0] = dataclasses.replace(layers[0], sliding_window=7)
    for bad, what in ((dataclasses.replace(gemma, layers=tuple(layers)), "sliding windows of several sizes"),
                      (dataclasses.replace(gemma, activation="gelu"), "activation 'gelu'"),
                      (dataclasses.replace(gemma, embed_scale=2.0), "embedding scale")):
        with pytest.raises(UserError, match=what):
            check_supported(bad)
    # Phi-3: its own architecture (LongRoPE included), one MLP width
    phi3 = HFCheckpoint(save_hf_model(make_hf_model("phi3"), tmp_path / "p")).config
    check_supported(phi3)
    longrope = HFCheckpoint(save_hf_model(make_hf_model("phi3_longrope"), tmp_path / "pl")).config
    check_supported(longrope)  # llama.cpp's phi3 reads LongRoPE; its llama architecture does not
    with pytest.raises(UserError, match="RoPE scaling 'longrope'.*a non-default attention scale"):
        check_supported(dataclasses.replace(longrope, model_type="llama"))
    layers = list(phi3.layers)
    layers[0] = dataclasses.replace(layers[0], mlp_width=64)
    with pytest.raises(UserError, match="phi3 architecture takes one MLP width for all layers: compress with "
                                        "--allocation uniform"):
        check_supported(dataclasses.replace(phi3, layers=tuple(layers)))
    assert not list(tmp_path.glob("*.gguf*"))


def test_pre_tokenizers_are_named_as_llama_cpp_names_them(tmp_path):
    def split(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    assert pre_tokenizer_name({"pre_tokenizer": split(LLAMA3_SPLIT)}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": split(QWEN2_SPLIT)}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": split(r"\p{N}{1,2}")}) is None
    # refused, not guessed: an unknown split, and SentencePiece-style BPE with byte fallback
    vocab = {"a": 0, "b": 1}
    for model, pre, message in (({"type": "BPE", "vocab": vocab, "merges": []}, split(r"\p{N}{1,2}"), "pre-tokenizer"),
                                ({"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": True},
                                 {"type": "Metaspace"}, "byte fallback")):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model, "pre_tokenizer": pre}))
        with pytest.raises(UserError, match=message):
            fields_from_hf(tmp_path, 2)


def test_llama3_and_qwen_shaped_tokenizers_get_their_special_tokens(tmp_path):
    """BOS added where the post-processor's template starts with it (Llama 3: inside a Sequence), special ids from
    config.json where tokenizer_config.json has none (Qwen: bos_token null), the vocabulary padded to the model's."""
    def tokenizer(split, post):
        return {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
                "added_tokens": [{"id": 3, "content": "<s>", "special": True},
                                 {"id": 4, "content": "</s>", "special": True},
                                 {"id": 5, "content": "<tool>", "special": False}],
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
                "post_processor": post}

    llama3 = tmp_path / "llama3"
    llama3.mkdir()
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}]}
    (llama3 / "tokenizer.json").write_text(json.dumps(tokenizer(LLAMA3_SPLIT, {
        "type": "Sequence", "processors": [{"type": "ByteLevel"}, template]})))
    (llama3 / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    fields = {key: value for key, value, *_ in fields_from_hf(llama3, 8)}
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and fields["tokenizer.ggml.add_bos_token"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (3, 4)
    assert fields["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<s>", "</s>", "<tool>", "[PAD6]", "[PAD7]"]
    assert fields["tokenizer.ggml.token_type"] == [1, 1, 1, 3, 3, 4, 5, 5]
    assert fields["tokenizer.ggml.merges"] == ["a b"]

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "tokenizer.json").write_text(json.dumps(tokenizer(QWEN2_SPLIT, {"type": "ByteLevel"})))
    (qwen / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    (qwen / "config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": 4}))
    fields = {key: value for key, value, *_ in fields_from_hf(qwen, 6)}
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (3, 4)
    with pytest.raises(UserError, match="not this model's tokenizer"):
        fields_from_hf(qwen, 5)
