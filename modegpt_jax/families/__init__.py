"""Architecture families: everything the project knows about one Hugging Face ``model_type``, one module each.

A family module defines a :class:`~modegpt_jax.families.base.Family` record named ``FAMILY``: the config
adapter (which refuses, with a message, the variants the decoder does not implement), the tensor names for
import and export, and the stock ``transformers`` class an export keeps when its shapes allow. Adding a family
is one new module here plus its tests; dispatch is on ``model_type`` only, never on a model's name.
"""

from __future__ import annotations

from typing import Any

from modegpt_jax.config import ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.families import gemma3, llama, mistral, opt, phi3, qwen2, qwen3
from modegpt_jax.families.base import SUPPORTED_ROPE_TYPES, Family, NameMap, hf_name

__all__ = ["FAMILIES", "SUPPORTED_ROPE_TYPES", "Family", "NameMap", "config_from_hf", "family", "hf_name"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                          gemma3.FAMILY, phi3.FAMILY, opt.FAMILY)}


def family(model_type: str | None) -> Family:
    """The record of ``model_type``, or a :class:`UserError` naming the supported ones."""
    record = FAMILIES.get(model_type)
    if record is None:
        raise UserError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return record


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our configuration from a Hugging Face ``config.json`` dict (dense, or compressed by modegpt-jax)."""
    model_type = hf.get("model_type")
    if model_type == "modegpt":  # exported by modegpt-jax: our own description is in the file
        cfg = ModelConfig.from_dict(hf["modegpt"])
        cfg.validate()
        return cfg
    record = family(model_type)
    try:
        cfg = record.config(hf)
    except KeyError as e:
        raise UserError(f"{model_type} configuration is missing the field {e.args[0]!r}") from None
    cfg.validate()
    return cfg
