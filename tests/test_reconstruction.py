"""Closed-form reconstruction errors (modegpt_jax.reconstruction) against explicit float64 NumPy definitions.

References are written from the definitions, with the calibration inputs explicit (an activation matrix ``A`` for
the MLP, ``x`` and the per-head ``[d, d]`` products ``W_V,g(i) W_O,i`` for value-output); the functions only get
``C = A^T A`` / ``x^T x`` rounded to float32.

Tolerances come from measurements of the float32 functions against float64 (``d_int = 1536, d = 576, k = 1000`` for
the MLP; ``d = 1024, H = 8, G = 2, r = 64`` for VO; decaying activation spectra with and without a large mean):
  * MLP: |deviation| <= 1.2e-8 (the textbook ``ref - 2 cross + new`` form: ~1e-7).
  * VO, factors of the whitened SVD (``V'`` in ``span(W_V)``): |deviation| <= 5e-8, and <= 1e-13 where the true
    error is ~0 (textbook form: up to 8e-7 and 4e-7). Arbitrary factors (errors 0.06 .. 18): relative
    deviation <= 5e-7.
Asserted with ~20x margin: ``|dev| <= 1e-6 + 1e-5 * err``, and ``< 1e-9`` where the error is ~0.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modegpt_jax.reconstruction import mlp_relative_error, vo_relative_error

ATOL, RTOL = 1e-6, 1e-5


def _close(got, want):
    got = float(got)
    assert abs(got - want) <= ATOL + RTOL * abs(want), (got, want, abs(got - want))


def _activations(rng, n, m, decay, mean):
    """``[n, m]`` activations with singular values ``~ j^-decay`` in a random basis, plus a per-channel offset."""
    Q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = (np.arange(m) + 1.0) ** -decay
    return (rng.standard_normal((n, m)) * s) @ Q + mean * rng.standard_normal(m)


# --------------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------------


def mlp_reference(A, w_down, kept, w_down_new):
    """``||A W_D - A[:, kept] W_D'||^2 / ||A W_D||^2`` in float64, from the activations themselves."""
    A, W, Wn = (np.asarray(a, np.float64) for a in (A, w_down, w_down_new))
    full = A @ W
    return float(np.sum((full - A[:, kept] @ Wn) ** 2) / np.sum(full**2))


def nystrom_refit(C, w_down, k):
    """Top-``k`` ridge-leverage channels and the least-squares refit of ``W_D`` on them (float64)."""
    d_int = C.shape[0]
    lev = np.diag(C @ np.linalg.inv(C + np.mean(np.diag(C)) * np.eye(d_int)))
    kept = np.sort(np.argsort(-lev)[:k])
    Css = C[np.ix_(kept, kept)]
    w_new = np.linalg.solve(Css + 1e-8 * np.mean(np.diag(Css)) * np.eye(k), C[kept] @ w_down)
    return kept, w_new


@pytest.mark.parametrize("decay,mean", [(0.5, 0.0), (1.0, 1.0)])
def test_mlp_matches_definition_at_realistic_size(decay, mean):
    rng = np.random.default_rng(1)
    d_int, d, k = 1536, 576, 1000
    A = _activations(rng, 2048, d_int, decay, mean)
    w_down = (rng.standard_normal((d_int, d)) / np.sqrt(d_int)).astype(np.float32)
    kept, w_new = nystrom_refit(A.T @ A, w_down.astype(np.float64), k)
    w_new = w_new.astype(np.float32)
    C32 = (A.T @ A).astype(np.float32)
    got = mlp_relative_error(C32, w_down, kept, w_new)
    assert got.dtype == jnp.float32 and got.shape == ()
    _close(got, mlp_reference(A, w_down, kept, w_new))
    # Arbitrary (not refitted) replacement rows, unsorted and as a jax array of indices.
    perm = rng.permutation(d_int)[:k]
    w_rand = (w_down[perm] + 0.1 * rng.standard_normal((k, d)) / np.sqrt(d_int)).astype(np.float32)
    _close(mlp_relative_error(jnp.asarray(C32), jnp.asarray(w_down), jnp.asarray(perm), jnp.asarray(w_rand)),
           mlp_reference(A, w_down, perm, w_rand))


def test_mlp_keep_everything_is_zero():
    rng = np.random.default_rng(2)
    A = _activations(rng, 256, 96, 0.5, 0.5)
    C32 = (A.T @ A).astype(np.float32)
    w_down = rng.standard_normal((96, 40)).astype(np.float32)
    assert float(mlp_relative_error(C32, w_down, np.arange(96), w_down)) == 0.0
    perm = rng.permutation(96)
    assert float(mlp_relative_error(C32, w_down, perm, w_down[perm])) == 0.0
    # Dropping channels with zero activation costs nothing either.
    A[:, 10:20] = 0.0
    kept = np.setdiff1d(np.arange(96), np.arange(10, 20))
    assert float(mlp_relative_error((A.T @ A).astype(np.float32), w_down, kept, w_down[kept])) < 1e-9


