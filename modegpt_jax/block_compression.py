"""One block's modules compressed: key-query CR selection and value-output SVD of the attention, Nystrom
selection of the MLP (from :mod:`modegpt_jax.decompose`, applied to the block's weights), and the compressed
modules zero-padded up to width buckets for the calibration passes (exact, so one compilation serves every layer
whose widths fall in the same bucket). :mod:`modegpt_jax.pipeline` decides when each runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modegpt_jax import decompose
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.mesh import to_host
from modegpt_jax.model import MLP, Attention, Block, Norm
from modegpt_jax.rope import kept_pair_frequencies


# -- decompositions applied to a block ------------------------------------------------------------------------
def _value(p) -> Any:
    return None if p is None else p[...]


def compress_attention(dense: Block, out_cfg: ModelConfig, spec: LayerSpec, C: np.ndarray, energy_q: np.ndarray,
                       energy_k: np.ndarray, *, precision64: bool | None = None) -> tuple[Attention, LayerSpec, dict]:
    """Key-query CR selection and value-output joint SVD of one block's attention; also returns the share of
    the CR score mass that was dropped. ``precision64``: as :func:`modegpt_jax.decompose.vo_svd`."""
    cfg = out_cfg
    attn = dense.attn
    channels, pairs = decompose.cr_qk_select(energy_q, energy_k, spec.qk_dim, rope=cfg.use_rope)
    if pairs is not None and spec.qk_dim < cfg.head_dim:  # keeping every pair is the dense layout (None)
        spec = dataclasses.replace(spec, rope_pairs=tuple(tuple(int(p) for p in row) for row in np.asarray(pairs)))
    qk = decompose.apply_qk_selection(
        attn.q_proj.kernel[...], attn.k_proj.kernel[...], channels, cfg.num_heads,
        b_q=_value(attn.q_proj.bias), b_k=_value(attn.k_proj.bias),
    )
    b_o = _value(attn.o_proj.bias)
    if attn.v_proj.bias is not None:  # fold the value bias exactly into the output bias, then drop it
        b_o = decompose.fold_value_bias(attn.v_proj.bias[...], attn.o_proj.kernel[...], b_o, cfg.num_heads,
                                        precision64=precision64)
    vo = decompose.vo_svd(C, attn.v_proj.kernel[...], attn.o_proj.kernel[...], spec.vo_dim, cfg.num_heads,
                          precision64=precision64)
    new = nnx.eval_shape(lambda: Attention(cfg, spec, dtype=attn.q_proj.kernel.dtype, rngs=nnx.Rngs(0)))
    new.q_proj.kernel.set_value(qk["w_q"])
    new.k_proj.kernel.set_value(qk["w_k"])
    new.v_proj.kernel.set_value(vo["w_v"])
    new.o_proj.kernel.set_value(vo["w_o"])
    if cfg.qkv_bias:
        new.q_proj.bias.set_value(qk["b_q"])
        new.k_proj.bias.set_value(qk["b_k"])
        new.v_proj.bias.set_value(jnp.asarray(np.zeros(new.v_proj.bias.shape, new.v_proj.bias.dtype)))
    if cfg.o_bias:
        new.o_proj.bias.set_value(b_o)
    if new.rope_freqs is not None:
        new.rope_freqs.set_value(jnp.asarray(kept_pair_frequencies(cfg, spec)))
    if cfg.per_head_qk_norm(spec):
        q_weight, k_weight = corrected_qk_norms(attn, cfg, np.asarray(channels), energy_q, energy_k)
        new.q_norm.weight.set_value(jnp.asarray(q_weight, new.q_norm.weight.dtype))
        new.k_norm.weight.set_value(jnp.asarray(k_weight, new.k_norm.weight.dtype))
    elif attn.q_norm is not None:  # key-query whole: the dense norms
        new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
    return new, spec, {"qk_score_dropped": qk_dropped_score(energy_q, energy_k, np.asarray(channels), cfg)}


def corrected_qk_norms(attn: Attention, cfg: ModelConfig, channels: np.ndarray, energy_q, energy_k
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-head q/k norm weights ``[H, qk]``, ``[G, qk]`` over the kept ``channels [G, qk]`` of each KV group.

    The dense norm divides a head's projection ``x`` by ``r = rms(x)`` over all ``dh`` channels; the compressed
    head only has its ``k`` kept channels and divides by ``r' = rms(x_kept)``, so each kept channel comes out
    ``s = r'/r`` times too large. With ``u = x / r`` (the normalised head before its weight),
    ``s^2 = mean_kept(u^2)``; its calibration mean, ``c^2 = (dh / k) sum_kept E[u_j^2] / sum_all E[u_j^2]``,
    follows from the post-norm energies ``E[(g_j u_j)^2]`` with the dense gains ``g`` (``1 + w`` for offset
    norms). The kept channels' gains times ``c`` are the new weights; ``c = 1`` when every channel is kept."""
    group = cfg.group_size
    dh = cfg.head_dim
    if attn.q_norm.weight.ndim != 1:
        raise UserError("key-query of this model was already compressed under its q/k norms (per-head norm "
                        "weights): compress the dense model instead", argument="qk_norm_mode")

    def weights(norm: Norm, energy, kept: np.ndarray) -> np.ndarray:
        w = to_host(norm.weight[...]).astype(np.float64)
        gain = 1.0 + w if cfg.norm == "rms_offset" else w
        energy = np.asarray(to_host(energy), np.float64)
        square = gain * gain
        unit = np.divide(energy, square, out=np.zeros_like(energy), where=square > 1e-12)  # E[u_j^2], up to N
        total = unit.sum(axis=1)
        kept_share = np.take_along_axis(unit, kept, axis=1).sum(axis=1) / np.where(total > 0, total, 1.0)
        c = np.where(total > 0, np.sqrt(kept_share * dh / kept.shape[1]), 1.0)
        new_gain = gain[kept] * c[:, None]
        return new_gain - 1.0 if cfg.norm == "rms_offset" else new_gain

    q_channels = np.repeat(channels, group, axis=0)  # query head h belongs to KV group h // group
    return weights(attn.q_norm, energy_q, q_channels), weights(attn.k_norm, energy_k, channels)


