"""Gemma 3 text models (``model_type`` ``gemma3_text``; ``Gemma3ForCausalLM``, e.g. gemma-3-270m and 1b).

Beyond the Llama layout: RMSNorm weights stored as offsets from 1 (``x * (1 + w)``), norms after the attention and
MLP outputs too (``post_attention_layernorm``, ``post_feedforward_layernorm``; the MLP's input norm is
``pre_feedforward_layernorm``), per-head q/k norms before RoPE, token embeddings scaled by ``sqrt(hidden)``, a
GeGLU MLP (tanh GELU), softmax scale ``1/sqrt(query_pre_attn_scalar)``, and sliding-window local layers with their
own unscaled RoPE base interleaved with global layers. The embeddings are tied.

As in Qwen3, the q/k norms cover the whole head dimension, so key-query stays whole. Refused: logit soft-capping
(Gemma 2, not Gemma 3) and bidirectional attention (the embedding variants)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.families.base import Family, NameMap, layer_windows, llama_like


def _rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The global layers' RoPE fields (as :func:`~modegpt_jax.families.base.rope_fields` reads them) and the
    local layers' base, from the per-layer-type ``rope_parameters`` of transformers v5 or the older fields."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(hf.get("rope_scaling") or {}), **params}
        local = {}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    if local.get("rope_type", "default") != "default":
        raise UserError(f"gemma3_text: local layers with rope type {local['rope_type']!r} are not supported")
    local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    return {"rope_parameters": full, "max_position_embeddings": hf.get("max_position_embeddings")}, local_theta


def config(hf: dict[str, Any]) -> ModelConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UserError(f"gemma3_text with {key}={hf[key]} is not supported (Gemma 3 has none)")
    if hf.get("use_bidirectional_attention"):
        raise UserError("gemma3_text with use_bidirectional_attention=True (an embedding model) is not supported")
    rope, local_theta = _rope(hf)
    cfg = llama_like({**hf, **rope, "tie_word_embeddings": hf.get("tie_word_embeddings", True)},
                     qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
                     mlp_bias=False, windows=layer_windows(hf), qk_norm=True,
                     activation=hf.get("hidden_activation", "gelu_pytorch_tanh"))
    return dataclasses.replace(cfg, norm="rms_offset", sandwich_norms=True, embed_scale=math.sqrt(cfg.hidden_size),
                               attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                               local_rope_theta=local_theta)


NAMES = NameMap(
    layer_prefix="model.layers.{i}.",
    layer_modules={
        "attn_norm": "input_layernorm",
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.o_proj",
        "attn.q_norm": "self_attn.q_norm",
        "attn.k_norm": "self_attn.k_norm",
        "attn_post_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
        "mlp_post_norm": "post_feedforward_layernorm",
    },
    top={"embed_tokens": "model.embed_tokens.weight", "final_norm": "model.norm", "lm_head": "lm_head"},
)

FAMILY = Family("gemma3_text", config, NAMES, "Gemma3ForCausalLM")
