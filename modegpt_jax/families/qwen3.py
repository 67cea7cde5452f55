"""Qwen3 (``model_type`` ``qwen3``): Qwen2's layout plus a per-head RMSNorm of the queries and keys before RoPE
(``q_norm``, ``k_norm``, over the head dimension), ``head_dim`` independent of ``hidden_size / heads``, and one
``attention_bias`` for q/k/v/o (off in the released models).

The q/k norms are taken over the whole head dimension, so dropping RoPE pairs would change every kept channel's
normalisation: key-query is left whole in this family (:attr:`ModelConfig.qk_norm`), and the allocation gives
its share of the budget to value-output and the MLP."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.families.base import LLAMA_LAYER, LLAMA_NAMES, Family, NameMap, layer_windows, llama_like


def config(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return llama_like(hf, qkv_bias=bias, o_bias=bias, mlp_bias=False, windows=layer_windows(hf), qk_norm=True)


NAMES = NameMap(
    layer_prefix=LLAMA_NAMES.layer_prefix,
    layer_modules={**LLAMA_LAYER, "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"},
    top=LLAMA_NAMES.top,
)

FAMILY = Family("qwen3", config, NAMES, "Qwen3ForCausalLM")
