"""Blockwise attention (Attention.__call__) equals the direct [B, G, n, T, T] computation and never builds it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modegpt_jax import model as M
from modegpt_jax.config import LayerSpec, ModelConfig

H, G, HEAD_DIM, D = 4, 2, 16, 64


def make_attention(*, qk=HEAD_DIM, vo=HEAD_DIM, rope_pairs=None, window=None, use_rope=True):
    spec = LayerSpec(96, qk, vo, rope_pairs, window)
    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=D, num_heads=H, num_kv_heads=G,
                      head_dim=HEAD_DIM, intermediate_size=96, layers=(spec,), use_rope=use_rope, qkv_bias=True)
    cfg.validate()
    return M.Attention(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0))


def direct_attention(attn, x, positions, attention_mask):
    """Reference: full float32 scores [B, G, n, T, T], masked with finfo.min, in plain jnp."""
    B, T, _ = x.shape
    n = H // G
    q = (x @ attn.q_proj.kernel[...] + attn.q_proj.bias[...]).reshape(B, T, G, n, attn.qk_dim)
    k = (x @ attn.k_proj.kernel[...] + attn.k_proj.bias[...]).reshape(B, T, G, attn.qk_dim)
    v = (x @ attn.v_proj.kernel[...] + attn.v_proj.bias[...]).reshape(B, T, G, attn.vo_dim)
    if attn.rope_freqs is not None:  # rotate_half layout: channel p pairs with p + qk/2
        ang = positions[:, :, None, None].astype(jnp.float32) * attn.rope_freqs[...][None, None]  # [B, T, G, qk/2]
        cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))

        def rot(t, c, s):
            half = t.shape[-1] // 2
            return t * c + jnp.concatenate([-t[..., half:], t[..., :half]], -1) * s

        q, k = rot(q, cos[:, :, :, None], sin[:, :, :, None]), rot(k, cos, sin)
    scores = jnp.einsum("btgnd,bsgd->bgnts", q, k) * HEAD_DIM**-0.5
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = j <= i
    if attn.sliding_window is not None:
        allowed &= j > i - attn.sliding_window
    allowed = jnp.asarray(allowed)[None, None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bgnts,bsgd->btgnd", probs, v).reshape(B, T, H * attn.vo_dim)
    return out @ attn.o_proj.kernel[...]


def force_chunk_rows(monkeypatch, rows, B, T):
    monkeypatch.setattr(M, "ATTENTION_CHUNK_BYTES", B * H * T * 4 * rows)
    monkeypatch.setattr(M, "ATTENTION_CHUNKS", 1)  # rows from the byte budget alone
    assert M.query_chunk_rows(B, H, T) == rows


COMPRESSED = dict(qk=8, vo=12, rope_pairs=((0, 3, 5, 7), (1, 2, 4, 6)))  # GQA, qk != vo, kept RoPE pairs


CASES = pytest.mark.parametrize(
    ("variant", "rows", "pads"),  # T = 37; pads: left padding per batch row
    [
        (dict(), 37, None),  # one chunk: the single-einsum path
        (dict(), 8, None),  # 37 is not a multiple of 8
        (dict(), 8, (0, 9)),
        (COMPRESSED, 8, (0, 9)),
        (dict(window=6), 8, None),  # window shorter than a chunk
        (dict(window=6), 5, (0, 9)),  # window longer than a chunk
        (dict(COMPRESSED, qk=6, rope_pairs=((0, 2, 7), (1, 5, 6)), window=11), 8, (3, 12)),
        (dict(use_rope=False, vo=10), 8, (0, 9)),
    ],
)


def inputs(pads, B, T):
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    if pads is None:
        return x, None, jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = jnp.asarray(np.arange(T)[None, :] >= np.asarray(pads)[:, None], jnp.int32)
    return x, mask, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # real tokens count from 0


@CASES
def test_blockwise_equals_direct(monkeypatch, variant, rows, pads):
    B, T = 2, 37
    force_chunk_rows(monkeypatch, rows, B, T)
    attn = make_attention(**variant)
    x, mask, positions = inputs(pads, B, T)
    got = np.asarray(jax.jit(lambda x, p, m: attn(x, p, m))(x, positions, mask))
    want = np.asarray(direct_attention(attn, x, positions, mask))
    assert np.isfinite(got).all()
    # Padded query rows see no key: finite, but averaged over a different key range (unused), so not compared.
    real = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


@CASES
def test_blockwise_gradients_equal_the_direct_ones(monkeypatch, variant, rows, pads):
    """The backward pass that recomputes the scores chunk by chunk gives autodiff's gradients of the direct
    computation, for the inputs and every weight (padded query rows carry no loss: their outputs are unused)."""
    B, T = 2, 37
    force_chunk_rows(monkeypatch, rows, B, T)
    attn = make_attention(**variant)
    x, mask, positions = inputs(pads, B, T)
    real = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    weights = jax.random.normal(jax.random.key(2), (B, T, D)) * real[:, :, None]
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    def loss(run):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(weights * run(nnx.merge(graphdef, p, rest), x)), (0, 1)))

    got = loss(lambda a, x: a(x, positions, mask))(params, x)
    want = loss(lambda a, x: direct_attention(a, x, positions, mask))(params, x)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(b)).max() > 0, path
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=str(path))


def autodiff_attention(q, k, v, attention_mask, scale, window, rows):
    """The forward code of :func:`causal_attention` without its custom backward pass (autodiff goes through it)."""
    from modegpt_jax import attention

    return attention.causal_attention.__wrapped__(q, k, v, attention_mask, scale, window, rows)


def test_backward_pass_keeps_no_scores():
    """What the forward pass saves for the backward pass has no [T, T] array (autodiff of the same forward code
    keeps several per chunk: the control)."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from modegpt_jax import attention

    B, T, n = 2, 48, H // G
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in
               enumerate([(B, T, G, n, 8), (B, T, G, 8), (B, T, G, 12)]))

    def saved(fn):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), q, k, v)
        return out.getvalue()

    ours = saved(lambda q, k, v: attention.causal_attention(q, k, v, None, 0.25, None, 16))
    plain = saved(lambda q, k, v: autodiff_attention(q, k, v, None, 0.25, None, T))
    assert f"{T * n},{T}]" in plain  # scores [B, G, T * n, T]
    assert f",{T * n}]" in ours and f",{T}]" not in ours  # the per-row log-sum-exp [B, G, T * n], no scores


