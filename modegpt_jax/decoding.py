"""KV-cache decoding for :class:`~modegpt_jax.model.Transformer`: jitted prefill, decode step and greedy loop.

The cache is preallocated at a fixed ``max_length`` so every step has the same shapes and compiles once. Each
layer's cache follows that layer's widths: post-RoPE keys ``[B, G, qk_dim, S]`` and values ``[B, G, S, vo_dim]``
(rows zero-padded to a multiple of 8, ``CACHE_WIDTH_MULTIPLE``). RoPE uses each layer's kept-pair frequencies, a
model buffer; a step computes only its own B*G*qk/2 angles, fused into the rotation. Positions follow
:meth:`Transformer.positions`, so cached decoding gives the logits of the full forward pass over the same
tokens::

    cache = init_cache(model, batch=2, max_length=64)
    logits, cache = prefill(model, tokens, cache)          # logits of the last prompt token [B, vocab]
    logits, cache = decode_step(model, logits.argmax(-1), cache)
    out = generate(model, tokens, max_new_tokens=20)       # greedy, [B, T + 20]

Each call above splits the model (milliseconds of Python); :class:`CachedDecoder` splits it once, holds the
blocks' projections in a decoding layout (:func:`decode_weights`) and has the same methods, for loops and
benchmarks.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from modegpt_jax.model import Transformer


class KVCache(NamedTuple):
    keys: tuple[jax.Array, ...]  # per layer [B, G, qk_dim (padded), S], after RoPE (transposed: see attend_cached)
    values: tuple[jax.Array, ...]  # per layer [B, G, S, vo_dim (padded)]
    key_mask: jax.Array  # [B, S] bool: written and not padding
    length: jax.Array  # int32 scalar: cache indices already written
    next_position: jax.Array  # [B] int32: position id of the next token

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]


# Cache rows are padded with zero channels to a multiple of this; zeros change no score and no output. On the
# 2-core CPU used for benchmarks/throughput.py, one layer's cached attention at batch 8 (S=192) took ~205 us with
# 60-wide rows against ~165 us with 64-wide ones, and padding took SmolLM2-0.3's batch-8 decoding from 1.10x to
# 1.15x dense; at batch 1 it made no measurable difference.
CACHE_WIDTH_MULTIPLE = 8


def _padded(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def init_cache(model: Transformer | CachedDecoder, batch: int, max_length: int,
               width_multiple: int = CACHE_WIDTH_MULTIPLE) -> KVCache:
    """An empty cache for ``batch`` sequences of at most ``max_length`` tokens (prompt included); each layer's
    key/value rows are that layer's qk_dim/vo_dim rounded up to ``width_multiple``."""
    cfg, dtype = model.config, model.dtype
    G = cfg.num_kv_heads
    return KVCache(
        keys=tuple(jnp.zeros((batch, G, _padded(s.qk_dim, width_multiple), max_length), dtype) for s in cfg.layers),
        values=tuple(jnp.zeros((batch, G, max_length, _padded(s.vo_dim, width_multiple)), dtype)
                     for s in cfg.layers),
        key_mask=jnp.zeros((batch, max_length), bool),
        length=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


def _extend(model: Transformer, fused: list | None, tokens: jax.Array, cache: KVCache,
            attention_mask: jax.Array | None, last_only: bool) -> tuple[jax.Array, KVCache]:
    """Run ``tokens [B, T]`` on top of the cache; logits [B, vocab] (last token) or [B, T, vocab]."""
    B, T = tokens.shape
    m = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    if model.embed_positions is not None:  # learned positions count non-padding tokens (Transformer.positions)
        counted = cache.next_position[:, None] + jnp.cumsum(m, axis=1) - 1
        positions = jnp.where(m > 0, counted, -1)
        next_position = cache.next_position + m.sum(axis=1)
    else:
        positions = cache.next_position[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        next_position = cache.next_position + T
    start = cache.length
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, m > 0, (0, start))
    h = model.embed(tokens, positions)
    keys, values = [], []
    for i, (block, k, v) in enumerate(zip(model.layers, cache.keys, cache.values)):
        h, k, v = block.extend(h, positions, k, v, start, key_mask, None if fused is None else fused[i])
        keys.append(k)
        values.append(v)
    if last_only:
        h = h[:, -1]
    logits = model.head(h)
    return logits, KVCache(tuple(keys), tuple(values), key_mask, start + T, next_position)


class _Structure:
    """The model's graph definition and state structure as one static jit argument whose hash is computed once.

    Hashing an NNX graph definition walks the whole model (and its configuration) on every jitted call; for a
    decoding step that costs as much as a few layers. One canonical instance per structure keeps the jit cache
    lookup an identity check, and equal models share compiled code.
    """

    __slots__ = ("_hash", "graphdef", "treedef")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves) -> Transformer:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


