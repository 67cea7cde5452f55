"""Mistral (``model_type`` ``mistral``): Llama names and shapes, one sliding window for every layer."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.families.base import LLAMA_NAMES, Family, llama_like


def config(hf: dict[str, Any]) -> ModelConfig:
    window = hf.get("sliding_window")
    return llama_like(hf, qkv_bias=False, o_bias=False, mlp_bias=False,
                      windows=[window] * int(hf["num_hidden_layers"]))


FAMILY = Family("mistral", config, LLAMA_NAMES, "MistralForCausalLM")
