"""Hugging Face <-> modegpt-jax parameter names, per family, as data.

Our parameter paths are the NNX state paths of :class:`modegpt_jax.model.Transformer`, e.g.
``layers.3.attn.q_proj.kernel``. One table per family maps our module names to Hugging Face module names;
the same table serves import and export. ``kernel`` leaves are stored ``[in, out]`` here and
``[out, in]`` (``nn.Linear.weight``) in PyTorch, so they are transposed on the way.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NameMap:
    layer_prefix: str  # Hugging Face prefix of block i, with {i}
    layer_modules: dict[str, str]  # our module path inside a block -> HF module path inside a layer
    top: dict[str, str]  # our top-level module or parameter -> HF name (module, or tensor for bare params)


_LLAMA_LAYER = {
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

LLAMA = NameMap(
    layer_prefix="model.layers.{i}.",
    layer_modules=_LLAMA_LAYER,
    top={"embed_tokens": "model.embed_tokens.weight", "final_norm": "model.norm", "lm_head": "lm_head"},
)

OPT = NameMap(
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

NAME_MAPS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "opt": OPT}

_LEAF = {"kernel": "weight", "weight": "weight", "bias": "bias"}


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
