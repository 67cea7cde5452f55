"""Tests of the three MoDeGPT module decompositions (modegpt_jax.decompose).

Every decomposition is checked three ways:
* against a plain NumPy float64 reference written here along an independent code path (explicit inverses,
  eigendecomposition square roots, Python loops over heads);
* keeping everything reproduces the dense module exactly (to float tolerance);
* on data with realistic structure (correlated inputs with a decaying spectrum, channels of unequal scale) it
  beats a naive alternative in calibration reconstruction error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modegpt_jax.decompose import (
    apply_qk_selection,
    cr_qk_select,
    fold_value_bias,
    nystrom_mlp,
    ridge_leverage_scores,
    vo_svd,
)

# --------------------------------------------------------------------------------------------------------------
# Helpers (NumPy, float64)
# --------------------------------------------------------------------------------------------------------------


def correlated(rng, T, d, decay=1.0):
    """Tokens x = z @ L: Gaussian z mixed by L = diag(j^-decay) Q (decaying spectrum, random orientation)."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    L = (np.arange(1, d + 1, dtype=np.float64) ** -decay)[:, None] * Q
    return rng.standard_normal((T, d)) @ L


def silu(x):
    return x / (1.0 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0.0)


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def np_(x):
    return np.asarray(x, dtype=np.float64)


def ref_leverage(C, alpha):
    lam = alpha * np.mean(np.diag(C))
    return np.diag(C @ np.linalg.inv(C + lam * np.eye(C.shape[0])))


def ref_nystrom(C, w_down, width, alpha, delta):
    s = ref_leverage(C, alpha)
    kept = np.sort(np.argsort(-s, kind="stable")[:width])
    C_SS = C[np.ix_(kept, kept)]
    ridge = delta * np.mean(np.diag(C_SS))
    # Normal equations of min ||A_S W - A W_D||^2 + ridge ||W - W_D[S]||^2.
    w = np.linalg.solve(C_SS + ridge * np.eye(width), C[kept] @ w_down + ridge * w_down[kept])
    return kept, w


def gated_mlp_data(rng, T=2048, d=32, d_int=96):
    x = correlated(rng, T, d)
    # Unequal channel scales: some intermediate channels matter much more than others.
    w_up = rng.standard_normal((d, d_int)) / np.sqrt(d) * np.exp(rng.standard_normal(d_int))
    w_gate = rng.standard_normal((d, d_int)) / np.sqrt(d)
    w_down = rng.standard_normal((d_int, d)) / np.sqrt(d_int)
    A = silu(x @ w_gate) * (x @ w_up)
    return x, w_up, w_gate, w_down, A


# --------------------------------------------------------------------------------------------------------------
# Ridge leverage scores
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_leverage_matches_explicit_inverse(alpha):
    rng = np.random.default_rng(0)
    A = correlated(rng, 300, 40, decay=1.5)
    C = A.T @ A
    s = ridge_leverage_scores(C, alpha, precision64=True)
    assert s.shape == (40,)
    np.testing.assert_allclose(np_(s), ref_leverage(C, alpha), rtol=1e-9, atol=1e-11)
    # Float32 fallback: same ranking quantity, looser tolerance.
    s32 = ridge_leverage_scores(C.astype(np.float32), alpha, precision64=False)
    assert s32.dtype == jnp.float32
    np.testing.assert_allclose(np_(s32), ref_leverage(C, alpha), atol=2e-3)


def test_leverage_factorised_in_panels(monkeypatch):
    from modegpt_jax import cholesky

    # 37 columns in panels of 5: seven full panels and a partial one (a width no other test uses, so the kernel
    # compiles afresh with these settings)
    monkeypatch.setattr(cholesky, "MIN_PANEL", 5)
    monkeypatch.setattr(cholesky, "PANELS", 8)
    rng = np.random.default_rng(3)
    A = correlated(rng, 300, 37, decay=1.5)
    C = A.T @ A
    s = ridge_leverage_scores(C, 0.1, precision64=True)
    np.testing.assert_allclose(np_(s), ref_leverage(C, 0.1), rtol=1e-9, atol=1e-11)