_STRUCTURES: dict[_Structure, _Structure] = {}


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4,))
def _extend_jit(structure, leaves, fused, tokens, cache, attention_mask, last_only):
    return _extend(structure.merge(leaves), fused, tokens, cache, attention_mask, last_only)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(4,))
def _greedy_jit(structure, leaves, fused, token, cache, steps):
    model = structure.merge(leaves)

    def step(i, carry):
        token, cache, out = carry
        logits, cache = _extend(model, fused, token[:, None], cache, None, True)
        token = jnp.argmax(logits, axis=-1).astype(token.dtype)
        return token, cache, out.at[:, i].set(token)

    out = jnp.zeros((token.shape[0], steps), token.dtype)
    _, cache, out = jax.lax.fori_loop(0, steps, step, (token, cache, out))
    return out, cache


_REPLACED_KERNELS = re.compile(r"\['layers'\]\[\d+\]\[('attn'\]\['[qkv]_proj|'mlp'\]\['(gate|up|down)_proj)'\]"
                               r"\['kernel'\]")

# Decoding-layout widths are padded with zeros to a multiple of this (see decode_weights).
DECODE_WIDTH_MULTIPLE = 16


def decode_weights(model: Transformer, multiple: int = DECODE_WIDTH_MULTIPLE) -> list[dict]:
    """Each block's projections in a layout for decoding: fewer, aligned products; the same results.

    - q/k/v kernels (and biases) side by side, one product instead of three;
    - the MLP's gate and up kernels side by side (or up alone) and the down kernel, the intermediate width
      padded with zero channels to a multiple of ``multiple``; the q/k/v block is padded likewise.

    Why, measured on the 2-core CPU of benchmarks/throughput.py at batch 1: each product costs XLA:CPU a fixed
    overhead beside its memory traffic, a larger share of a compressed block's smaller products (7 -> 4 products
    per block took SmolLM2-0.3 from 81.5 to 88.9 tokens/s, dense from 66.5 to 71.7); and in a profile of the
    compressed decoding step, products of odd output width read their weights more slowly per byte (q/k/v of
    width 897 at ~29 GB/s against ~39 GB/s for the dense 960). The model keeps its exact compressed widths;
    only this copy is padded (by under 2% of the block parameters).
    """

    def padded(width: int) -> int:
        return -(-width // multiple) * multiple

    def pad_cols(a, width):
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])

    def side_by_side(linears, width):
        kernel = jnp.concatenate([pad_cols(lin.kernel[...], width) for lin in linears], axis=1)
        if linears[0].bias is None:
            return kernel, None
        return kernel, jnp.concatenate([pad_cols(lin.bias[...], width) for lin in linears])

    layout = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv_kernel = jnp.concatenate([lin.kernel[...] for lin in qkv], axis=1)
        qkv_bias = None if attn.q_proj.bias is None else jnp.concatenate([lin.bias[...] for lin in qkv])
        width = padded(qkv_kernel.shape[1])
        qkv_kernel = pad_cols(qkv_kernel, width)
        qkv_bias = None if qkv_bias is None else pad_cols(qkv_bias, width)
        w = padded(mlp.up_proj.kernel.shape[1])
        mlp_in = side_by_side([mlp.gate_proj, mlp.up_proj] if mlp.gate_proj is not None else [mlp.up_proj], w)
        down = mlp.down_proj.kernel[...]
        down = jnp.pad(down, [(0, w - down.shape[0]), (0, 0)])
        layout.append({"qkv": (qkv_kernel, qkv_bias), "mlp_in": mlp_in, "mlp_down": down})
    return layout


