"""The Flax NNX decoder: one implementation for Llama 2/3, Mistral, Qwen2 and pre-LayerNorm OPT.

Weights are stored ``[in, out]`` (``y = x @ W``). Every block takes its widths from its own
:class:`~modegpt_jax.config.LayerSpec`, so the dense model and a compressed one are the same code:

- attention: ``q_proj [d, H*qk]``, ``k_proj [d, G*qk]``, ``v_proj [d, G*vo]``, ``o_proj [H*vo, d]``;
  RoPE frequencies per KV group are a buffer ``rope_freqs [G, qk/2]`` (the kept pairs' original frequencies);
  the softmax scale is ``1/sqrt(head_dim)`` of the original model, whatever ``qk`` is.
- attention over a whole sequence (:meth:`Attention.__call__`) is exact but blockwise
  (:func:`modegpt_jax.attention.causal_attention`): the queries go in chunks of :func:`query_chunk_rows` rows
  (float32 scores of one chunk within ``ATTENTION_CHUNK_BYTES``), so long calibration windows never hold
  ``[T, T]`` scores, each chunk skips the keys the causal mask hides from all its rows (about half the work of
  one ``[T, T]`` product), sequences of at most ``ATTENTION_MIN_ROWS`` are one chunk, and its backward pass keeps
  no scores either.
  KV-cache decoding is :meth:`Attention.attend_cached`.
- MLP: ``up [d, w]`` (and ``gate [d, w]`` for gated families), ``down [w, d]``.

Blocks run through one jitted function, cached per block shape, so the 30 identical blocks of a dense
model compile once, and the layer-by-layer compression pipeline reuses the same code path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modegpt_jax.attention import causal_attention
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.rope import apply_rope, kept_pair_frequencies, rope_tables


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the model (RoPE frequencies of the kept pairs)."""


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def rows_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` as one ``[rows, in] @ [in, out]`` product (a reshape, no copy): over
    ``x [B, T, in]`` the kernel's gradient is a product over both B and T, which XLA:CPU computes more slowly than
    over the flattened rows (README, Recovery training)."""
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: Any, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rows_product(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Norm(nnx.Module):
    """RMSNorm (Llama family), RMSNorm with the weight stored as an offset from 1 (Gemma: ``x * (1 + w)``,
    scaled in float32 before the cast back) or LayerNorm (OPT), computed in float32 like the reference models."""

    def __init__(self, d: int | tuple[int, ...], *, kind: str, eps: float, dtype: Any):
        """``d``: the normalised size, or a weight shape ``(..., size)`` (one weight per head: ``[H, qk]``)
        whose leading axes broadcast against the input's axes before the last."""
        shape = (d,) if isinstance(d, int) else tuple(d)
        self.kind, self.eps = kind, eps
        self.weight = nnx.Param(jnp.zeros(shape, dtype) if kind == "rms_offset" else jnp.ones(shape, dtype))
        self.bias = nnx.Param(jnp.zeros(shape, dtype)) if kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        if self.kind in ("rms", "rms_offset"):
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            if self.kind == "rms_offset":
                return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
            return self.weight[...] * y.astype(x.dtype)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


#: Byte budget of one query chunk's float32 scores ``[B, G, n, rows, T]`` in :meth:`Attention.__call__`. The
#: compiled attention's scratch memory is a small multiple of it (scores, masked scores/exponentials, probs).
ATTENTION_CHUNK_BYTES = 256 * 2**20
#: Causal chunking: a chunk of query rows scores only the keys up to its last row, so ``c`` chunks do about
#: ``(c + 1) / 2c`` of the ``T x T`` work of one. Chunks have at least ``ATTENTION_MIN_ROWS`` rows (smaller ones
#: multiply cheap work and compiled branches) and there are at most about ``ATTENTION_CHUNKS`` of them (each is a
#: branch the compiler builds, forward and backward).
ATTENTION_MIN_ROWS = 128
ATTENTION_CHUNKS = 16


def query_chunk_rows(batch: int, heads: int, T: int) -> int:
    """Query rows per attention chunk: ``T / ATTENTION_CHUNKS`` rows but at least ``ATTENTION_MIN_ROWS`` (so
    ``T <= ATTENTION_MIN_ROWS`` is one chunk), and no more than fit ``ATTENTION_CHUNK_BYTES`` of float32 scores
    against all ``T`` keys (an upper bound on any chunk's key range); at least 1, at most ``T``.
    Read at trace time, so a jitted function keeps the value it was compiled with."""
    causal = max(ATTENTION_MIN_ROWS, -(-T // ATTENTION_CHUNKS))
    fit = max(1, ATTENTION_CHUNK_BYTES // (batch * heads * T * 4))
    return int(min(T, causal, fit))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: Any, rngs: nnx.Rngs):
        d, H, G = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        self.num_heads, self.num_kv_heads = H, G
        self.qk_dim, self.vo_dim = spec.qk_dim, spec.vo_dim
        # The dense model's scale: compression never changes it (a compressed qk width is not the head dim).
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.sliding_window = spec.sliding_window
        self.q_proj = Linear(d, H * spec.qk_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, G * spec.qk_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, G * spec.vo_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(H * spec.vo_dim, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        # Per-head q/k RMSNorm (Qwen3, Gemma 3): one weight shared by all heads, or, once key-query is compressed,
        # one per head over its kept channels.
        per_head = cfg.per_head_qk_norm(spec)
        q_shape, k_shape = ((H, spec.qk_dim), (G, spec.qk_dim)) if per_head else (cfg.head_dim, cfg.head_dim)
        self.q_norm = Norm(q_shape, kind=cfg.norm, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = Norm(k_shape, kind=cfg.norm, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        # Frequencies of the kept pairs, gathered once here rather than on every call.
        self.rope_freqs = Buffer(jnp.asarray(kept_pair_frequencies(cfg, spec))) if cfg.use_rope else None

    def project_qk(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pre-RoPE queries [B, T, H, qk] and keys [B, T, G, qk] (after the q/k norms where the model has them)."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.qk_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.qk_dim)
        return self._norm_qk(q, k)

    def _norm_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The per-head q/k norms where the model has them (queries [..., H, qk], keys [..., G, qk])."""
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def attend_cached(self, x: jax.Array, positions: jax.Array, keys: jax.Array, values: jax.Array,
                      start: jax.Array, key_mask: jax.Array,
                      qkv: tuple[jax.Array, jax.Array | None] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of ``T`` new tokens written into a preallocated KV cache at index ``start``.

        ``keys [B, G, qk', S]`` hold post-RoPE keys, transposed so a step's scores are sums over rows that run
        along ``S`` (XLA:CPU vectorises those; sums along a 60-wide row are slower), and ``values [B, G, S,
        vo']``; ``key_mask [B, S]`` marks the
        entries that are not padding (the new tokens' included). The new tokens sit at cache indices
        ``start..start+T-1`` and see every earlier index (causal, windowed by index like ``__call__``).
        Returns the output and the updated cache. The cache widths ``qk' >= qk_dim`` and ``vo' >= vo_dim`` may
        be padded with zero channels (which change no score and no output) so its rows stay aligned.
        ``qkv``: optionally the q/k/v kernels (and biases) concatenated ``[d, (H + G) qk + G vo (+ zero
        columns)]``, one product instead of three (see :func:`modegpt_jax.decoding.decode_weights`).
        """
        B, T, _ = x.shape
        G, n = self.num_kv_heads, self.num_heads // self.num_kv_heads
        if qkv is None:
            q, k = self.project_qk(x)
            v = self.v_proj(x)
        else:
            y = x @ qkv[0]
            if qkv[1] is not None:
                y = y + qkv[1]
            nq, nk = self.num_heads * self.qk_dim, G * self.qk_dim
            q, k, v = y[..., :nq], y[..., nq : nq + nk], y[..., nq + nk : nq + nk + G * self.vo_dim]
            q, k = self._norm_qk(q.reshape(B, T, self.num_heads, self.qk_dim), k.reshape(B, T, G, self.qk_dim))
        v = v.reshape(B, T, G, self.vo_dim)
        q = q.reshape(B, T, G, n, self.qk_dim)
        if self.rope_freqs is not None:
            # The kept pairs' frequencies are a buffer; per step only B*T*G*qk/2 angles are computed (fused).
            cos, sin = rope_tables(positions, self.rope_freqs[...])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        qk_pad, vo_pad = keys.shape[2] - self.qk_dim, values.shape[-1] - self.vo_dim
        if qk_pad:
            q = jnp.pad(q, [(0, 0)] * 4 + [(0, qk_pad)])
            k = jnp.pad(k, [(0, 0)] * 3 + [(0, qk_pad)])
        if vo_pad:
            v = jnp.pad(v, [(0, 0)] * 3 + [(0, vo_pad)])
        keys = jax.lax.dynamic_update_slice(keys, k.transpose(0, 2, 3, 1).astype(keys.dtype), (0, 0, 0, start))
        values = jax.lax.dynamic_update_slice(values, v.transpose(0, 2, 1, 3).astype(values.dtype), (0, 0, start, 0))
        S = keys.shape[3]
        i = start + jnp.arange(T)[:, None]
        j = jnp.arange(S)[None, :]
        allowed = j <= i
        if self.sliding_window is not None:
            allowed &= j > i - self.sliding_window
        allowed = allowed[None, None, None] & key_mask.astype(bool)[:, None, None, None, :]  # [B, 1, 1, T, S]
        if T == 1:
            # One token: products as multiply-and-sum, which XLA fuses with the in-place cache update. As dots
            # (einsum), XLA:CPU copies the whole cache of every layer, several times, on every step.
            scores = jnp.sum(q[:, 0, :, :, :, None] * keys[:, :, None], axis=-2)[:, :, :, None]  # [B, G, n, 1, S]
        else:
            scores = jnp.einsum("btgnd,bgds->bgnts", q, keys)
        scores = jnp.where(allowed, scores.astype(jnp.float32) * self.scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        if T == 1:
            out = jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=-2)  # [B, G, n, vo]
        else:
            out = jnp.einsum("bgnts,bgsd->btgnd", probs, values)
        out = out[..., : self.vo_dim].reshape(B, T, self.num_heads * self.vo_dim)
        return self.o_proj(out), keys, values

    def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        B, T, _ = x.shape
        G, n = self.num_kv_heads, self.num_heads // self.num_kv_heads
        q, k = self.project_qk(x)
        v = self.v_proj(x).reshape(B, T, G, self.vo_dim)
        q = q.reshape(B, T, G, n, self.qk_dim)
        if self.rope_freqs is not None:
            cos, sin = rope_tables(positions, self.rope_freqs[...])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, attention_mask, self.scale, self.sliding_window,
                               query_chunk_rows(B, self.num_heads, T))
        return self.o_proj(out.reshape(B, T, self.num_heads * self.vo_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: Any, rngs: nnx.Rngs):
        d, w = cfg.hidden_size, spec.mlp_width
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = Linear(d, w, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs) if cfg.gated_mlp else None
        self.up_proj = Linear(d, w, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(w, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def intermediate(self, x: jax.Array) -> jax.Array:
        """The down projection's input: act(x W_G) * (x W_U), or act(x W_U + b) for OPT."""
        if self.gate_proj is None:
            return self.act(self.up_proj(x))
        return self.act(self.gate_proj(x)) * self.up_proj(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.intermediate(x))


class Block(nnx.Module):
    """Pre-norm decoder block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``; with sandwich norms (Gemma 3)
    each branch's output is normalised too before it is added: ``h + post(attn(norm(h)))``."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: Any, rngs: nnx.Rngs):
        def norm():
            return Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, dtype=dtype)

        self.attn_norm = norm()
        self.attn = Attention(cfg, spec, dtype=dtype, rngs=rngs)
        self.attn_post_norm = norm() if cfg.sandwich_norms else None
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, spec, dtype=dtype, rngs=rngs)
        self.mlp_post_norm = norm() if cfg.sandwich_norms else None

    def __call__(self, h: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        h = h + self.attention_branch(h, positions, attention_mask)
        return h + self.mlp_branch(h)

    def attention_branch(self, h: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None,
                         attn: Attention | None = None) -> jax.Array:
        """What the attention adds to the residual stream (``attn``: another attention in this block's place,
        e.g. the compressed one)."""
        return self._post(self.attn_post_norm, (attn or self.attn)(self.attn_norm(h), positions, attention_mask))

    def mlp_branch(self, h: jax.Array, mlp: MLP | None = None) -> jax.Array:
        """What the MLP adds to the residual stream (``mlp``: another MLP in this block's place)."""
        return self._post(self.mlp_post_norm, (mlp or self.mlp)(self.mlp_norm(h)))

    @staticmethod
    def _post(norm: Norm | None, x: jax.Array) -> jax.Array:
        return x if norm is None else norm(x)

    def extend(self, h: jax.Array, positions: jax.Array, keys: jax.Array, values: jax.Array, start: jax.Array,
               key_mask: jax.Array, fused: dict | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on new tokens with a KV cache (see :meth:`Attention.attend_cached`). ``fused``: optionally
        this block's decoding layout from :func:`modegpt_jax.decoding.decode_weights`: ``{"qkv": (kernel,
        bias), "mlp_in": (kernel, bias), "mlp_down": kernel}``, the MLP's gate and up kernels side by side
        (or up alone) and the down kernel, all zero-padded to a common intermediate width."""
        if fused is None:
            a, keys, values = self.attn.attend_cached(self.attn_norm(h), positions, keys, values, start, key_mask)
            h = h + self._post(self.attn_post_norm, a)
            return h + self.mlp_branch(h), keys, values
        a, keys, values = self.attn.attend_cached(self.attn_norm(h), positions, keys, values, start, key_mask,
                                                  fused["qkv"])
        h = h + self._post(self.attn_post_norm, a)
        kernel, bias = fused["mlp_in"]
        y = self.mlp_norm(h) @ kernel
        if bias is not None:
            y = y + bias
        if self.mlp.gate_proj is not None:
            gate, up = jnp.split(y, 2, axis=-1)
            y = self.mlp.act(gate) * up
        else:
            y = self.mlp.act(y)
        # Zero-padded channels stay zero (act(0) * 0 = 0, relu(0) = gelu(0) = 0) and meet zero rows of down.
        out = y @ fused["mlp_down"]
        if self.mlp.down_proj.bias is not None:
            out = out + self.mlp.down_proj.bias[...]
        return h + self._post(self.mlp_post_norm, out), keys, values


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef, state, h, positions, attention_mask):
    return nnx.merge(graphdef, state)(h, positions, attention_mask)


def run_block(block: Block, h: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None):
    """One block, jitted; compiled once per (block shapes, input shapes)."""
    graphdef, state = nnx.split(block)
    return _run_block(graphdef, state, h, positions, attention_mask)


def scale_embeddings(h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embeddings times ``cfg.embed_scale`` where the model has one (Gemma: ``sqrt(hidden)``, rounded to the
    embeddings' dtype first, as the reference model does)."""
    if cfg.embed_scale is None:
        return h
    return h * jnp.asarray(cfg.embed_scale, h.dtype)


class Transformer(nnx.Module):
    """Decoder-only causal language model. ``__call__(tokens) -> float32 logits [B, T, vocab]``."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        cfg.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.embed_positions = (
            nnx.Param(_normal(rngs, (cfg.learned_positions, cfg.hidden_size), dtype))
            if cfg.learned_positions
            else None
        )
        self.layers = nnx.List([Block(cfg, spec, dtype=dtype, rngs=rngs) for spec in cfg.layers])
        self.final_norm = Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    # The three stages are separate so the pipeline can stream hidden states block by block.
    def positions(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Position ids [B, T]: 0..T-1, or for learned positions (OPT) counted over non-padding tokens."""
        B, T = tokens.shape
        if attention_mask is not None and self.embed_positions is not None:
            m = attention_mask.astype(jnp.int32)
            return jnp.cumsum(m, axis=1) * m - 1
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        h = scale_embeddings(jnp.take(self.embed_tokens[...], tokens, axis=0), self.config)
        if self.embed_positions is not None:
            h = h + jnp.take(self.embed_positions[...], positions + self.config.position_offset, axis=0)
        return h

    def head(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h)
        if self.lm_head is None:
            logits = rows_product(h, self.embed_tokens[...].T)  # tied: trained with --train-embeddings
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return _head(self, hidden_states(self, tokens, attention_mask))


def hidden_states(model: Transformer, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The residual stream after the last block (before the final norm), block by block."""
    tokens = jnp.asarray(tokens)
    positions = model.positions(tokens, attention_mask)
    h = _embed(model, tokens, positions)
    for block in model.layers:
        h = run_block(block, h, positions, attention_mask)
    return h


@nnx.jit
def _embed(model: Transformer, tokens, positions):
    return model.embed(tokens, positions)


@nnx.jit
def _head(model: Transformer, h):
    return model.head(h)


def count_params(tree: Any) -> int:
    """Number of scalars in the nnx.Param leaves of a model or module (buffers excluded)."""
    state = nnx.state(tree, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
