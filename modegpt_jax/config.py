"""Model configuration: one architecture-neutral description of a decoder, with per-layer widths.

The dense model and every compressed model share this description. What compression changes is per layer:

- ``mlp_width``: the MLP intermediate width (kept channels of up/gate, rows of down);
- ``qk_dim``: the kept query/key channels per head (the same count for every KV group of a layer);
- ``rope_pairs``: for each KV group, the *original* RoPE pair index of every kept channel pair, so the
  compressed attention rotates each kept pair at its original frequency;
- ``vo_dim``: the value/output width per head.

The softmax scale always uses the original ``head_dim``: it belongs to the model, not to a layer's width.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from modegpt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Widths of one decoder block. ``rope_pairs is None`` means all pairs, in their original order."""

    mlp_width: int
    qk_dim: int
    vo_dim: int
    rope_pairs: tuple[tuple[int, ...], ...] | None = None
    sliding_window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_pairs is not None:
            d["rope_pairs"] = [list(p) for p in self.rope_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        pairs = d.get("rope_pairs")
        return cls(
            mlp_width=int(d["mlp_width"]),
            qk_dim=int(d["qk_dim"]),
            vo_dim=int(d["vo_dim"]),
            rope_pairs=None if pairs is None else tuple(tuple(int(i) for i in p) for p in pairs),
            sliding_window=d.get("sliding_window"),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax model needs; built from a Hugging Face config by ``modegpt_jax.families``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    layers: tuple[LayerSpec, ...]
    norm: str = "rms"  # "rms", "rms_offset" (Gemma: weight stored as an offset from 1) or "layer"
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-head RMSNorm of queries and keys over the head dimension, before RoPE (Qwen3, Gemma 3). In a layer whose
    # key-query is compressed (qk_dim < head_dim) the norm runs over the kept channels, with a weight per head
    # (``per_head_qk_norm``); see ``modegpt_jax.block_compression.corrected_qk_norms``.
    qk_norm: bool = False
    # Norms after the attention and MLP outputs too, before the residual adds (Gemma 3).
    sandwich_norms: bool = False
    # Token embeddings multiplied by this (Gemma: sqrt(hidden_size), rounded to the parameter dtype).
    embed_scale: float | None = None
    # Softmax scale of the attention scores; None: 1/sqrt(head_dim) (Gemma 3: 1/sqrt(query_pre_attn_scalar)).
    attn_scale: float | None = None
    # RoPE base of the sliding-window layers, unscaled; None: the same as the global layers (Gemma 3: 10000).
    local_rope_theta: float | None = None
    use_rope: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Learned absolute positions (OPT): table size and the index offset of position 0.
    learned_positions: int = 0
    position_offset: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __hash__(self) -> int:  # rope_scaling is a dict; the model's static graph needs a hashable config
        return hash(self.to_json())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_dense(self) -> bool:
        return all(spec == self.dense_layer(spec.sliding_window) for spec in self.layers)

    def per_head_qk_norm(self, spec: LayerSpec) -> bool:
        """Whether a layer's q/k norms hold one weight per head (``[H or G, qk_dim]``) instead of one shared
        ``[head_dim]``: in layers whose key-query is compressed under q/k norms."""
        return self.qk_norm and spec.qk_dim < self.head_dim

    def dense_layer(self, sliding_window: int | None = None) -> LayerSpec:
        return LayerSpec(self.intermediate_size, self.head_dim, self.head_dim, None, sliding_window)

    def with_layers(self, layers: list[LayerSpec] | tuple[LayerSpec, ...]) -> ModelConfig:
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer specs, got {len(layers)}")
        return dataclasses.replace(self, layers=tuple(layers))

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.use_rope and self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for i, spec in enumerate(self.layers):
            if not (0 < spec.mlp_width <= self.intermediate_size):
                raise UserError(f"layer {i}: mlp_width={spec.mlp_width} outside (0, {self.intermediate_size}]")
            if not (0 < spec.qk_dim <= self.head_dim) or not (0 < spec.vo_dim <= self.head_dim):
                raise UserError(f"layer {i}: qk_dim/vo_dim must be in (0, head_dim={self.head_dim}]")
            if spec.rope_pairs is not None:
                if not self.use_rope:
                    raise UserError(f"layer {i}: rope_pairs given for a model without rotary embeddings")
                if len(spec.rope_pairs) != self.num_kv_heads or any(
                    len(p) * 2 != spec.qk_dim for p in spec.rope_pairs
                ):
                    raise UserError(f"layer {i}: rope_pairs must hold qk_dim/2 pair indices for each KV group")

    # -- serialisation (used by the compressed-model directory and the Hugging Face export) ---------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [spec.to_dict() for spec in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["layers"] = tuple(LayerSpec.from_dict(x) for x in d["layers"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
