"""Exact causal attention over a whole sequence, blockwise, with a backward pass that keeps no ``[T, T]`` array.

Layout: the queries of a KV group are one matrix ``[B, G, T * n, d]`` (row ``t * n + h`` is query head ``h`` of
that group at position ``t``) against the group's keys and values ``[B, G, T, d]``, so every product below is a
plain batched matrix product with no transposes of score-sized arrays (the ``[B, T, G, n, d]`` inputs and outputs
are transposed once, outside the chunks; with the scores as ``[B, G, n, t, s]`` the same work took 1.1-2.2x as
long on a CPU, ``benchmarks/attention.py``).

Forward: the queries go in chunks of ``rows`` positions, one chunk after another in a loop; each chunk is scored
only against the keys the causal mask (and a sliding window) lets it see, with a plain softmax per chunk. Each row
sees all its allowed keys within its chunk, so the result is exact (the dropped keys are masked ones, whose
``exp(min - max)`` is 0). A row with no allowed key (a left-padding query) averages its chunk's key range: finite,
and never used.

Backward (:func:`causal_attention` is a :func:`jax.custom_vjp`): differentiating the forward pass would keep the
scores, masks and probabilities of every chunk, ``[B, H, T, T]`` several times over, for every layer until its
backward pass (3.4 GiB for SmolLM2's 30 layers at 4 x 512 tokens). Instead the forward pass keeps only its inputs,
its output and the log-sum-exp of each row's scores ``[B, G, T * n]``; the backward pass recomputes one chunk's
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


def _allowed(window: int | None, attention_mask: jax.Array | None, n: int, r0: int, r1: int, c0: int) -> jax.Array:
    """Boolean [B or 1, 1, (r1 - r0) * n, r1 - c0]: which keys ``[c0, r1)`` the query rows of positions
    ``[r0, r1)`` (``n`` heads each) may see."""
    i = jnp.arange(r0, r1)[:, None]
    j = jnp.arange(c0, r1)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    allowed = jnp.broadcast_to(allowed[:, None], (r1 - r0, n, r1 - c0)).reshape(1, 1, (r1 - r0) * n, r1 - c0)
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, c0:r1]
    return allowed


def _scores(q, k, attention_mask, scale, window, n, r0, r1):
    """Masked float32 scores [B, G, (r1 - r0) * n, r1 - c0] of the query rows of positions ``[r0, r1)``, their
    mask, and ``c0``: the first key any of them sees."""
    c0 = 0 if window is None else max(0, r0 - window + 1)
    scores = jnp.einsum("bgrd,bgsd->bgrs", q[:, :, r0 * n:r1 * n], k[:, :, c0:r1],
                        preferred_element_type=jnp.float32) * scale
    allowed = _allowed(window, attention_mask, n, r0, r1, c0)
    return jnp.where(allowed, scores, _MIN), allowed, c0


def _over_chunks(T: int, rows: int, body, carry):
    """``carry = body(r0, r1, carry)`` for the chunks ``[r0, r1)`` of ``rows`` positions: inline for one chunk,
    else a loop over a switch of the chunks' static shapes (unrolled, XLA:CPU would schedule the chunks
    breadth-first, every chunk's scores live at once)."""
    if rows >= T:
        return body(0, T, carry)
    branches = [functools.partial(lambda r0, c: body(r0, min(T, r0 + rows), c), r0) for r0 in range(0, T, rows)]
    return jax.lax.fori_loop(0, len(branches), lambda i, c: jax.lax.switch(i, branches, c), carry)


def _queries_group_major(x):
    """Queries (or their gradients) ``[B, T, G, n, d] -> [B, G, T * n, d]``."""
    B, T, G, n, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(B, G, T * n, d)


