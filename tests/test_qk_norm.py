"""Key-query compression under per-head q/k norms (Qwen3, Gemma 3; ``qk_norm_mode="corrected"``): the norm of
a compressed head runs over its kept channels, with a per-head gain fitted on the calibration energies."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from modegpt_jax.model import Norm
from modegpt_jax.block_compression import corrected_qk_norms

H, G, DH = 4, 2, 8
KEPT = np.array([[0, 2, 4, 6], [1, 3, 5, 7]])  # pairs (0, 2) in group 0, (1, 3) in group 1


def heads_with_kept_share(rng, n_tokens, heads, kept, share):
    """Random head projections [N, heads, DH] whose kept channels hold ``share[h]`` of every token's energy."""
    x = rng.normal(size=(n_tokens, heads, DH)) * rng.uniform(0.2, 3.0, size=(n_tokens, heads, 1))
    mask = np.zeros((heads, DH), bool)
    np.put_along_axis(mask, kept, True, axis=1)
    energy = (x * x).sum(-1, keepdims=True)
    kept_energy = (x * x * mask).sum(-1, keepdims=True)
    scale = np.where(mask, np.sqrt(share[:, None] * energy / kept_energy),
                     np.sqrt((1 - share[:, None]) * energy / (energy - kept_energy)))
    return x * scale


@pytest.mark.parametrize("kind", ["rms", "rms_offset"])
def test_correction_is_exact_when_the_kept_share_is_the_same_for_every_token(kind):
    rng = np.random.default_rng(0)
    cfg = types.SimpleNamespace(group_size=H // G, head_dim=DH, norm=kind)
    norms = {}
    for name, n in (("q_norm", H), ("k_norm", G)):
        norm = Norm(DH, kind=kind, eps=1e-12, dtype=jnp.float32)
        norm.weight.set_value(jnp.asarray(rng.normal(size=DH) * 0.5 + (0.0 if kind == "rms_offset" else 1.0),
                                          jnp.float32))
        norms[name] = norm
    q_kept, k_kept = np.repeat(KEPT, H // G, axis=0), KEPT
    q = heads_with_kept_share(rng, 64, H, q_kept, np.array([0.9, 0.6, 0.3, 0.75]))
    k = heads_with_kept_share(rng, 64, G, k_kept, np.array([0.5, 0.8]))
    dense_q = np.asarray(norms["q_norm"](jnp.asarray(q, jnp.float32)), np.float64)
    dense_k = np.asarray(norms["k_norm"](jnp.asarray(k, jnp.float32)), np.float64)
    attn = types.SimpleNamespace(**norms)
    w_q, w_k = corrected_qk_norms(attn, cfg, KEPT, (dense_q**2).sum(0), (dense_k**2).sum(0))
    assert w_q.shape == (H, 4) and w_k.shape == (G, 4)
    for x, dense, w, kept in ((q, dense_q, w_q, q_kept), (k, dense_k, w_k, k_kept)):
        compressed = Norm(w.shape, kind=kind, eps=1e-12, dtype=jnp.float32)
        compressed.weight.set_value(jnp.asarray(w, jnp.float32))
        x_kept = np.take_along_axis(x, kept[None], axis=2)
        out = np.asarray(compressed(jnp.asarray(x_kept, jnp.float32)))
        np.testing.assert_allclose(out, np.take_along_axis(dense, kept[None], axis=2), rtol=2e-5, atol=2e-5)
        # The uncorrected norm (the dense gains of the kept channels) is off by the per-head factor.
        plain = Norm(w.shape, kind=kind, eps=1e-12, dtype=jnp.float32)
        gains = np.asarray(attn.q_norm.weight[...] if x is q else attn.k_norm.weight[...])[kept]
        plain.weight.set_value(jnp.asarray(gains, jnp.float32))
        assert not np.allclose(np.asarray(plain(jnp.asarray(x_kept, jnp.float32))), out, atol=1e-3)


def test_keeping_every_channel_keeps_the_dense_weights():
    rng = np.random.default_rng(1)
    cfg = types.SimpleNamespace(group_size=H // G, head_dim=DH, norm="rms")
    norm = Norm(DH, kind="rms", eps=1e-6, dtype=jnp.float32)
    norm.weight.set_value(jnp.asarray(rng.normal(size=DH) + 1.0, jnp.float32))
    attn = types.SimpleNamespace(q_norm=norm, k_norm=norm)
    every = np.tile(np.arange(DH), (G, 1))
    w_q, w_k = corrected_qk_norms(attn, cfg, every, rng.uniform(1, 5, (H, DH)), rng.uniform(1, 5, (G, DH)))
    np.testing.assert_allclose(w_q, np.broadcast_to(np.asarray(norm.weight[...]), (H, DH)), rtol=1e-6)
    np.testing.assert_allclose(w_k, np.broadcast_to(np.asarray(norm.weight[...]), (G, DH)), rtol=1e-6)
