"""Width buckets: the calibration passes run the compressed modules zero-padded to a few bucket widths (so layers
share compilations); the padded modules must compute exactly what the compressed ones do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.decompose import width_bucket
from modegpt_jax.model import MLP, Attention
from modegpt_jax.block_compression import bucketed_attention, bucketed_mlp
from modegpt_jax.rope import kept_pair_frequencies


def config(rope=True, bias=False, gated=True, qk_norm=None):
    """``qk_norm``: None, or the norm kind of a model with per-head q/k norms ("rms", "rms_offset")."""
    return ModelConfig(model_type="llama" if rope else "opt", vocab_size=64, hidden_size=48, num_heads=6,
                       num_kv_heads=2, head_dim=32, intermediate_size=160, layers=(LayerSpec(160, 32, 32),),
                       use_rope=rope, qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated_mlp=gated,
                       activation="silu" if gated else "relu",
                       norm=qk_norm or ("rms" if rope else "layer"), qk_norm=qk_norm is not None)


def randomise(module, seed):
    state = nnx.state(module, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.3, state)
    nnx.update(module, state)


@pytest.mark.parametrize("rope,bias,qk_norm,qk", [(True, False, None, 22), (True, True, None, 22),
                                                 (False, True, None, 22), (True, True, "rms", 22),
                                                 (True, False, "rms_offset", 22), (True, False, "rms", 30)])
def test_bucketed_attention_is_exact(rope, bias, qk_norm, qk):
    cfg = config(rope, bias, qk_norm=qk_norm)
    # 11 (or 15) pairs per group
    pairs = tuple(tuple(p) for p in np.sort(np.random.default_rng(0).permuted(np.tile(np.arange(16), (2, 1)),
                                                                             axis=1)[:, : qk // 2], axis=1))
    spec = LayerSpec(160, qk, 19, pairs if rope else None)
    attn = Attention(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomise(attn, 1)
    if rope:
        attn.rope_freqs.set_value(jnp.asarray(kept_pair_frequencies(cfg, spec)))
    if qk_norm:
        assert attn.q_norm.weight.shape == (6, qk) and attn.k_norm.weight.shape == (2, qk)
    padded = bucketed_attention(attn, cfg, spec)
    assert padded.qk_dim == width_bucket(qk, 32, parts=8, multiple=2 if rope else 1) > qk
    assert padded.vo_dim == width_bucket(19, 32, parts=8) > 19
    x = jax.random.normal(jax.random.key(2), (2, 13, 48))
    pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
    np.testing.assert_allclose(np.asarray(padded(x, pos, None)), np.asarray(attn(x, pos, None)), atol=2e-5, rtol=0)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_bucketed_mlp_is_exact(gated, bias):
    cfg = config(gated=gated, bias=bias)
    spec = LayerSpec(101, 32, 32)
    mlp = MLP(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomise(mlp, 3)
    x = jax.random.normal(jax.random.key(4), (2, 7, 48))
    for parts, width in ((16, width_bucket(101, 160)), (4, 120), (1, 160)):
        padded = bucketed_mlp(mlp, cfg, spec, parts)
        assert padded.down_proj.kernel.shape[0] == width > 101
        np.testing.assert_allclose(np.asarray(padded(x)), np.asarray(mlp(x)), atol=2e-5, rtol=0)


def test_width_bucket():
    assert width_bucket(160, 160) == 160
    assert width_bucket(1, 1536) == 96 and width_bucket(97, 1536) == 192 and width_bucket(1500, 1536) == 1536
    assert all(w <= width_bucket(w, 64, parts=8, multiple=2) <= 64 for w in range(2, 65, 2))
    assert width_bucket(30, 64, parts=8, multiple=2) % 2 == 0