def test_mlp_float64_mode():
    rng = np.random.default_rng(3)
    A = _activations(rng, 300, 128, 1.0, 1.0)
    w_down = rng.standard_normal((128, 48))
    kept, w_new = nystrom_refit(A.T @ A, w_down, 80)
    with jax.enable_x64(True):
        got = mlp_relative_error(A.T @ A, w_down, kept, w_new)
        assert got.dtype == jnp.float64
    want = mlp_reference(A, w_down, kept, w_new)
    assert abs(float(got) - want) <= 1e-12 + 1e-9 * want


def test_mlp_shape_errors():
    C = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="C_s"):
        mlp_relative_error(np.eye(7, dtype=np.float32), np.ones((8, 3), np.float32), np.arange(4), np.ones((4, 3)))
    with pytest.raises(ValueError, match="w_down_new"):
        mlp_relative_error(C, np.ones((8, 3), np.float32), np.arange(4), np.ones((5, 3), np.float32))


# --------------------------------------------------------------------------------------------------------------
# Value-output
# --------------------------------------------------------------------------------------------------------------


def per_head_products(w_v, w_o, n_heads):
    """``[H, d, d]``: ``W_V,g(i) W_O,i`` for every query head ``i`` (float64)."""
    w_v, w_o = np.asarray(w_v, np.float64), np.asarray(w_o, np.float64)
    r = w_o.shape[0] // n_heads
    g = n_heads // (w_v.shape[1] // r)
    return np.stack([w_v[:, (i // g) * r:(i // g + 1) * r] @ w_o[i * r:(i + 1) * r] for i in range(n_heads)])


def vo_reference(x, w_v, w_o, w_v_new, w_o_new, n_heads):
    """``sum_i ||x (W_V,g(i) W_O,i - V'_g(i) O'_i)||^2 / sum_i ||x W_V,g(i) W_O,i||^2`` in float64."""
    x = np.asarray(x, np.float64)
    dense = per_head_products(w_v, w_o, n_heads)
    diff = dense - per_head_products(w_v_new, w_o_new, n_heads)
    return float(sum(np.sum((x @ m) ** 2) for m in diff) / sum(np.sum((x @ m) ** 2) for m in dense))


def whitened_vo_factors(C, w_v, w_o, k, n_heads):
    """The method's value-output factors (shared ``V'_g``, per-head ``O'_i``), in float64 NumPy."""
    d = C.shape[0]
    r = w_o.shape[0] // n_heads
    G = w_v.shape[1] // r
    g = n_heads // G
    vs, os_ = [], []
    for grp in range(G):
        wv = w_v[:, grp * r:(grp + 1) * r]
        P = wv.T @ C @ wv
        R = np.linalg.cholesky(P + 1e-10 * np.mean(np.diag(P)) * np.eye(r)).T  # upper, P ~ R^T R
        heads = [w_o[i * r:(i + 1) * r] for i in range(grp * g, (grp + 1) * g)]
        U = np.linalg.svd(R @ np.concatenate(heads, axis=1), full_matrices=False)[0][:, :k]
        vs.append(wv @ np.linalg.solve(R, U))
        os_ += [U.T @ R @ wo for wo in heads]
    return np.concatenate(vs, axis=1).reshape(d, G * k), np.concatenate(os_, axis=0)


def _vo_problem(rng, d, n_heads, G, r, k, decay=1.0, mean=1.0, n=1024):
    x = _activations(rng, n, d, decay, mean)
    w_v = rng.standard_normal((d, G * r)) / np.sqrt(d)
    w_o = rng.standard_normal((n_heads * r, d)) / np.sqrt(n_heads * r)
    w_v_new, w_o_new = whitened_vo_factors(x.T @ x, w_v, w_o, k, n_heads)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return x, f32(x.T @ x), f32(w_v), f32(w_o), f32(w_v_new), f32(w_o_new)


@pytest.mark.parametrize("n_heads,G,r,k", [(8, 2, 64, 48), (4, 4, 32, 20), (8, 1, 32, 8)])
def test_vo_matches_definition(n_heads, G, r, k):
    rng = np.random.default_rng(4)
    x, C, w_v, w_o, v_new, o_new = _vo_problem(rng, 512, n_heads, G, r, k)
    got = vo_relative_error(C, w_v, w_o, v_new, o_new, n_heads)
    assert got.dtype == jnp.float32 and got.shape == ()
    _close(got, vo_reference(x, w_v, w_o, v_new, o_new, n_heads))
    # Arbitrary factors: V' leaves span(W_V), O' off the optimum; a larger k than r is allowed too.
    v_pert = (v_new + 0.05 * rng.standard_normal(v_new.shape) / np.sqrt(512)).astype(np.float32)
    o_pert = (o_new * (1 + 1e-2 * rng.standard_normal(o_new.shape))).astype(np.float32)
    _close(vo_relative_error(jnp.asarray(C), jnp.asarray(w_v), jnp.asarray(w_o), jnp.asarray(v_pert),
                             jnp.asarray(o_pert), n_heads),
           vo_reference(x, w_v, w_o, v_pert, o_pert, n_heads))
    v_wide = np.concatenate([v_pert, v_pert[:, : G * 8]], axis=1)
    o_wide = rng.standard_normal((n_heads * (k + 8), 512)).astype(np.float32) / np.sqrt(k)
    _close(vo_relative_error(C, w_v, w_o, v_wide, o_wide, n_heads),
           vo_reference(x, w_v, w_o, v_wide, o_wide, n_heads))


def test_vo_keep_everything_is_zero():
    rng = np.random.default_rng(5)
    x, C, w_v, w_o, v_full, o_full = _vo_problem(rng, 256, 8, 2, 32, 32)
    assert float(vo_relative_error(C, w_v, w_o, w_v, w_o, 8)) < 1e-9
    # Full-rank whitened factors differ from the originals but reproduce every head product.
    want = vo_reference(x, w_v, w_o, v_full, o_full, 8)
    assert want < 1e-9
    assert float(vo_relative_error(C, w_v, w_o, v_full, o_full, 8)) < 1e-9


def test_vo_float64_mode():
    rng = np.random.default_rng(6)
    x = _activations(rng, 400, 128, 1.0, 1.0)
    w_v, w_o = rng.standard_normal((128, 2 * 16)), rng.standard_normal((4 * 16, 128))
    v_new, o_new = whitened_vo_factors(x.T @ x, w_v, w_o, 10, 4)
    with jax.enable_x64(True):
        got = vo_relative_error(x.T @ x, w_v, w_o, v_new, o_new, 4)
        assert got.dtype == jnp.float64
    want = vo_reference(x, w_v, w_o, v_new, o_new, 4)
    assert abs(float(got) - want) <= 1e-12 + 1e-9 * want


def test_vo_shape_errors():
    C = np.eye(16, dtype=np.float32)
    w_v, w_o = np.ones((16, 8), np.float32), np.ones((16, 16), np.float32)  # G=2, H=4, r=4
    with pytest.raises(ValueError, match="w_v_new"):
        vo_relative_error(C, w_v, w_o, np.ones((16, 6), np.float32), np.ones((8, 16), np.float32), 4)
    with pytest.raises(ValueError, match="multiple"):
        vo_relative_error(C, np.ones((16, 12), np.float32), w_o, np.ones((16, 6), np.float32),
                          np.ones((8, 16), np.float32), 4)
    with pytest.raises(ValueError, match="w_o must"):
        vo_relative_error(C, w_v, np.ones((15, 16), np.float32), w_v, w_o, 4)


@pytest.mark.slow
def test_vo_memory_at_llama2_7b_attention_size():
    """d=4096, H=G*4=32, r=128, k=96: no [H, d, d] array (2 GiB); nothing larger than C (64 MiB) is allocated."""
    d, H, G, r, k = 4096, 32, 8, 128, 96
    key = jax.random.split(jax.random.key(0), 5)
    f = jax.random.normal(key[0], (d, 256), jnp.float32)
    C = jnp.matmul(f, f.T, precision="highest") + jnp.eye(d, dtype=jnp.float32)
    w_v = jax.random.normal(key[1], (d, G * r), jnp.float32) / np.sqrt(d)
    w_o = jax.random.normal(key[2], (H * r, d), jnp.float32) / np.sqrt(H * r)
    v_new = jax.random.normal(key[3], (d, G * k), jnp.float32) / np.sqrt(d)
    o_new = jax.random.normal(key[4], (H * k, d), jnp.float32) / np.sqrt(H * k)
    compiled = vo_relative_error.lower(C, w_v, w_o, v_new, o_new, n_heads=H).compile()

    # No array in the optimised program holds more elements than C.
    shapes = re.findall(r"\b(?:f32|f64|s32|pred)\[([\d,]+)\]", compiled.as_text())
    largest = max(int(np.prod([int(s) for s in shape.split(",")])) for shape in shapes)
    assert largest <= d * d < H * d * d
    stats = compiled.memory_analysis()
    if stats is not None:
        assert stats.temp_size_in_bytes <= 3 * C.nbytes, stats.temp_size_in_bytes

    err = compiled(C, w_v, w_o, v_new, o_new)
    assert np.isfinite(float(err)) and float(err) > 0.0