def test_leverage_scale_invariant_and_dead_channel_zero():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((200, 20))
    A[:, 3] = 0.0  # a dead channel
    C = A.T @ A
    s = np_(ridge_leverage_scores(C, 0.5, precision64=True))
    s_scaled = np_(ridge_leverage_scores(1e6 * C, 0.5, precision64=True))
    np.testing.assert_allclose(s, s_scaled, rtol=1e-9, atol=1e-12)
    assert s[3] == pytest.approx(0.0, abs=1e-12)
    assert np.all((s >= 0) & (s <= 1))


# --------------------------------------------------------------------------------------------------------------
# Type I: Nystrom MLP
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_panel", [None, 13])  # one compiled call; the panel steps (several panels)
def test_nystrom_matches_numpy_reference(monkeypatch, min_panel):
    from modegpt_jax import cholesky

    if min_panel is not None:
        monkeypatch.setattr(cholesky, "MIN_PANEL", min_panel)
    rng = np.random.default_rng(2)
    x, w_up, w_gate, w_down, A = gated_mlp_data(rng)
    C = A.T @ A
    out = nystrom_mlp(C, w_up, w_down, 40, w_gate=w_gate, alpha=0.3, delta=1e-6, precision64=True)
    kept_ref, w_ref = ref_nystrom(C, w_down, 40, 0.3, 1e-6)
    assert out["kept"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["kept"]), kept_ref)
    np.testing.assert_allclose(np_(out["w_down"]), w_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(np_(out["w_up"]), w_up[:, kept_ref])
    np.testing.assert_array_equal(np_(out["w_gate"]), w_gate[:, kept_ref])
    assert out["b_up"] is None


def test_nystrom_full_width_gated_reproduces_dense():
    rng = np.random.default_rng(3)
    x, w_up, w_gate, w_down, A = gated_mlp_data(rng)
    d_int = w_down.shape[0]
    out = nystrom_mlp(A.T @ A, w_up, w_down, d_int, w_gate=w_gate, precision64=True)
    np.testing.assert_array_equal(np.asarray(out["kept"]), np.arange(d_int))
    np.testing.assert_allclose(np_(out["w_down"]), w_down, rtol=1e-12, atol=1e-14)
    y = (silu(x @ np_(out["w_gate"])) * (x @ np_(out["w_up"]))) @ np_(out["w_down"])
    assert rel_err(y, A @ w_down) < 1e-6


def test_nystrom_opt_relu_bias():
    """OPT MLP: relu(x W1 + b1) W2 + b2. Kept channels exact, b2 untouched, full width reproduces dense."""
    rng = np.random.default_rng(4)
    T, d, d_int = 2048, 24, 96
    x = correlated(rng, T, d)
    w1 = rng.standard_normal((d, d_int)) / np.sqrt(d) * np.exp(rng.standard_normal(d_int))
    b1 = 0.3 * rng.standard_normal(d_int)
    w2 = rng.standard_normal((d_int, d)) / np.sqrt(d_int)
    b2 = rng.standard_normal(d)
    A = relu(x @ w1 + b1)
    C = A.T @ A
    dense = A @ w2 + b2

    full = nystrom_mlp(C, w1, w2, d_int, b_up=b1, precision64=True)
    y_full = relu(x @ np_(full["w_up"]) + np_(full["b_up"])) @ np_(full["w_down"]) + b2
    assert rel_err(y_full, dense) < 1e-6

    k = 48
    out = nystrom_mlp(C, w1, w2, k, b_up=b1, alpha=1.0, delta=1e-8, precision64=True)
    kept_ref, w_ref = ref_nystrom(C, w2, k, 1.0, 1e-8)
    np.testing.assert_array_equal(np.asarray(out["kept"]), kept_ref)
    np.testing.assert_array_equal(np_(out["b_up"]), b1[kept_ref])
    # The kept channels of the activation are reproduced exactly by the sliced up projection + bias.
    A_c = relu(x @ np_(out["w_up"]) + np_(out["b_up"]))
    np.testing.assert_allclose(A_c, A[:, kept_ref], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np_(out["w_down"]), w_ref, rtol=1e-7, atol=1e-9)


def _refit(A, y, kept):
    """Least-squares down projection for a channel subset (the same refit Nystrom uses, without ridge)."""
    return np.linalg.lstsq(A[:, kept], y, rcond=None)[0]


def test_nystrom_beats_random_channels_with_same_refit():
    rng = np.random.default_rng(5)
    x, w_up, w_gate, w_down, A = gated_mlp_data(rng, T=4096, d=48, d_int=192)
    y = A @ w_down
    k = 48
    out = nystrom_mlp(A.T @ A, w_up, w_down, k, w_gate=w_gate, precision64=True)
    A_c = silu(x @ np_(out["w_gate"])) * (x @ np_(out["w_up"]))
    err = rel_err(A_c @ np_(out["w_down"]), y)
    # The returned refit is the least-squares optimum for its channels.
    kept = np.asarray(out["kept"])
    assert err <= rel_err(A[:, kept] @ _refit(A, y, kept), y) * (1 + 1e-6)
    random_errs = [rel_err(A[:, s] @ _refit(A, y, s), y)
                   for s in (np.sort(rng.choice(A.shape[1], k, replace=False)) for _ in range(10))]
    assert err < 0.8 * np.median(random_errs)
    assert err < min(random_errs)


def test_nystrom_float32_fallback_and_dtypes():
    rng = np.random.default_rng(6)
    x, w_up, w_gate, w_down, A = gated_mlp_data(rng)
    C = (A.T @ A).astype(np.float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out32 = nystrom_mlp(C, f32(w_up), f32(w_down), 64, w_gate=f32(w_gate), precision64=False)
    out64 = nystrom_mlp(C, f32(w_up), f32(w_down), 64, w_gate=f32(w_gate), precision64=True)
    for o in (out32, out64):
        assert o["w_down"].dtype == jnp.float32 and o["w_up"].dtype == jnp.float32
        assert o["w_down"].shape == (64, w_down.shape[1]) and o["w_up"].shape == (w_up.shape[0], 64)
    y = A @ w_down
    e32 = rel_err(A[:, np.asarray(out32["kept"])] @ np_(out32["w_down"]), y)
    e64 = rel_err(A[:, np.asarray(out64["kept"])] @ np_(out64["w_down"]), y)
    assert e32 < e64 * 1.05 + 1e-4
    bf = nystrom_mlp(C, jnp.asarray(w_up, jnp.bfloat16), jnp.asarray(w_down, jnp.bfloat16), 64)
    assert bf["w_down"].dtype == jnp.bfloat16 and bf["w_up"].dtype == jnp.bfloat16


def test_precision64_does_not_leak():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((100, 16))
    ridge_leverage_scores(A.T @ A, 1.0, precision64=True)
    assert not jax.config.jax_enable_x64
    assert jnp.ones(2).dtype == jnp.float32
    assert jnp.asarray(1.0).dtype == jnp.float32


def test_nystrom_rejects_bad_width():
    C = np.eye(8)
    with pytest.raises(ValueError):
        nystrom_mlp(C, np.ones((4, 8)), np.ones((8, 4)), 0)
    with pytest.raises(ValueError):
        nystrom_mlp(C, np.ones((4, 8)), np.ones((8, 4)), 9)


# --------------------------------------------------------------------------------------------------------------
# Type II: CR key-query selection
# --------------------------------------------------------------------------------------------------------------


def rope_inv_freq(dh, base=10000.0):
    return base ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, inv_freq, pos):
    """HF rotate_half RoPE on x [T, 2m] with per-pair frequencies inv_freq [m]."""
    ang = pos[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))
    return x * cos + rotate_half(x) * sin


