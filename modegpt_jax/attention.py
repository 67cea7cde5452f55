"""Exact causal attention over a whole sequence, blockwise, with a backward pass that keeps no ``[T, T]`` array.

Forward: the queries go in chunks of ``rows`` rows, one chunk after another in a loop; each chunk is scored only
against the keys the causal mask (and a sliding window) lets it see, with a plain softmax per chunk. Each row sees
all its allowed keys within its chunk, so the result is exact (the dropped keys are masked ones, whose
``exp(min - max)`` is 0). A row with no allowed key (a left-padding query) averages its chunk's key range: finite,
and never used.

Backward (:func:`causal_attention` is a :func:`jax.custom_vjp`): differentiating the forward pass would keep the
scores, masks and probabilities of every chunk, ``[B, H, T, T]`` several times over, for every layer until its
backward pass (3.4 GiB for SmolLM2's 30 layers at 4 x 512 tokens). Instead the forward pass keeps only its inputs,
its output and the log-sum-exp of each row's scores ``[B, H, T]``; the backward pass recomputes one chunk's
probabilities at a time from them (one more ``q k^T`` product) and accumulates the gradients of q, k and v. One
chunk of the backward pass holds a few arrays of the chunk's scores' size at once (scores, probabilities and their
gradients), so a few times ``ATTENTION_CHUNK_BYTES``. A row with no allowed key (whose output is never used) passes
no gradient back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["causal_attention"]

_MIN = jnp.finfo(jnp.float32).min


def _allowed(window: int | None, attention_mask: jax.Array | None, r0: int, r1: int, c0: int) -> jax.Array:
    """Boolean [B or 1, 1, 1, r1 - r0, r1 - c0]: which keys ``[c0, r1)`` the query rows ``[r0, r1)`` may see."""
    i = jnp.arange(r0, r1)[:, None]
    j = jnp.arange(c0, r1)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    allowed = allowed[None, None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, None, c0:r1]
    return allowed


def _scores(q, k, attention_mask, scale, window, r0, r1):
    """Masked float32 scores [B, G, n, r1 - r0, r1 - c0] of query rows ``[r0, r1)``, their mask, and ``c0``: the
    first key any of them sees."""
    c0 = 0 if window is None else max(0, r0 - window + 1)
    scores = jnp.einsum("btgnd,bsgd->bgnts", q[:, r0:r1], k[:, c0:r1]).astype(jnp.float32) * scale
    allowed = _allowed(window, attention_mask, r0, r1, c0)
    return jnp.where(allowed, scores, _MIN), allowed, c0


def _over_chunks(T: int, rows: int, body, carry):
    """``carry = body(r0, r1, carry)`` for the chunks ``[r0, r1)`` of ``rows`` query rows: inline for one chunk,
    else a loop over a switch of the chunks' static shapes (unrolled, XLA:CPU would schedule the chunks
    breadth-first, every chunk's scores live at once)."""
    if rows >= T:
        return body(0, T, carry)
    branches = [functools.partial(lambda r0, c: body(r0, min(T, r0 + rows), c), r0) for r0 in range(0, T, rows)]
    return jax.lax.fori_loop(0, len(branches), lambda i, c: jax.lax.switch(i, branches, c), carry)


def _forward(q, k, v, attention_mask, scale, window, rows, with_lse):
    B, T, G, n, _ = q.shape

    def chunk(r0, r1):
        scores, _, c0 = _scores(q, k, attention_mask, scale, window, r0, r1)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgnts,bsgd->btgnd", probs, v[:, c0:r1])
        return out, (jax.nn.logsumexp(scores, axis=-1) if with_lse else None)

    if rows >= T:
        return chunk(0, T)

    def body(r0, r1, carry):
        out, lse = chunk(r0, r1)
        carry = (jax.lax.dynamic_update_slice_in_dim(carry[0], out, r0, axis=1),
                 None if lse is None else jax.lax.dynamic_update_slice_in_dim(carry[1], lse, r0, axis=3))
        return carry

    init = (jnp.zeros((B, T, G, n, v.shape[-1]), v.dtype),
            jnp.zeros((B, G, n, T), jnp.float32) if with_lse else None)
    return _over_chunks(T, rows, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array | None, scale: float,
                     window: int | None, rows: int) -> jax.Array:
    """Attention output [B, T, G, n, vo] of post-RoPE queries ``q [B, T, G, n, qk]`` (``n`` query heads per KV
    group) over keys ``k [B, T, G, qk]`` and values ``v [B, T, G, vo]``: causal, within a sliding ``window`` if
    given, padded keys (``attention_mask [B, T]`` false) left out; softmax scale ``scale``; ``rows`` query rows per
    chunk."""
    return _forward(q, k, v, attention_mask, scale, window, rows, False)[0]


def _fwd(q, k, v, attention_mask, scale, window, rows):
    out, lse = _forward(q, k, v, attention_mask, scale, window, rows, True)
    return out, (q, k, v, attention_mask, out, lse)


def _bwd(scale, window, rows, residuals, g):
    q, k, v, attention_mask, out, lse = residuals
    T = q.shape[1]
    # d(loss)/d(scores) = p * (g v^T - D), with D = sum(g * out) over the value dims, one row at a time
    D = jnp.moveaxis(jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, -1)  # [B, G, n, T]

    def body(r0, r1, carry):
        dq, dk, dv = carry
        scores, allowed, c0 = _scores(q, k, attention_mask, scale, window, r0, r1)
        probs = jnp.where(allowed, jnp.exp(scores - lse[..., r0:r1, None]), 0.0)
        g_rows = g[:, r0:r1]
        dv = dv.at[:, c0:r1].add(jnp.einsum("bgnts,btgnd->bsgd", probs.astype(v.dtype), g_rows,
                                            preferred_element_type=jnp.float32))
        dp = jnp.einsum("btgnd,bsgd->bgnts", g_rows, v[:, c0:r1], preferred_element_type=jnp.float32)
        ds = (jnp.where(allowed, probs * (dp - D[..., r0:r1, None]), 0.0) * scale).astype(q.dtype)
        dq = jax.lax.dynamic_update_slice_in_dim(
            dq, jnp.einsum("bgnts,bsgd->btgnd", ds, k[:, c0:r1], preferred_element_type=jnp.float32), r0, axis=1)
        dk = dk.at[:, c0:r1].add(jnp.einsum("bgnts,btgnd->bsgd", ds, q[:, r0:r1],
                                            preferred_element_type=jnp.float32))
        return dq, dk, dv

    zeros = [jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)]
    dq, dk, dv = _over_chunks(T, rows, body, tuple(zeros))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_attention.defvjp(_fwd, _bwd)
