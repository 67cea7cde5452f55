"""Architecture families: one small adapter per Hugging Face ``model_type``, mostly data.

An adapter turns a Hugging Face ``config.json`` (as a dict) into our :class:`ModelConfig`, and refuses the
variants we do not implement with a message that says so. Dispatch is on ``model_type`` only, never on a
model's name.
"""

from __future__ import annotations

from typing import Any, Callable

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
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
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
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
    return float(theta), scaling


def _head_dim(hf: dict[str, Any]) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _llama_like(hf: dict[str, Any], *, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                windows: list[int | None]) -> ModelConfig:
    theta, scaling = _rope(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise UserError(f"activation {act!r} is not supported")
    head_dim = _head_dim(hf)
    d_int = int(hf["intermediate_size"])
    return ModelConfig(
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=head_dim,
        intermediate_size=d_int,
        layers=tuple(LayerSpec(d_int, head_dim, head_dim, None, w) for w in windows),
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=act,
        gated_mlp=True,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        use_rope=True,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )


def _llama(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return _llama_like(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                       windows=[None] * int(hf["num_hidden_layers"]))


def _mistral(hf: dict[str, Any]) -> ModelConfig:
    window = hf.get("sliding_window")
    return _llama_like(hf, qkv_bias=False, o_bias=False, mlp_bias=False,
                       windows=[window] * int(hf["num_hidden_layers"]))


def _qwen2(hf: dict[str, Any]) -> ModelConfig:
    n = int(hf["num_hidden_layers"])
    windows: list[int | None] = [None] * n
    layer_types = hf.get("layer_types")
    if layer_types is None and hf.get("use_sliding_window"):
        start = int(hf.get("max_window_layers", n))
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    if layer_types is not None:
        windows = [hf.get("sliding_window") if t == "sliding_attention" else None for t in layer_types]
    return _llama_like(hf, qkv_bias=True, o_bias=False, mlp_bias=False, windows=windows)


def _opt(hf: dict[str, Any]) -> ModelConfig:
    if not hf.get("do_layer_norm_before", True):
        raise UserError(
            "OPT with do_layer_norm_before=False (post-LayerNorm, e.g. opt-350m) is not supported; "
            "only pre-LayerNorm OPT models are"
        )
    if hf.get("_remove_final_layer_norm", False):
        raise UserError("OPT with _remove_final_layer_norm=True is not supported")
    d = int(hf["hidden_size"])
    if int(hf.get("word_embed_proj_dim", d)) != d:
        raise UserError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
        raise UserError("OPT without biases or without LayerNorm affine parameters is not supported")
    act = hf.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise UserError(f"OPT activation {act!r} is not supported")
    heads = int(hf["num_attention_heads"])
    head_dim = d // heads
    d_int = int(hf["ffn_dim"])
    max_pos = int(hf.get("max_position_embeddings", 2048))
    return ModelConfig(
        model_type="opt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=d,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=d_int,
        layers=tuple(LayerSpec(d_int, head_dim, head_dim) for _ in range(int(hf["num_hidden_layers"]))),
        norm="layer",
        norm_eps=1e-5,
        activation=act,
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        use_rope=False,
        learned_positions=max_pos + 2,
        position_offset=2,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=max_pos,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )


FAMILIES: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "opt": _opt,
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our configuration from a Hugging Face ``config.json`` dict (dense, or compressed by modegpt-jax)."""
    model_type = hf.get("model_type")
    if model_type == "modegpt":  # exported by modegpt-jax: our own description is in the file
        cfg = ModelConfig.from_dict(hf["modegpt"])
        cfg.validate()
        return cfg
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise UserError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    try:
        cfg = adapter(hf)
    except KeyError as e:
        raise UserError(f"{model_type} configuration is missing the field {e.args[0]!r}") from None
    cfg.validate()
    return cfg