def compress_mlp(dense: Block, out_cfg: ModelConfig, spec: LayerSpec, C_s: np.ndarray, *,
                 alpha: float = decompose.DEFAULT_LEVERAGE_ALPHA, precision64: bool | None = None,
                 buckets: int = 16) -> tuple[MLP, jax.Array]:
    """Nystrom selection of the MLP's intermediate channels with a least-squares refit of the down projection
    (``alpha``, ``precision64``, ``buckets``: as :func:`modegpt_jax.decompose.nystrom_mlp`)."""
    mlp = dense.mlp
    res = decompose.nystrom_mlp(
        C_s, mlp.up_proj.kernel[...], mlp.down_proj.kernel[...], spec.mlp_width,
        w_gate=_value(mlp.gate_proj.kernel) if mlp.gate_proj is not None else None,
        b_up=_value(mlp.up_proj.bias), alpha=alpha, precision64=precision64, buckets=buckets,
    )
    new = nnx.eval_shape(lambda: MLP(out_cfg, spec, dtype=mlp.up_proj.kernel.dtype, rngs=nnx.Rngs(0)))
    new.up_proj.kernel.set_value(res["w_up"])
    new.down_proj.kernel.set_value(res["w_down"])
    if new.gate_proj is not None:
        new.gate_proj.kernel.set_value(res["w_gate"])
        if new.gate_proj.bias is not None:  # Llama mlp_bias: the gate bias follows the kept channels
            new.gate_proj.bias.set_value(jnp.asarray(to_host(mlp.gate_proj.bias[...])[np.asarray(res["kept"])]))
    if new.up_proj.bias is not None:
        new.up_proj.bias.set_value(res["b_up"])
        new.down_proj.bias.set_value(mlp.down_proj.bias[...])
    return new, res["kept"]


# -- width buckets: one compilation serves every layer whose widths fall in the same bucket ---------------------
def zero_pad(x, axis: int, size: int) -> np.ndarray:
    x = to_host(x)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def _param(value: np.ndarray) -> jax.Array:
    return jnp.asarray(value)  # a transfer, not a computation: nothing is compiled for the new shape