class CachedDecoder:
    """KV-cache decoding of one model, split once: a snapshot of its weights at construction.

    The module functions below accept a model and build one of these per call (a few milliseconds of Python);
    a loop that calls them many times should build it once and call its methods. With ``fuse=True`` (default)
    the decoder holds its blocks' projections in the decoding layout of :func:`decode_weights` instead of the
    model's separate kernels, so it adds almost no memory once the model itself is dropped.
    """

    def __init__(self, model: Transformer, fuse: bool = True, width_multiple: int = DECODE_WIDTH_MULTIPLE):
        graphdef, state = nnx.split(model)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
        self.fused = decode_weights(model, width_multiple) if fuse else None
        # The separate kernels are never read on the fused path: empty placeholders keep the structure.
        def replaced(path) -> bool:
            return fuse and _REPLACED_KERNELS.match(jax.tree_util.keystr(path)) is not None

        self.leaves = [jnp.zeros((0,), leaf.dtype) if replaced(path) else leaf for path, leaf in with_paths]
        structure = _Structure(graphdef, treedef)
        self.structure = _STRUCTURES.setdefault(structure, structure)
        self.config, self.dtype = model.config, model.dtype

    def init_cache(self, batch: int, max_length: int, width_multiple: int = CACHE_WIDTH_MULTIPLE) -> KVCache:
        return init_cache(self, batch, max_length, width_multiple)

    def prefill(self, tokens, cache: KVCache, attention_mask=None, *,
                last_only: bool = True) -> tuple[jax.Array, KVCache]:
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return _extend_jit(self.structure, self.leaves, self.fused, tokens, cache, mask, last_only)

    def decode_step(self, token, cache: KVCache) -> tuple[jax.Array, KVCache]:
        token = jnp.asarray(token, jnp.int32).reshape(-1, 1)
        return _extend_jit(self.structure, self.leaves, self.fused, token, cache, None, True)

    def greedy(self, token, cache: KVCache, steps: int) -> tuple[jax.Array, KVCache]:
        return _greedy_jit(self.structure, self.leaves, self.fused, jnp.asarray(token, jnp.int32), cache,
                           int(steps))

    def generate(self, tokens, max_new_tokens: int, attention_mask=None) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        if max_new_tokens < 1:
            return tokens
        B, T = tokens.shape
        logits, cache = self.prefill(tokens, self.init_cache(B, T + max_new_tokens), attention_mask)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
        if max_new_tokens == 1:
            return jnp.concatenate([tokens, first], axis=1)
        rest, _ = self.greedy(first[:, 0], cache, max_new_tokens - 1)
        return jnp.concatenate([tokens, first, rest], axis=1)


def _decoder(model: Transformer | CachedDecoder) -> CachedDecoder:
    return model if isinstance(model, CachedDecoder) else CachedDecoder(model)


def prefill(model: Transformer | CachedDecoder, tokens, cache: KVCache, attention_mask=None, *,
            last_only: bool = True) -> tuple[jax.Array, KVCache]:
    """Write the prompt ``tokens [B, T]`` into ``cache``; float32 logits of the last token [B, vocab] (or of
    every token [B, T, vocab] with ``last_only=False``). ``attention_mask [B, T]`` marks padding (0). The
    cache passed in is donated: use the returned one."""
    return _decoder(model).prefill(tokens, cache, attention_mask, last_only=last_only)


def decode_step(model: Transformer | CachedDecoder, token, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per sequence (``[B]`` or ``[B, 1]``) through the cache; its float32 logits [B, vocab]."""
    return _decoder(model).decode_step(token, cache)


def greedy_decode(model: Transformer | CachedDecoder, token, cache: KVCache,
                  steps: int) -> tuple[jax.Array, KVCache]:
    """``steps`` greedy tokens [B, steps] after ``token [B]``, the whole loop in one jitted call."""
    return _decoder(model).greedy(token, cache, steps)


def generate(model: Transformer | CachedDecoder, tokens, max_new_tokens: int, attention_mask=None) -> jax.Array:
    """Greedy continuation: the prompt ``tokens [B, T]`` followed by ``max_new_tokens`` tokens."""
    return _decoder(model).generate(tokens, max_new_tokens, attention_mask)