def ref_cr(eq, ek, qk_dim, rope):
    """Loop-based reference of the CR selection."""
    H, dh = eq.shape
    G = ek.shape[0]
    g = H // G
    chans, pairs_all = [], []
    for grp in range(G):
        heads = range(grp * g, (grp + 1) * g)
        if rope:
            half = dh // 2
            score = [sum(np.sqrt((eq[i, p] + eq[i, p + half]) * (ek[grp, p] + ek[grp, p + half])) for i in heads)
                     for p in range(half)]
            pairs = np.sort(np.argsort(-np.array(score), kind="stable")[: qk_dim // 2])
            pairs_all.append(pairs)
            chans.append(np.concatenate([pairs, pairs + half]))
        else:
            score = [sum(np.sqrt(eq[i, j] * ek[grp, j]) for i in heads) for j in range(dh)]
            chans.append(np.sort(np.argsort(-np.array(score), kind="stable")[:qk_dim]))
    return np.array(chans), (np.array(pairs_all) if rope else None)


def qk_data(rng, T=512, d=32, H=6, G=2, dh=16, bias=False):
    x = correlated(rng, T, d, decay=0.7)
    # Per-channel scales: some RoPE pairs / channels carry far more energy than others.
    w_q = rng.standard_normal((d, H * dh)) * np.tile(np.exp(1.2 * rng.standard_normal(dh)), H)
    w_k = rng.standard_normal((d, G * dh)) * np.tile(np.exp(1.2 * rng.standard_normal(dh)), G)
    b_q = rng.standard_normal(H * dh) if bias else None
    b_k = rng.standard_normal(G * dh) if bias else None
    return x, w_q, w_k, b_q, b_k


def head_proj(x, w, b, n, dh):
    y = x @ w + (0 if b is None else b)
    return y.reshape(x.shape[0], n, dh).transpose(1, 0, 2)  # [n, T, dh]


def energies(x, w_q, w_k, H, G, dh, b_q=None, b_k=None):
    q = head_proj(x, w_q, b_q, H, dh)
    k = head_proj(x, w_k, b_k, G, dh)
    return (q**2).sum(1), (k**2).sum(1)


def rope_scores(x, w_q, w_k, H, G, dh_w, inv_freq_per_group, dh_scale, pos):
    """Per-head attention logits rope(q_i) rope(k_g)^T / sqrt(dh_scale), [H, T, T]."""
    q = head_proj(x, w_q, None, H, dh_w)
    k = head_proj(x, w_k, None, G, dh_w)
    g = H // G
    kr = [apply_rope(k[grp], inv_freq_per_group[grp], pos) for grp in range(G)]
    return np.stack([apply_rope(q[i], inv_freq_per_group[i // g], pos) @ kr[i // g].T for i in range(H)]) / np.sqrt(
        dh_scale)


@pytest.mark.parametrize("H,G", [(6, 2), (4, 4)])
@pytest.mark.parametrize("rope", [True, False])
def test_cr_matches_loop_reference(H, G, rope):
    rng = np.random.default_rng(10)
    dh = 16
    x, w_q, w_k, _, _ = qk_data(rng, H=H, G=G, dh=dh)
    eq, ek = energies(x, w_q, w_k, H, G, dh)
    qk_dim = 6
    chans, pairs = cr_qk_select(eq, ek, qk_dim, rope=rope)
    ref_c, ref_p = ref_cr(eq, ek, qk_dim, rope)
    assert chans.dtype == jnp.int32 and chans.shape == (G, qk_dim)
    np.testing.assert_array_equal(np.asarray(chans), ref_c)
    if rope:
        assert pairs.dtype == jnp.int32 and pairs.shape == (G, qk_dim // 2)
        np.testing.assert_array_equal(np.asarray(pairs), ref_p)
    else:
        assert pairs is None


def test_apply_qk_selection_matches_loop_gather():
    rng = np.random.default_rng(11)
    H, G, dh, d = 6, 2, 8, 12
    w_q, w_k = rng.standard_normal((d, H * dh)), rng.standard_normal((d, G * dh))
    b_q, b_k = rng.standard_normal(H * dh), rng.standard_normal(G * dh)
    chans = np.array([[0, 3, 5], [1, 2, 7]])
    out = apply_qk_selection(w_q, w_k, chans, H, b_q=b_q, b_k=b_k)
    g = H // G
    ref_q = np.concatenate([w_q[:, i * dh + chans[i // g]] for i in range(H)], axis=1)
    ref_k = np.concatenate([w_k[:, grp * dh + chans[grp]] for grp in range(G)], axis=1)
    ref_bq = np.concatenate([b_q[i * dh + chans[i // g]] for i in range(H)])
    ref_bk = np.concatenate([b_k[grp * dh + chans[grp]] for grp in range(G)])
    np.testing.assert_allclose(np_(out["w_q"]), ref_q, rtol=1e-6)
    np.testing.assert_allclose(np_(out["w_k"]), ref_k, rtol=1e-6)
    np.testing.assert_allclose(np_(out["b_q"]), ref_bq, rtol=1e-6)
    np.testing.assert_allclose(np_(out["b_k"]), ref_bk, rtol=1e-6)
    assert apply_qk_selection(w_q, w_k, chans, H)["b_q"] is None


def test_pair_energy_is_rope_invariant():
    """The reason pre-RoPE energies suffice: E(p) + E(p + dh/2) is unchanged by the rotation, token by token."""
    rng = np.random.default_rng(12)
    dh = 16
    q = rng.standard_normal((64, dh))
    qr = apply_rope(q, rope_inv_freq(dh), np.arange(64, dtype=np.float64))
    h = dh // 2
    np.testing.assert_allclose(q[:, :h] ** 2 + q[:, h:] ** 2, qr[:, :h] ** 2 + qr[:, h:] ** 2, rtol=1e-10)


@pytest.mark.parametrize("qk_dim", [16, 6])
def test_cr_rope_compressed_scores_equal_dense_with_channels_zeroed(qk_dim):
    rng = np.random.default_rng(13)
    H, G, dh, T = 6, 2, 16, 40
    x, w_q, w_k, _, _ = qk_data(rng, T=T, H=H, G=G, dh=dh)
    eq, ek = energies(x, w_q, w_k, H, G, dh)
    chans, pairs = cr_qk_select(eq, ek, qk_dim, rope=True)
    chans, pairs = np.asarray(chans), np.asarray(pairs)
    out = apply_qk_selection(w_q, w_k, chans, H)
    pos = np.arange(T, dtype=np.float64)
    inv_freq = rope_inv_freq(dh)
    # Compressed: gathered ORIGINAL frequencies, softmax scale of the ORIGINAL head dim.
    comp = rope_scores(x, np_(out["w_q"]), np_(out["w_k"]), H, G, qk_dim,
                       [inv_freq[pairs[grp]] for grp in range(G)], dh, pos)
    # Dense with the dropped channels zeroed in both W_Q (per head, by group) and W_K.
    mask = np.zeros((G, dh))
    for grp in range(G):
        mask[grp, chans[grp]] = 1.0
    g = H // G
    w_q0 = w_q * np.concatenate([mask[i // g] for i in range(H)])
    w_k0 = w_k * mask.reshape(-1)
    dense0 = rope_scores(x, w_q0, w_k0, H, G, dh, [inv_freq] * G, dh, pos)
    # Float32 weights after the gather: relative tolerance.
    np.testing.assert_allclose(comp, dense0, rtol=1e-4, atol=1e-4 * np.abs(dense0).max())
    if qk_dim == dh:  # everything kept: the dense scores themselves
        dense = rope_scores(x, w_q, w_k, H, G, dh, [inv_freq] * G, dh, pos)
        np.testing.assert_allclose(comp, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def test_cr_no_rope_with_bias_equals_dense_with_channels_zeroed():
    rng = np.random.default_rng(14)
    H = G = 4
    dh, T, qk_dim = 8, 50, 5
    x, w_q, w_k, b_q, b_k = qk_data(rng, T=T, H=H, G=G, dh=dh, bias=True)
    eq, ek = energies(x, w_q, w_k, H, G, dh, b_q, b_k)
    chans, pairs = cr_qk_select(eq, ek, qk_dim, rope=False)
    assert pairs is None
    chans = np.asarray(chans)
    out = apply_qk_selection(w_q, w_k, chans, H, b_q=b_q, b_k=b_k)
    q = head_proj(x, np_(out["w_q"]), np_(out["b_q"]), H, qk_dim)
    k = head_proj(x, np_(out["w_k"]), np_(out["b_k"]), G, qk_dim)
    comp = np.einsum("htc,hsc->hts", q, k)
    m = np.zeros((H, dh))
    for h in range(H):
        m[h, chans[h]] = 1.0
    q0 = head_proj(x, w_q, b_q, H, dh) * m[:, None, :]
    k0 = head_proj(x, w_k, b_k, G, dh) * m[:, None, :]
    dense0 = np.einsum("htc,hsc->hts", q0, k0)
    np.testing.assert_allclose(comp, dense0, rtol=1e-4, atol=1e-4 * np.abs(dense0).max())


def test_cr_beats_random_pairs():
    rng = np.random.default_rng(15)
    H, G, dh, T, qk_dim = 6, 2, 16, 256, 6
    x, w_q, w_k, _, _ = qk_data(rng, T=T, H=H, G=G, dh=dh)
    eq, ek = energies(x, w_q, w_k, H, G, dh)
    pos = np.arange(T, dtype=np.float64)
    inv_freq = rope_inv_freq(dh)
    dense = rope_scores(x, w_q, w_k, H, G, dh, [inv_freq] * G, dh, pos)

    def err(pairs):
        chans = np.concatenate([pairs, pairs + dh // 2], axis=1)
        out = apply_qk_selection(w_q, w_k, chans, H)
        comp = rope_scores(x, np_(out["w_q"]), np_(out["w_k"]), H, G, qk_dim,
                           [inv_freq[pairs[grp]] for grp in range(G)], dh, pos)
        return rel_err(comp, dense)

    _, pairs = cr_qk_select(eq, ek, qk_dim, rope=True)
    e_cr = err(np.asarray(pairs))
    e_rand = [err(np.stack([np.sort(rng.choice(dh // 2, qk_dim // 2, replace=False)) for _ in range(G)]))
              for _ in range(10)]
    assert e_cr < 0.8 * np.median(e_rand)
    assert e_cr <= min(e_rand)


def test_cr_rejects_bad_dims():
    eq, ek = np.ones((6, 16)), np.ones((2, 16))
    with pytest.raises(ValueError):
        cr_qk_select(eq, ek, 5, rope=True)  # odd with RoPE
    with pytest.raises(ValueError):
        cr_qk_select(eq, ek, 18, rope=True)
    with pytest.raises(ValueError):
        cr_qk_select(np.ones((5, 16)), ek, 4)  # H not a multiple of G


# --------------------------------------------------------------------------------------------------------------
# Type III: value-output joint SVD
# --------------------------------------------------------------------------------------------------------------


def sqrtm_psd(C):
    w, V = np.linalg.eigh(C)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def vo_data(rng, T=1024, d=24, H=6, G=2, dh=8):
    x = correlated(rng, T, d, decay=1.0)
    w_v = rng.standard_normal((d, G * dh)) / np.sqrt(d)
    w_o = rng.standard_normal((H * dh, d)) / np.sqrt(dh) * np.exp(rng.standard_normal((H * dh, 1)))
    return x, w_v, w_o


def blocks(w_v, w_o, H, G, dh):
    """Per-head products W_V,g(i) W_O,i, [H, d, d]."""
    g = H // G
    return np.stack([w_v[:, (i // g) * dh:(i // g + 1) * dh] @ w_o[i * dh:(i + 1) * dh] for i in range(H)])


def vo_error(C_half, w_v, w_o, w_v2, w_o2, H, G, dh, rank):
    """sum_i ||C^(1/2) (W_V,g W_O,i - V'_g O'_i)||_F^2 relative to sum_i ||C^(1/2) W_V,g W_O,i||_F^2."""
    P = blocks(w_v, w_o, H, G, dh)
    P2 = blocks(w_v2, w_o2, H, G, rank)
    return sum(np.linalg.norm(C_half @ (P[i] - P2[i])) ** 2 for i in range(H)) / sum(
        np.linalg.norm(C_half @ P[i]) ** 2 for i in range(H))


def ref_vo_optimum(C, w_v, w_o, H, G, dh, rank):
    """Reference via an explicit matrix square root: best rank-k approximation of
    B_g = C^(1/2) [W_V,g W_O,i for i in g] (truncated SVD), mapped back with C^(-1/2). Returns products [H, d, d]."""
    w, V = np.linalg.eigh(C)
    C_half = (V * np.sqrt(w)) @ V.T
    C_mhalf = (V / np.sqrt(w)) @ V.T
    P = blocks(w_v, w_o, H, G, dh)
    g = H // G
    out = []
    for grp in range(G):
        B = np.concatenate([C_half @ P[i] for i in range(grp * g, (grp + 1) * g)], axis=1)
        U, s, Vt = np.linalg.svd(B, full_matrices=False)
        Bk = (U[:, :rank] * s[:rank]) @ Vt[:rank]
        out += [C_mhalf @ blk for blk in np.split(Bk, g, axis=1)]
    return np.stack(out)


@pytest.mark.parametrize("H,G", [(6, 2), (4, 4)])
@pytest.mark.parametrize("rank", [3, 8])
def test_vo_matches_sqrtm_reference(H, G, rank):
    rng = np.random.default_rng(20)
    dh = 8
    x, w_v, w_o = vo_data(rng, H=H, G=G, dh=dh)
    C = x.T @ x
    out = vo_svd(C, w_v, w_o, rank, H, eps=0.0, precision64=True)
    assert out["w_v"].shape == (w_v.shape[0], G * rank) and out["w_o"].shape == (H * rank, w_o.shape[1])
    got = blocks(np_(out["w_v"]), np_(out["w_o"]), H, G, rank)
    ref = ref_vo_optimum(C, w_v, w_o, H, G, dh, rank)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-8 * np.abs(ref).max())
    # The default (tiny, relative) ridge changes nothing measurable.
    got_def = blocks(np_(vo_svd(C, w_v, w_o, rank, H)["w_v"]), np_(vo_svd(C, w_v, w_o, rank, H)["w_o"]),
                     H, G, rank)
    np.testing.assert_allclose(got_def, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_vo_full_rank_reproduces_dense_attention_output():
    rng = np.random.default_rng(21)
    H, G, dh, T = 6, 2, 8, 64
    x, w_v, w_o = vo_data(rng, T=T, H=H, G=G, dh=dh)
    C = x.T @ x
    # A large ridge still gives the exact product at full rank (the ridge only shapes the truncation).
    for eps in (None, 1e-2):
        out = vo_svd(C, w_v, w_o, dh, H, eps=eps, precision64=True)
        np.testing.assert_allclose(blocks(np_(out["w_v"]), np_(out["w_o"]), H, G, dh), blocks(w_v, w_o, H, G, dh),
                                   rtol=1e-8, atol=1e-10)
    # Attention output sum_i P_i (x W_V,g) W_O,i with row-stochastic P_i.
    logits = rng.standard_normal((H, T, T))
    P = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = H // G

    def attn(wv, wo, r):
        v = x @ wv
        return sum(P[i] @ v[:, (i // g) * r:(i // g + 1) * r] @ wo[i * r:(i + 1) * r] for i in range(H))

    out32 = vo_svd(C.astype(np.float32), w_v.astype(np.float32), w_o.astype(np.float32), dh, H, precision64=False)
    assert out32["w_v"].dtype == jnp.float32
    assert rel_err(attn(np_(out32["w_v"]), np_(out32["w_o"]), dh), attn(w_v, w_o, dh)) < 1e-4


def test_vo_beats_truncating_w_v_alone():
    rng = np.random.default_rng(22)
    H, G, dh, rank = 6, 2, 8, 3
    x, w_v, w_o = vo_data(rng, T=2048, d=32, H=H, G=G, dh=dh)
    C = x.T @ x
    C_half = sqrtm_psd(C)
    out = vo_svd(C, w_v, w_o, rank, H, precision64=True)
    e_joint = vo_error(C_half, w_v, w_o, np_(out["w_v"]), np_(out["w_o"]), H, G, dh, rank)
    g = H // G

    def from_basis(bases):
        """Given an orthonormal (in some metric) basis per group, V' = W_V B, O'_i = pinv-projection of W_O,i."""
        wv2, wo2 = [], []
        for grp in range(G):
            wv2.append(w_v[:, grp * dh:(grp + 1) * dh] @ bases[grp][0])
        for i in range(H):
            wo2.append(bases[i // g][1] @ w_o[i * dh:(i + 1) * dh])
        return np.concatenate(wv2, axis=1), np.concatenate(wo2, axis=0)

    # Naive 1: plain SVD of W_V,g = U S V^T, keep rank: V' = U_k S_k, O'_i = V_k^T W_O,i.
    plain = []
    for grp in range(G):
        U, s, Vt = np.linalg.svd(w_v[:, grp * dh:(grp + 1) * dh], full_matrices=False)
        plain.append((Vt[:rank].T, Vt[:rank]))  # W_V V_k V_k^T
    e_plain = vo_error(C_half, w_v, w_o, *from_basis(plain), H, G, dh, rank)
    # Naive 2: whitened SVD of C^(1/2) W_V,g alone (ignores W_O): W_V N_k N_k^+ with N from that SVD.
    white = []
    for grp in range(G):
        B = C_half @ w_v[:, grp * dh:(grp + 1) * dh]
        U, s, Vt = np.linalg.svd(B, full_matrices=False)
        white.append((Vt[:rank].T, Vt[:rank]))
    e_white = vo_error(C_half, w_v, w_o, *from_basis(white), H, G, dh, rank)
    assert e_joint < 0.9 * e_plain
    assert e_joint < 0.9 * e_white
    # And it reaches the optimum: the tail of the singular values of the whitened products.
    opt = blocks(w_v, w_o, H, G, dh) - ref_vo_optimum(C, w_v, w_o, H, G, dh, rank)
    e_opt = sum(np.linalg.norm(C_half @ b) ** 2 for b in opt) / sum(
        np.linalg.norm(C_half @ b) ** 2 for b in blocks(w_v, w_o, H, G, dh))
    assert e_joint == pytest.approx(e_opt, rel=1e-6)


def test_vo_bf16_io_and_bad_rank():
    rng = np.random.default_rng(23)
    x, w_v, w_o = vo_data(rng)
    out = vo_svd(jnp.asarray(x.T @ x, jnp.float32), jnp.asarray(w_v, jnp.bfloat16), jnp.asarray(w_o, jnp.bfloat16),
                 4, 6)
    assert out["w_v"].dtype == jnp.bfloat16 and out["w_o"].dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        vo_svd(x.T @ x, w_v, w_o, 9, 6)


def test_fold_value_bias_exact():
    rng = np.random.default_rng(24)
    H, G, dh, d, T = 6, 2, 8, 16, 20
    x = rng.standard_normal((T, d))
    w_v, b_v = rng.standard_normal((d, G * dh)), rng.standard_normal(G * dh)
    w_o, b_o = rng.standard_normal((H * dh, d)), rng.standard_normal(d)
    logits = rng.standard_normal((H, T, T))
    P = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = H // G

    def attn(bv, bo):
        v = x @ w_v + bv
        return sum(P[i] @ v[:, (i // g) * dh:(i // g + 1) * dh] @ w_o[i * dh:(i + 1) * dh] for i in range(H)) + bo

    new_bo = np_(fold_value_bias(b_v, w_o, b_o, H, precision64=True))
    np.testing.assert_allclose(attn(0.0, new_bo), attn(b_v, b_o), rtol=1e-10, atol=1e-10)
    new_bo0 = np_(fold_value_bias(b_v, w_o, None, H, precision64=True))
    np.testing.assert_allclose(attn(0.0, new_bo0), attn(b_v, 0.0), rtol=1e-10, atol=1e-10)


def test_singular_float32_statistics_still_factorise():
    """Fewer tokens than channels, summed in float32 (slightly indefinite): the ridge grows until it works."""
    rng = np.random.default_rng(7)
    d, d_int, tokens = 32, 96, 40
    A = (rng.standard_normal((tokens, 8)) @ rng.standard_normal((8, d_int)) * 50).astype(np.float32)
    C_s = (A.T @ A).astype(np.float32)  # rank 8 of 96, float32 rounding
    w_up = rng.standard_normal((d, d_int)).astype(np.float32)
    w_down = rng.standard_normal((d_int, d)).astype(np.float32)
    out = nystrom_mlp(C_s, w_up, w_down, 48, delta=0.0)
    assert np.all(np.isfinite(np.asarray(out["w_down"])))
    # The refit still reproduces the calibration outputs of the low-rank activations well.
    err = np.linalg.norm(A[:, np.asarray(out["kept"])] @ np.asarray(out["w_down"]) - A @ w_down)
    assert err < 1e-2 * np.linalg.norm(A @ w_down)