def _group_major(q, k, v):
    """``q [B, T, G, n, d] -> [B, G, T * n, d]``, ``k, v [B, T, G, d] -> [B, G, T, d]``."""
    return _queries_group_major(q), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _position_major(x, T: int):
    """The inverse of :func:`_group_major` for queries: ``[B, G, T * n, d] -> [B, T, G, n, d]``."""
    B, G, Tn, d = x.shape
    return x.reshape(B, G, T, Tn // T, d).transpose(0, 2, 1, 3, 4)


def _forward(q, k, v, attention_mask, scale, window, rows):
    """Output [B, G, T * n, vo] and log-sum-exp [B, G, T * n] of group-major ``q, k, v``."""
    B, G, Tn, _ = q.shape
    T = k.shape[2]
    n = Tn // T

    def chunk(r0, r1):
        scores, _, c0 = _scores(q, k, attention_mask, scale, window, n, r0, r1)
        top = jnp.max(scores, axis=-1, keepdims=True)
        e = jnp.exp(scores - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum("bgrs,bgsd->bgrd", (e / total).astype(v.dtype), v[:, :, c0:r1])
        return out, (top + jnp.log(total))[..., 0]

    if rows >= T:
        return chunk(0, T)

    def body(r0, r1, carry):
        out, lse = chunk(r0, r1)
        return (jax.lax.dynamic_update_slice_in_dim(carry[0], out, r0 * n, axis=2),
                jax.lax.dynamic_update_slice_in_dim(carry[1], lse, r0 * n, axis=2))

    init = (jnp.zeros((B, G, Tn, v.shape[-1]), v.dtype), jnp.zeros((B, G, Tn), jnp.float32))
    return _over_chunks(T, rows, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array | None, scale: float,
                     window: int | None, rows: int) -> jax.Array:
    """Attention output [B, T, G, n, vo] of post-RoPE queries ``q [B, T, G, n, qk]`` (``n`` query heads per KV
    group) over keys ``k [B, T, G, qk]`` and values ``v [B, T, G, vo]``: causal, within a sliding ``window`` if
    given, padded keys (``attention_mask [B, T]`` false) left out; softmax scale ``scale``; ``rows`` positions
    per chunk."""
    return _position_major(_forward(*_group_major(q, k, v), attention_mask, scale, window, rows)[0], q.shape[1])


def _fwd(q, k, v, attention_mask, scale, window, rows):
    qg, kg, vg = _group_major(q, k, v)
    out, lse = _forward(qg, kg, vg, attention_mask, scale, window, rows)
    return _position_major(out, q.shape[1]), (qg, kg, vg, attention_mask, out, lse)


def _bwd(scale, window, rows, residuals, g):
    q, k, v, attention_mask, out, lse = residuals
    Tn = q.shape[2]
    T = k.shape[2]
    n = Tn // T
    g = _queries_group_major(g)
    # d(loss)/d(scores) = p * (g v^T - D), with D = sum(g * out) over the value dims, one row at a time
    D = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, G, T * n]

    def body(r0, r1, carry):
        dq, dk, dv = carry
        scores, allowed, c0 = _scores(q, k, attention_mask, scale, window, n, r0, r1)
        probs = jnp.where(allowed, jnp.exp(scores - lse[:, :, r0 * n:r1 * n, None]), 0.0)
        g_rows = g[:, :, r0 * n:r1 * n]
        dv = dv.at[:, :, c0:r1].add(jnp.einsum("bgrs,bgrd->bgsd", probs.astype(v.dtype), g_rows,
                                               preferred_element_type=jnp.float32))
        dp = jnp.einsum("bgrd,bgsd->bgrs", g_rows, v[:, :, c0:r1], preferred_element_type=jnp.float32)
        ds = (probs * (dp - D[:, :, r0 * n:r1 * n, None]) * scale).astype(q.dtype)
        dq = jax.lax.dynamic_update_slice_in_dim(
            dq, jnp.einsum("bgrs,bgsd->bgrd", ds, k[:, :, c0:r1], preferred_element_type=jnp.float32),
            r0 * n, axis=2)
        dk = dk.at[:, :, c0:r1].add(jnp.einsum("bgrs,bgrd->bgsd", ds, q[:, :, r0 * n:r1 * n],
                                               preferred_element_type=jnp.float32))
        return dq, dk, dv

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = _over_chunks(T, rows, body, zeros)
    return (_position_major(dq, T).astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dv.transpose(0, 2, 1, 3).astype(v.dtype), None)


causal_attention.defvjp(_fwd, _bwd)
