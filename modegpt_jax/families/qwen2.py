"""Qwen2 and Qwen2.5 (``model_type`` ``qwen2``): biases on q/k/v (not o), sliding windows on the upper layers
when enabled."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.families.base import LLAMA_NAMES, Family, layer_windows, llama_like


def config(hf: dict[str, Any]) -> ModelConfig:
    return llama_like(hf, qkv_bias=True, o_bias=False, mlp_bias=False, windows=layer_windows(hf))


FAMILY = Family("qwen2", config, LLAMA_NAMES, "Qwen2ForCausalLM")
