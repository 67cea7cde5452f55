"""Rotary position embeddings in the Hugging Face ``rotate_half`` layout, with per-group kept pairs.

Channel ``p`` of a head is paired with channel ``p + head_dim/2``; pair ``p`` rotates at ``inv_freq[p]``.
A compressed head keeps some pairs ``P = (p_1 < ... < p_k)`` and stores its channels as
``[p_1..p_k, p_1+dh/2..p_k+dh/2]``, so ``rotate_half`` on the compressed head still pairs the right
channels, and each pair rotates at its original frequency ``inv_freq[P]``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from modegpt_jax.config import LayerSpec, ModelConfig


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """``inv_freq`` [head_dim/2] in float32, including ``llama3``, ``linear`` and ``longrope`` scaling; ``local``: of a
    sliding-window layer in a model whose local layers have their own, unscaled base (Gemma 3)."""
    dim = cfg.head_dim
    local = local and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = None if local else cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if scaling["rope_type"] == "longrope":  # the short factors; attention_factor is in ModelConfig.attn_scale
        ramp = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        return (1.0 / (np.asarray(scaling["short_factor"], np.float32) * np.float32(theta) ** ramp)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def kept_pair_frequencies(cfg: ModelConfig, spec: LayerSpec) -> np.ndarray:
    """Per-KV-group frequencies [G, qk_dim/2] of a layer's kept pairs (all pairs for a dense layer)."""
    inv_freq = inverse_frequencies(cfg, local=spec.sliding_window is not None)
    if spec.rope_pairs is None:
        return np.ascontiguousarray(np.broadcast_to(inv_freq, (cfg.num_kv_heads, cfg.head_dim // 2)))
    return inv_freq[np.asarray(spec.rope_pairs, dtype=np.int64)]


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(positions: jnp.ndarray, freqs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [B, T, G, 2k] for positions [B, T] and per-group frequencies [G, k] (float32)."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, G, (n,) 2k]; cos/sin [B, T, G, 2k] broadcast over an optional per-group head axis."""
    if x.ndim == 5:
        cos, sin = cos[:, :, :, None], sin[:, :, :, None]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * cos + rotate_half(x) * sin
