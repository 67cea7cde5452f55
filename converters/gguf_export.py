"""Compressed (or dense) models as GGUF files for llama.cpp (``modegpt export-gguf``).

The attention head dimension of a GGUF model is one value for the whole model. A compressed attention is therefore
brought back to the full head dimension with zeros, which is exact: a zero query/key channel adds nothing to a
score, a zero value channel meets zero rows of the output projection, and the kept RoPE pairs go back to their
original positions, so the stock rotary embedding applies (each pair at its original frequency). What that costs is
reported (:func:`padding_cost`); MLP-only compression (``--attention-scale 0``) needs no padding. MLP widths may
differ per layer: llama.cpp's ``llama`` architecture reads one ``feed_forward_length`` for all layers, its ``deci``
architecture (the same Llama blocks, made for pruned Llamas) one per layer, so a model whose widths differ is
written as ``deci`` and one with a single width as ``llama`` (the architecture every tool built on llama.cpp knows).

Layout as llama.cpp's own converter writes it: tensors ``token_embd``, ``rope_freqs`` (Llama 3 / linear RoPE
scaling: the factor each pair's frequency is divided by), ``blk.{i}.attn_norm/attn_q/attn_k/attn_v/attn_output/
ffn_norm/ffn_gate/ffn_up/ffn_down`` (plus ``attn_q/k/v.bias`` and ``attn_output.bias`` where the model has them),
``output_norm``, ``output`` (left out when the embeddings are tied), PyTorch orientation (``[out, in]``), with the
query and key rows of each head reordered from the Hugging Face ``rotate_half`` layout to llama.cpp's adjacent pairs
(:func:`interleave_pairs`). The tokenizer is copied from a GGUF of the source model (the embedded models' own
files, or ``tokenizer_gguf``) or built from the model directory's SentencePiece tokenizer.model or its
tokenizer.json (:mod:`converters.gguf_tokenizer`).

Families: Llama, Mistral without a sliding window, Qwen2 (as ``llama`` / ``deci``); Qwen3, Gemma 3 and Phi-3 as
llama.cpp's own ``qwen3``, ``gemma3`` and ``phi3`` architectures, which read one MLP width for all layers (so:
uniform allocation) and, with q/k norms, one norm weight for all heads (so: key-query whole). Phi-3's gate and up
projections go in as one ``ffn_up`` (gate rows first); llama.cpp runs Phi-3 without its sliding window. Gemma 3
adds ``post_attention_norm`` / ``post_ffw_norm`` (its sandwich norms), norm weights written as ``1 + w`` (llama.cpp
multiplies by the weight itself), the layers' sliding
windows as a per-layer ``sliding_window_pattern`` with the local RoPE base ``rope.freq_base_swa``, and a softmax
scale other than llama.cpp's folded into the query norm's weight. Tested in llama.cpp itself (llama-cpp-python,
tests/test_llamacpp.py): logits and greedy generation equal the JAX model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError

#: Our model_types whose blocks are Llama blocks in llama.cpp (written as ``llama``, or ``deci`` when the MLP widths
#: differ between layers).
FAMILIES = ("llama", "mistral", "qwen2")
#: Families with an architecture of their own in llama.cpp that reads one MLP width for all layers and one q/k norm
#: weight for all heads: written only when every layer has the same MLP width and key-query is whole.
OWN_ARCHITECTURE = {"qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}
#: The MLP activation each architecture computes (llama.cpp's GELU is the tanh approximation).
ACTIVATION = {"gemma3": "gelu_pytorch_tanh"}
#: Tensor types written directly with the ``gguf`` package's quantisers (matrices only; norms and biases stay
#: float32). A matrix whose rows are not a whole number of 32-value blocks (a compressed width that is not a
#: multiple of 32) is written f16, as llama.cpp's converter does; ``--width-multiple 32`` at compression avoids that.
#: In 4- and 5-bit files the token embeddings and the output layer are q8_0 (llama-quantize too keeps the output
#: layer at a higher precision, q6_k, which the ``gguf`` package cannot write).
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
#: Types llama.cpp has that the ``gguf`` package cannot write: made from the f16 file with llama-quantize.
QUANTIZE_ONLY = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl",
                 "iq4_xs")


def interleave_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows ``[c_0 .. c_{d/2-1}, c_{d/2} .. c_{d-1}]`` (``rotate_half`` pairs ``(p, p + d/2)``) reordered
    to ``[c_0, c_{d/2}, c_1, c_{d/2+1}, ...]`` (adjacent pairs, llama.cpp's rotary layout)."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, 2, d // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def pad_heads(rows: np.ndarray, heads: int, width: int, full: int, pairs: list[list[int]] | None,
              group_size: int = 1) -> np.ndarray:
    """Rows of ``heads`` heads of ``width`` channels placed into heads of ``full`` channels, zeros elsewhere.

    With ``pairs`` (RoPE; one list per KV group, ``group_size`` query heads each) the kept pair ``t`` of a head
    goes back to channels ``pairs[t]`` and ``pairs[t] + full/2``; without, the ``width`` channels fill the first
    positions (value-output: any fixed place is exact)."""
    rows = rows.reshape(heads, width, *rows.shape[1:])
    out = np.zeros((heads, full, *rows.shape[2:]), rows.dtype)
    for h in range(heads):
        if pairs is None:
            out[h, :width] = rows[h]
        else:
            kept = np.asarray(pairs[h // group_size])
            out[h, kept] = rows[h, : width // 2]
            out[h, kept + full // 2] = rows[h, width // 2:]
    return out.reshape(heads * full, *rows.shape[2:])


def padding_cost(config: ModelConfig, bytes_per_value: float) -> dict[str, Any]:
    """Attention parameters and KV-cache values per token that the padding restores, against the compressed
    model; zero for MLP-only compression."""
    params = kv = 0
    for spec in config.layers:
        qk_missing = config.head_dim - spec.qk_dim
        vo_missing = config.head_dim - spec.vo_dim
        params += config.hidden_size * ((config.num_heads + config.num_kv_heads) * qk_missing
                                        + 2 * config.num_kv_heads * vo_missing)
        kv += config.num_kv_heads * (qk_missing + vo_missing)
    return {"attention_params_restored": params, "kv_cache_values_per_token_restored": kv,
            "bytes_restored": int(params * bytes_per_value)}


def _layer_tensors(config: ModelConfig, i: int, spec: LayerSpec, get) -> Iterator[tuple[str, np.ndarray]]:
    """The GGUF tensors of block ``i``; ``get(name)`` returns our parameter in PyTorch orientation. Query/key rows
    are reordered to adjacent pairs for the Llama architectures; ``qwen3`` rotates Hugging Face's halves itself."""
    H, G, dh = config.num_heads, config.num_kv_heads, config.head_dim
    offset = 1.0 if config.norm == "rms_offset" else 0.0  # Gemma stores x * (1 + w); llama.cpp computes x * w

    def norm(name: str, scale: float = 1.0) -> np.ndarray:
        return ((get(name) + offset) * scale).astype(np.float32)

    if architecture(config) in ("llama", "deci"):
        interleave = interleave_pairs  # the others rotate Hugging Face's halves (NEOX) themselves
    else:
        def interleave(rows, heads):
            return rows
    pairs = None if spec.rope_pairs is None else [list(p) for p in spec.rope_pairs]
    if pairs is None and spec.qk_dim < dh:
        raise UserError(f"layer {i}: key-query of width {spec.qk_dim} without its kept RoPE pairs")
    full_pairs = pairs if pairs is not None else [list(range(dh // 2))] * G
    prefix = f"model.layers.{i}.self_attn."
    q = pad_heads(get(prefix + "q_proj.weight"), H, spec.qk_dim, dh, full_pairs, H // G)
    k = pad_heads(get(prefix + "k_proj.weight"), G, spec.qk_dim, dh, full_pairs)
    v = pad_heads(get(prefix + "v_proj.weight"), G, spec.vo_dim, dh, None)
    o = pad_heads(get(prefix + "o_proj.weight").T, H, spec.vo_dim, dh, None).T
    yield f"blk.{i}.attn_norm.weight", norm(f"model.layers.{i}.input_layernorm.weight")
    yield f"blk.{i}.attn_q.weight", interleave(q, H)
    yield f"blk.{i}.attn_k.weight", interleave(k, G)
    yield f"blk.{i}.attn_v.weight", v
    if config.qkv_bias:  # padded like the rows they belong to
        yield f"blk.{i}.attn_q.bias", interleave(pad_heads(get(prefix + "q_proj.bias"), H, spec.qk_dim, dh,
                                                           full_pairs, H // G), H)
        yield f"blk.{i}.attn_k.bias", interleave(pad_heads(get(prefix + "k_proj.bias"), G, spec.qk_dim, dh,
                                                           full_pairs), G)
        yield f"blk.{i}.attn_v.bias", pad_heads(get(prefix + "v_proj.bias"), G, spec.vo_dim, dh, None)
    yield f"blk.{i}.attn_output.weight", np.ascontiguousarray(o)
    if config.o_bias:  # a compressed value-output with value biases carries them here
        yield f"blk.{i}.attn_output.bias", get(prefix + "o_proj.bias")
    if config.qk_norm:  # one weight of head_dim for all heads (check_supported: key-query whole)
        # the query norm comes right before RoPE (linear) and llama.cpp's softmax scale: the model's own scale is
        # that scale times this factor
        yield f"blk.{i}.attn_q_norm.weight", norm(prefix + "q_norm.weight", softmax_scale_factor(config))
        yield f"blk.{i}.attn_k_norm.weight", norm(prefix + "k_norm.weight")
    prefix = f"model.layers.{i}."
    if config.sandwich_norms:
        yield f"blk.{i}.post_attention_norm.weight", norm(prefix + "post_attention_layernorm.weight")
        yield f"blk.{i}.ffn_norm.weight", norm(prefix + "pre_feedforward_layernorm.weight")
    else:
        yield f"blk.{i}.ffn_norm.weight", norm(prefix + "post_attention_layernorm.weight")
    if architecture(config) == "phi3":  # one matrix: silu(first half) * second half
        yield f"blk.{i}.ffn_up.weight", np.concatenate([get(prefix + "mlp.gate_proj.weight"),
                                                        get(prefix + "mlp.up_proj.weight")])
    else:
        yield f"blk.{i}.ffn_gate.weight", get(prefix + "mlp.gate_proj.weight")
        yield f"blk.{i}.ffn_up.weight", get(prefix + "mlp.up_proj.weight")
    yield f"blk.{i}.ffn_down.weight", get(prefix + "mlp.down_proj.weight")
    if config.sandwich_norms:
        yield f"blk.{i}.post_ffw_norm.weight", norm(prefix + "post_feedforward_layernorm.weight")


def softmax_scale_factor(config: ModelConfig) -> float:
    """The model's attention softmax scale over the one llama.cpp applies (``gemma3``: ``1/sqrt(head_dim)``, or
    ``1/sqrt(hidden / heads)`` for its 62-layer 27B), folded into the query norm; 1 where they agree."""
    if config.attn_scale is None:
        return 1.0
    own = (config.hidden_size / config.num_heads if config.num_layers == 62 else config.head_dim) ** -0.5
    return float(config.attn_scale / own)


def check_supported(config: ModelConfig) -> None:
    """Refuse, in one line, a model whose blocks the llama.cpp architecture it would be written as does not compute."""
    if config.model_type not in FAMILIES + tuple(OWN_ARCHITECTURE):
        raise UserError(f"GGUF export of {config.model_type!r} models is not supported yet (supported: "
                        f"{', '.join(FAMILIES + tuple(OWN_ARCHITECTURE))})")
    arch = OWN_ARCHITECTURE.get(config.model_type)
    own = arch is not None
    if own and (len({s.mlp_width for s in config.layers}) > 1 or (config.qk_norm and any(
            s.qk_dim < config.head_dim for s in config.layers))):
        flags = {"gemma3": "--allocation uniform (key-query stays whole with the default --qk-norm-mode whole)",
                 "phi3": "--allocation uniform"}.get(arch, "--allocation uniform --attention-scale 0")
        limits = "one MLP width for all layers" + (" and whole key-query heads (one q/k norm weight)"
                                                   if config.qk_norm else "")
        raise UserError(f"llama.cpp's {arch} architecture takes {limits}: compress with {flags} for a GGUF file")
    scaling = (config.rope_scaling or {}).get("rope_type")
    gemma = arch == "gemma3"
    longrope = arch == "phi3" and _longrope(config) is not None  # llama.cpp's: both factor sets, attention factor
    windows = {spec.sliding_window for spec in config.layers} - {None}
    activation = ACTIVATION.get(arch, "silu")
    unsupported = {
        "an output-projection bias": own and config.o_bias,
        f"RoPE scaling {scaling!r} in this architecture": own and config.rope_scaling is not None and not (
            (gemma and scaling == "linear") or longrope),
        "MLP biases": config.mlp_bias,
        f"activation {config.activation!r}": config.activation != activation,
        f"RoPE scaling {scaling!r}": scaling not in (None, "llama3", "linear") and not longrope,
        "sliding-window attention": bool(windows) and arch not in ("gemma3", "phi3"),
        "sliding windows of several sizes": len(windows) > 1,
        "a non-default attention scale": config.attn_scale is not None and not gemma and not (
            longrope and math.isclose(config.attn_scale, config.rope_scaling["attention_factor"] ** 2
                                      / math.sqrt(config.head_dim), rel_tol=1e-6)),
        "q/k norms, sandwich norms or scaled embeddings": not gemma and (
            (config.qk_norm and not own) or config.sandwich_norms or config.embed_scale is not None),
        "an embedding scale other than sqrt(hidden size)": gemma and (
            config.embed_scale is None or abs(config.embed_scale - config.hidden_size ** 0.5) > 1e-6),
        "a model without sandwich norms or q/k norms": gemma and not (config.sandwich_norms and config.qk_norm),
        "norm weights not stored as offsets from 1": gemma and config.norm != "rms_offset",
        "offset norms": not gemma and config.norm == "rms_offset",
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise UserError(f"GGUF export of this {config.model_type} model: {', '.join(found)} not supported yet")


def _longrope(config: ModelConfig) -> dict | None:
    """The LongRoPE scaling entry (both factor sets, the original and long lengths), else None."""
    return config.rope_scaling if (config.rope_scaling or {}).get("rope_type") == "longrope" else None


def rope_frequency_factors(config: ModelConfig) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3 / linear RoPE scaling: the factor each pair's unscaled
    frequency is divided by; None without scaling."""
    import dataclasses

    from modegpt_jax.rope import inverse_frequencies

    if config.rope_scaling is None:
        return None
    plain = inverse_frequencies(dataclasses.replace(config, rope_scaling=None))
    return (plain / inverse_frequencies(config)).astype(np.float32)


def architecture(config: ModelConfig) -> str:
    """The family's own llama.cpp architecture (:data:`OWN_ARCHITECTURE`); else ``llama`` when every layer has the
    same MLP width, ``deci`` (reads one width per layer) when they differ."""
    if config.model_type in OWN_ARCHITECTURE:
        return OWN_ARCHITECTURE[config.model_type]
    return "llama" if len({spec.mlp_width for spec in config.layers}) == 1 else "deci"


def gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of ``model`` (a :class:`~modegpt_jax.model.Transformer`) under its llama.cpp name, float32,
    attention padded back to the full head dimension."""
    from converters.hf_export import model_entries

    config = model.config
    check_supported(config)
    entries = {e.name: e for e in model_entries(model)}

    def get(name: str) -> np.ndarray:
        return np.asarray(entries[name].load(), np.float32)

    yield "token_embd.weight", get("model.embed_tokens.weight")
    factors = rope_frequency_factors(config) if architecture(config) in ("llama", "deci") else None
    if factors is not None:
        yield "rope_freqs.weight", factors
    longrope = _longrope(config)  # (phi3 only: check_supported)
    for length in ("long", "short") if longrope is not None else ():
        yield f"rope_factors_{length}.weight", np.asarray(longrope[f"{length}_factor"], np.float32)
    for i, spec in enumerate(config.layers):
        yield from _layer_tensors(config, i, spec, get)
    yield "output_norm.weight", get("model.norm.weight") + (1.0 if config.norm == "rms_offset" else 0.0)
    if not config.tie_word_embeddings:
        yield "output.weight", get("lm_head.weight")


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file of the embedded model a compressed directory was made from (its ``report.json``), if any."""
    from converters.resolve import EMBEDDED_MODELS, embedded_model_file

    report = Path(model_dir) / "report.json"
    if report.is_file():
        name = json.loads(report.read_text()).get("model")
        if name in EMBEDDED_MODELS:
            return embedded_model_file(name)
    return None


def check_type(tensor_type: str) -> None:
    """Refuse a type this writer does not write, naming the llama-quantize command that makes it."""
    if tensor_type not in TYPES:
        made = (f"write f16 and run llama.cpp's `llama-quantize FILE.gguf OUT.gguf {tensor_type.upper()}`"
                if tensor_type in QUANTIZE_ONLY else f"llama-quantize types: {', '.join(QUANTIZE_ONLY)}")
        raise UserError(f"type {tensor_type!r} is not written here (written: {', '.join(TYPES)}); {made}",
                        argument="type")


def _quantised(name: str, array: np.ndarray, tensor_type: str):
    """``(data, raw type or None, type written)`` of one tensor in a ``tensor_type`` file."""
    import gguf

    if array.ndim == 1 or tensor_type == "f32":
        return np.ascontiguousarray(array, np.float32), None, "f32"
    if tensor_type in ("q4_0", "q4_1", "q5_0", "q5_1") and name in ("token_embd.weight", "output.weight"):
        tensor_type = "q8_0"
    quant = gguf.GGMLQuantizationType[tensor_type.upper()]
    block = gguf.GGML_QUANT_SIZES[quant][0]
    if tensor_type == "f16" or array.shape[-1] % block:  # quantisation blocks run along rows
        return array.astype(np.float16), None, "f16"
    return gguf.quants.quantize(array, quant), quant, tensor_type


def write_gguf(model, output: str | Path, *, tokenizer_gguf: str | Path | None = None,
               tokenizer_dir: str | Path | None = None, tensor_type: str = "f16",
               name: str | None = None) -> dict[str, Any]:
    """Write ``model`` as a GGUF file with the tokenizer of ``tokenizer_gguf`` (a GGUF of the source model) or,
    without one, of ``tokenizer_dir``'s tokenizer.model or tokenizer.json; returns what was written (architecture,
    types, sizes, the padding's cost)."""
    import gguf

    from converters.gguf_tokenizer import fields_from_gguf, fields_from_hf, hf_tokenizer_file

    check_type(tensor_type)
    config: ModelConfig = model.config
    check_supported(config)
    if tokenizer_gguf is not None:
        tokenizer_fields, source = fields_from_gguf(tokenizer_gguf), tokenizer_gguf
    elif tokenizer_dir is not None:
        tokenizer_fields = fields_from_hf(tokenizer_dir, config.vocab_size)
        source = hf_tokenizer_file(tokenizer_dir)
    else:
        raise UserError("a GGUF file needs the tokenizer: give a GGUF of the source model or a directory with a "
                        "tokenizer.model or tokenizer.json")
    tensors = list(gguf_tensors(model))  # checks the family first
    arch = architecture(config)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # renamed into place once complete
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_name(name or "modegpt-jax compressed model")
    writer.add_block_count(config.num_layers)
    longrope = _longrope(config)
    # LongRoPE: the long length, and the original one up to which llama.cpp takes the short factors
    writer.add_context_length(config.max_position_embeddings if longrope is None
                              else longrope["max_position_embeddings"])
    writer.add_embedding_length(config.hidden_size)
    widths = [spec.mlp_width for spec in config.layers]
    writer.add_feed_forward_length(widths if arch == "deci" else widths[0])
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if longrope is not None:
        writer.add_rope_scaling_orig_ctx_len(longrope["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(longrope["attention_factor"])  # multiplies cos and sin, as ours
    elif config.rope_scaling is not None and arch not in ("llama", "deci"):  # those take it as rope_freqs
        # gemma3 (check_supported: linear): the global layers' positions scaled, the sliding ones' not
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    windows = [spec.sliding_window for spec in config.layers]
    if arch == "gemma3" and any(w is not None for w in windows):  # one window size, a pattern per layer
        writer.add_sliding_window(int(next(w for w in windows if w is not None)))
        writer.add_key_value(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch),
                             [w is not None for w in windows], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.BOOL)
        writer.add_rope_freq_base_swa(float(config.local_rope_theta or config.rope_theta))
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(tensor_type, "MOSTLY_" + tensor_type.upper())])
    for key, value, kind, sub in tokenizer_fields:
        writer.add_key_value(key, value, kind, sub_type=sub)
    kept_f16, written = [], {}
    for tname, array in tensors:
        data, raw, kind = _quantised(tname, array, tensor_type)
        writer.add_tensor(tname, data, raw_dtype=raw)
        written[tname] = kind
        if kind == "f16" and tensor_type not in ("f16", "bf16"):
            kept_f16.append(tname)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out)
    finally:
        writer.close()  # idempotent; frees the file on an error
        partial.unlink(missing_ok=True)
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor_type.upper()]]
    per_value = block_bytes / block
    notes = []
    if arch == "phi3" and any(w is not None for w in windows):
        notes.append(f"llama.cpp runs Phi-3 without its sliding window ({windows[0]} tokens), as every Phi-3 GGUF: "
                     "the same logits as the model up to that many tokens of context")
    return {"path": str(out), "architecture": arch, "tokenizer": str(source), "type": tensor_type, "notes": notes,
            "bytes": out.stat().st_size, "kept_f16": kept_f16, "tensor_types": written, "feed_forward_length": widths,
            "padding": padding_cost(config, per_value)}
