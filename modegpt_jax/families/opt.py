"""OPT (``model_type`` ``opt``), pre-LayerNorm variants only: LayerNorm, ReLU/GELU MLP with biases, learned
absolute positions (offset 2), no RoPE."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.families.base import Family, NameMap


def config(hf: dict[str, Any]) -> ModelConfig:
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


NAMES = NameMap(
    layer_prefix="model.decoder.layers.{i}.",
    layer_modules={
        "attn_norm": "self_attn_layer_norm",
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.out_proj",
        "mlp_norm": "final_layer_norm",
        "mlp.up_proj": "fc1",
        "mlp.down_proj": "fc2",
    },
    top={
        "embed_tokens": "model.decoder.embed_tokens.weight",
        "embed_positions": "model.decoder.embed_positions.weight",
        "final_norm": "model.decoder.final_layer_norm",
        "lm_head": "lm_head",
    },
)

FAMILY = Family("opt", config, NAMES, "OPTForCausalLM", width_key="ffn_dim")