def bucketed_attention(attn: Attention, cfg: ModelConfig, spec: LayerSpec) -> Attention:
    """The compressed attention with its Q/K and V/O widths zero-padded up to width buckets, for the
    calibration passes. Exact: a zero query/key channel adds nothing to a score (RoPE rotates zeros to zeros, and
    the softmax scale is the original head dimension's), a zero value channel meets zero rows of the output
    projection. Padding happens on the host, so no eager JAX op compiles for the new shapes."""
    rope = cfg.use_rope
    qk = decompose.width_bucket(spec.qk_dim, cfg.head_dim, parts=8, multiple=2 if rope else 1)
    vo = decompose.width_bucket(spec.vo_dim, cfg.head_dim, parts=8)
    if (qk, vo) == (spec.qk_dim, spec.vo_dim):
        return attn
    G, H = cfg.num_kv_heads, cfg.num_heads
    pairs = None if not rope else tuple(tuple(range(qk // 2)) for _ in range(G))
    padded_spec = LayerSpec(spec.mlp_width, qk, vo, pairs, spec.sliding_window)
    new = nnx.eval_shape(lambda: Attention(cfg, padded_spec, dtype=attn.q_proj.kernel.dtype, rngs=nnx.Rngs(0)))

    def heads(x, n, width, new_width, halves=1):
        """[..., n*width] -> [..., n*new_width], each head padded (each RoPE half separately)."""
        x = to_host(x)
        lead = x.shape[:-1]
        x = x.reshape(*lead, n, halves, width // halves)
        return zero_pad(x, -1, new_width // halves).reshape(*lead, n * new_width)

    halves = 2 if rope else 1
    # Under per-head q/k norms a zero channel would change the mean square; instead the kept channels' projections
    # are scaled by a = sqrt(qk / qk_dim) and the norm weights by 1/a: then the padded head's mean square, and
    # with it the norm's eps term, is the unpadded one's, so every output is unchanged.
    a = float(np.sqrt(qk / spec.qk_dim)) if cfg.per_head_qk_norm(spec) else 1.0
    for name, norm, n in (("q_proj", "q_norm", H), ("k_proj", "k_norm", G)):
        src, dst = getattr(attn, name), getattr(new, name)
        dst.kernel.set_value(_param(heads(to_host(src.kernel[...]) * a, n, spec.qk_dim, qk, halves)))
        if src.bias is not None:
            dst.bias.set_value(_param(heads(to_host(src.bias[...]) * a, n, spec.qk_dim, qk, halves)))
        if a != 1.0:
            w = to_host(getattr(attn, norm).weight[...]).astype(np.float64)
            w = (1.0 + w) / a - 1.0 if cfg.norm == "rms_offset" else w / a
            getattr(new, norm).weight.set_value(_param(heads(w.reshape(-1), n, spec.qk_dim, qk, halves).reshape(n, qk)
                                                       .astype(getattr(attn, norm).weight.dtype)))
    new.v_proj.kernel.set_value(_param(heads(attn.v_proj.kernel[...], G, spec.vo_dim, vo)))
    if attn.v_proj.bias is not None:
        new.v_proj.bias.set_value(_param(heads(attn.v_proj.bias[...], G, spec.vo_dim, vo)))
    o = to_host(attn.o_proj.kernel[...]).reshape(H, spec.vo_dim, -1)
    new.o_proj.kernel.set_value(_param(zero_pad(o, 1, vo).reshape(H * vo, -1)))
    if attn.o_proj.bias is not None:
        new.o_proj.bias.set_value(attn.o_proj.bias[...])
    if attn.rope_freqs is not None:
        new.rope_freqs.set_value(_param(zero_pad(attn.rope_freqs[...], 1, qk // 2)))
    if attn.q_norm is not None and a == 1.0:  # shared norms over the whole head (key-query whole)
        new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
    return new


def bucketed_mlp(mlp: MLP, cfg: ModelConfig, spec: LayerSpec, parts: int = 16) -> MLP:
    """The compressed MLP zero-padded up to its width bucket (one of ``parts``), for the calibration passes.
    Exact: a zero intermediate channel is ``act(0) * 0 = 0`` (gated), ``act(0 + 0) = 0`` (ReLU/GELU), and meets a
    zero row of the down projection."""
    width = decompose.width_bucket(spec.mlp_width, cfg.intermediate_size, parts=parts)
    if width == spec.mlp_width:
        return mlp
    padded_spec = dataclasses.replace(spec, mlp_width=width)
    new = nnx.eval_shape(lambda: MLP(cfg, padded_spec, dtype=mlp.up_proj.kernel.dtype, rngs=nnx.Rngs(0)))
    for name in ("gate_proj", "up_proj"):
        src, dst = getattr(mlp, name), getattr(new, name)
        if src is None:
            continue
        dst.kernel.set_value(_param(zero_pad(src.kernel[...], 1, width)))
        if src.bias is not None:
            dst.bias.set_value(_param(zero_pad(src.bias[...], 0, width)))
    new.down_proj.kernel.set_value(_param(zero_pad(mlp.down_proj.kernel[...], 0, width)))
    if mlp.down_proj.bias is not None:
        new.down_proj.bias.set_value(mlp.down_proj.bias[...])
    return new


# -- reconstruction errors, from the statistics alone (no extra forward pass) ------------------------------------
def qk_dropped_score(energy_q, energy_k, channels: np.ndarray, cfg: ModelConfig) -> float:
    """Fraction of the CR score mass ``sum_j sum_i sqrt(E_q,i(j) E_k,g(j))`` on the dropped channels."""
    eq = np.asarray(energy_q, np.float64).reshape(cfg.num_kv_heads, cfg.group_size, -1)
    ek = np.asarray(energy_k, np.float64)[:, None, :]
    score = np.sqrt(eq * ek).sum(axis=1)  # [G, dh]
    kept = np.take_along_axis(score, channels, axis=1).sum()
    return float(1.0 - kept / score.sum())
