"""Phi-3 and Phi-3.5 (``model_type`` ``phi3``): the Llama layout with two fused projections in the checkpoint,
``self_attn.qkv_proj`` (queries, keys, values stacked along the output) and ``mlp.gate_up_proj`` (gate, then up),
LongRoPE scaling (``longrope``; ``su`` in older configs) in the long-context variants, and an optional sliding
window on every layer.

The fused tensors are split on import into the separate projections the method compresses, and fused again when
an export keeps the stock ``Phi3ForCausalLM`` (the remote-code model of other exports takes them apart). With
LongRoPE the decoder uses the short factors, so sequences stay within ``original_max_position_embeddings``
(:func:`modegpt_jax.families.base.rope_fields`). Refused: ``partial_rotary_factor`` below 1 (Phi-4-mini)."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.families.base import LLAMA_NAMES, Family, llama_like


def config(hf: dict[str, Any]) -> ModelConfig:
    hf = dict(hf)
    for key in ("rope_parameters", "rope_scaling"):  # transformers reads the older names as longrope
        scaling = hf.get(key) or {}
        if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
            hf[key] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope"}
    window = hf.get("sliding_window")
    return llama_like(hf, qkv_bias=False, o_bias=False, mlp_bias=False,
                      windows=[window] * int(hf["num_hidden_layers"]))


def fused(cfg: ModelConfig, spec: LayerSpec) -> dict[str, tuple[tuple[str, int], ...]]:
    q, kv = cfg.num_heads * spec.qk_dim, cfg.num_kv_heads * spec.qk_dim
    return {
        "self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv),
                               ("self_attn.v_proj", cfg.num_kv_heads * spec.vo_dim)),
        "mlp.gate_up_proj": (("mlp.gate_proj", spec.mlp_width), ("mlp.up_proj", spec.mlp_width)),
    }


FAMILY = Family("phi3", config, LLAMA_NAMES, "Phi3ForCausalLM", fused=fused)