def test_bfloat16_gradients_follow_autodiff():
    """bfloat16 inputs (heal's --dtype bfloat16): bfloat16 gradients close to autodiff of the same forward code."""
    from modegpt_jax import attention

    B, T, n = 2, 40, H // G
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i, shape in
               enumerate([(B, T, G, n, 8), (B, T, G, 8), (B, T, G, 12)]))
    g = jax.random.normal(jax.random.key(9), (B, T, G, n, 12))

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(g * fn(q, k, v).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    ours = grads(lambda q, k, v: attention.causal_attention(q, k, v, None, 0.3, 7, 16))
    plain = grads(lambda q, k, v: autodiff_attention(q, k, v, None, 0.3, 7, 16))
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * np.abs(b).max())


def test_chunk_rows_rule():
    assert M.query_chunk_rows(1, 4, M.ATTENTION_MIN_ROWS) == M.ATTENTION_MIN_ROWS  # short: one chunk
    assert M.query_chunk_rows(4, 9, 512) == M.ATTENTION_MIN_ROWS  # 4 causal chunks of the smallest size
    T = M.ATTENTION_MIN_ROWS * M.ATTENTION_CHUNKS * 2
    assert M.query_chunk_rows(1, 4, T) == T // M.ATTENTION_CHUNKS  # long: at most ATTENTION_CHUNKS chunks
    rows = M.query_chunk_rows(8, 32, 4096)  # Llama-7B width, 8 x 4096 tokens
    assert rows < 4096 and 8 * 32 * rows * 4096 * 4 <= M.ATTENTION_CHUNK_BYTES
    assert M.query_chunk_rows(4096, 64, 4096) == 1  # never zero


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_full_score_tensor(monkeypatch):
    """T = 2048: the compiled blockwise attention's scratch memory is below one [B, G, n, T, T] float32 scores,
    the direct computation's above it."""
    B, T, rows = 1, 2048, 256
    force_chunk_rows(monkeypatch, rows, B, T)
    attn = make_attention(window=None)
    graphdef, state = nnx.split(attn)
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    positions = jax.ShapeDtypeStruct((B, T), jnp.int32)
    full_scores = B * H * T * T * 4
    blockwise = temp_bytes(lambda s, x, p: nnx.merge(graphdef, s)(x, p, None), state, x, positions)
    direct = temp_bytes(lambda s, x, p: direct_attention(nnx.merge(graphdef, s), x, p, None), state, x, positions)
    assert direct > full_scores, (direct, full_scores)
    # 8 chunks of 256 rows, run one after another: about two [B, G, n, 256, 2048] buffers at a time (17.5 MiB of
    # 64). Chunks left independent (an unrolled loop) are scheduled breadth-first on CPU: 61 MiB.
    assert blockwise < full_scores / 2, (blockwise, full_scores)
