"""What a family record holds, and the pieces that several families share (RoPE fields, the Llama-style config,
the Llama tensor names)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Hugging Face <-> modegpt-jax parameter names. Our parameter paths are the NNX state paths of
    :class:`modegpt_jax.model.Transformer` (e.g. ``layers.3.attn.q_proj.kernel``); the same table serves import
    and export. ``kernel`` leaves are ``[in, out]`` here and ``[out, in]`` (``nn.Linear.weight``) in PyTorch,
    so they are transposed on the way."""

    layer_prefix: str  # Hugging Face prefix of block i, with {i}
    layer_modules: dict[str, str]  # our module path inside a block -> HF module path inside a layer
    top: dict[str, str]  # our top-level module or parameter -> HF name (module, or tensor for bare params)


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the project knows about one Hugging Face ``model_type``.

    ``config`` turns a ``config.json`` dict into a :class:`ModelConfig` and refuses, with a :class:`UserError`
    that says why, the variants the decoder does not implement. ``names`` maps tensor names both ways.
    ``stock_architecture`` is the ``transformers`` class an export keeps when the compressed shapes still fit it
    (one MLP width for every layer, attention untouched), with the MLP width under ``width_key``; other exports
    use the remote-code model shipped with them (``converters/remote_code``), which reads everything it needs
    (norms, biases, q/k norms, sandwich norms, embedding scale, windows and per-layer RoPE frequencies) from the
    exported description, not from the family's name."""

    model_type: str
    config: Callable[[dict[str, Any]], ModelConfig]
    names: NameMap
    stock_architecture: str
    width_key: str = "intermediate_size"
    # Checkpoints that store several of a layer's projections as one tensor (Phi-3's ``qkv_proj``): for a layer's
    # configuration, each fused module inside a layer -> its parts (the modules ``names`` gives), in order along
    # the output dimension, with their output sizes. Import splits them; a stock export fuses them again.
    fused: Callable[[ModelConfig, LayerSpec], dict[str, tuple[tuple[str, int], ...]]] | None = None


def hf_name(name_map: NameMap, path: tuple) -> tuple[str, bool]:
    """(Hugging Face tensor name, transpose?) for one of our parameter paths."""
    parts = [str(p) for p in path]
    if parts[0] == "layers":
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        prefix = name_map.layer_prefix.format(i=parts[1])
        return f"{prefix}{name_map.layer_modules[module]}.{_LEAF[leaf]}", leaf == "kernel"
    if len(parts) == 1:  # a bare parameter such as the embedding table
        return name_map.top[parts[0]], False
    module, leaf = ".".join(parts[:-1]), parts[-1]
    return f"{name_map.top[module]}.{_LEAF[leaf]}", leaf == "kernel"


_LEAF = {"kernel": "weight", "weight": "weight", "bias": "bias"}


def fused_tensors(record: Family, config: ModelConfig, layer: int, leaf: str) -> dict[str, list[tuple[str, int]]]:
    """Hugging Face names of block ``layer``'s fused tensors (``leaf``: ``weight`` or ``bias``), each with its
    parts' names and output sizes in order (:attr:`Family.fused`); empty for families without fused tensors."""
    if record.fused is None:
        return {}
    prefix = record.names.layer_prefix.format(i=layer)
    return {f"{prefix}{module}.{leaf}": [(f"{prefix}{part}.{leaf}", rows) for part, rows in parts]
            for module, parts in record.fused(config, config.layers[layer]).items()}

LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}

LLAMA_NAMES = NameMap(
    layer_prefix="model.layers.{i}.",
    layer_modules=LLAMA_LAYER,
    top={"embed_tokens": "model.embed_tokens.weight", "final_norm": "model.norm", "lm_head": "lm_head"},
)


def rope_fields(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Rotary parameters from either the transformers v5 ``rope_parameters`` or the older fields."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in merged.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise UserError(f"llama3 rope scaling needs {key!r} in the configuration")
    if rope_type == "longrope":
        scaling = _longrope(hf, scaling, head_dim(hf))
    return float(theta), scaling


def _longrope(hf: dict[str, Any], scaling: dict[str, Any], dh: int) -> dict[str, Any]:
    """LongRoPE (Phi-3's ``longrope``, formerly ``su``), as ``transformers`` computes it: pair ``p`` rotates at
    ``inv_freq[p] / short_factor[p]``, and cos/sin are multiplied by ``attention_factor``, which scales the
    attention scores by its square (folded into :attr:`ModelConfig.attn_scale` by :func:`llama_like`).

    ``transformers`` switches to ``long_factor`` once a sequence passes ``original_max_position_embeddings``;
    this decoder keeps the short factors, so a model's usable length is that original length (set as its
    ``max_position_embeddings``). The long factors and the long length are kept for GGUF files, where llama.cpp
    picks the factors by the context size it is given."""
    original = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None:
        raise UserError("longrope scaling needs 'original_max_position_embeddings' in the configuration")
    for key in ("short_factor", "long_factor"):
        if len(scaling.get(key) or ()) != dh // 2:
            raise UserError(f"longrope scaling needs {key!r}: a list of head_dim/2 = {dh // 2} numbers")
    factor = scaling.get("factor") or hf["max_position_embeddings"] / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return {"rope_type": "longrope", "short_factor": [float(x) for x in scaling["short_factor"]],
            "long_factor": [float(x) for x in scaling["long_factor"]],
            "original_max_position_embeddings": int(original), "attention_factor": float(attention_factor),
            "max_position_embeddings": int(hf.get("max_position_embeddings") or original)}


def head_dim(hf: dict[str, Any]) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def layer_windows(hf: dict[str, Any]) -> list[int | None]:
    """Sliding window of every layer from ``layer_types`` or, in older configs, ``use_sliding_window`` with
    ``max_window_layers`` (Qwen2, Qwen3): ``None`` for full attention."""
    n = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types")
    if layer_types is None and hf.get("use_sliding_window"):
        start = int(hf.get("max_window_layers", n))
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    if layer_types is None:
        return [None] * n
    return [hf.get("sliding_window") if t == "sliding_attention" else None for t in layer_types]


def llama_like(hf: dict[str, Any], *, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
               windows: list[int | None], qk_norm: bool = False, activation: str | None = None) -> ModelConfig:
    """A pre-RMSNorm decoder with a gated MLP and RoPE (Llama, Mistral, Qwen2, Qwen3; Gemma 3 adds to it)."""
    theta, scaling = rope_fields(hf)
    act = activation or hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise UserError(f"activation {act!r} is not supported")
    dh = head_dim(hf)
    d_int = int(hf["intermediate_size"])
    longrope = scaling if scaling is not None and scaling["rope_type"] == "longrope" else None
    return ModelConfig(
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=dh,
        intermediate_size=d_int,
        layers=tuple(LayerSpec(d_int, dh, dh, None, w) for w in windows),
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=act,
        gated_mlp=True,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        use_rope=True,
        rope_theta=theta,
        rope_scaling=scaling,
        attn_scale=None if longrope is None else longrope["attention_factor"] ** 2 / math.sqrt(dh),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048) if longrope is None
                                    else longrope["original_max_position_embeddings"]),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
