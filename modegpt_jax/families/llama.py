"""Llama 2 and 3 (``model_type`` ``llama``; also SmolLM2): optional attention and MLP biases, llama3/linear RoPE
scaling."""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.families.base import LLAMA_NAMES, Family, llama_like


def config(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return llama_like(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                      windows=[None] * int(hf["num_hidden_layers"]))


FAMILY = Family("llama", config, LLAMA_NAMES, "LlamaForCausalLM")
