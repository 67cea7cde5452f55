"""Tests of the global sparsity allocation and the per-module widths (modegpt_jax.allocation)."""

import math

import numpy as np
import pytest

from modegpt_jax.allocation import (
    allocate_sparsity,
    block_importance,
    layer_widths,
    split_block_sparsity,
    uniform_sparsity,
)
from modegpt_jax.errors import UserError


def softmax_alloc(bi, target, eps):
    """The unclipped formula, written independently: L * target * softmax(-bi / eps)."""
    e = np.exp(-(np.asarray(bi) - np.min(bi)) / eps)
    return len(bi) * target * e / e.sum()


# --------------------------------------------------------------------------------------------------------------
# Block importance
# --------------------------------------------------------------------------------------------------------------


def test_block_importance_is_one_minus_mean_cosine():
    bi = block_importance([90.0, 45.0, -10.0], [100, 50, 10])
    np.testing.assert_allclose(bi, [0.1, 0.1, 2.0])
    with pytest.raises(ValueError):
        block_importance([1.0], [0])


# --------------------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------------------


def test_unclipped_equals_softmax_formula():
    rng = np.random.default_rng(2)
    bi = rng.uniform(0.05, 0.15, size=12)  # narrow spread: nothing reaches the cap
    phi = allocate_sparsity(bi, 0.3, eps=0.1, max_sparsity=0.8)
    ref = softmax_alloc(bi, 0.3, 0.1)
    assert ref.max() < 0.8
    np.testing.assert_allclose(phi, ref, rtol=1e-12)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("eps", [0.02, 0.1, 1.0])
def test_mean_equals_target_and_cap_respected(target, eps):
    rng = np.random.default_rng(3)
    bi = np.abs(rng.standard_normal(24)) * 0.2
    bi[0] = 0.9  # first layer: very important (as is usual)
    phi = allocate_sparsity(bi, target, eps=eps, max_sparsity=0.8)
    assert phi.shape == (24,)
    assert phi.mean() == pytest.approx(target, abs=1e-12)
    assert phi.min() >= 0.0 and phi.max() <= 0.8 + 1e-15
    # More important (higher BI) never gets more sparsity.
    order = np.argsort(bi)
    assert np.all(np.diff(phi[order]) <= 1e-12)
    assert phi[0] == phi.min()


def test_clipping_redistributes_in_softmax_proportion():
    bi = np.array([0.0, 0.01, 0.02, 0.3, 0.4, 0.5])
    target, eps, cap = 0.5, 0.05, 0.8
    assert softmax_alloc(bi, target, eps).max() > cap  # the cap binds
    phi = allocate_sparsity(bi, target, eps=eps, max_sparsity=cap)
    clipped = np.isclose(phi, cap)
    assert clipped.any() and not clipped.all()
    assert phi.mean() == pytest.approx(target, abs=1e-12)
    free = np.flatnonzero(~clipped)
    # Among the unclipped layers the softmax ratios are kept: phi_i / phi_j = exp(-(bi_i - bi_j) / eps).
    for i in free:
        for j in free:
            assert phi[i] / phi[j] == pytest.approx(math.exp(-(bi[i] - bi[j]) / eps), rel=1e-10)
    # And every unclipped layer would exceed the cap no sooner than the clipped ones: clipped = least important.
    assert np.all(bi[clipped] <= bi[~clipped].min())


def test_extreme_spread_with_underflow():
    phi = allocate_sparsity([0.0, 100.0], 0.5, eps=0.1, max_sparsity=0.8)
    np.testing.assert_allclose(phi, [0.8, 0.2], atol=1e-12)
    phi = allocate_sparsity([0.0, 100.0, 100.0], 0.8, eps=0.1, max_sparsity=0.8)
    np.testing.assert_allclose(phi, [0.8, 0.8, 0.8], atol=1e-12)


def test_equal_importance_is_uniform():
    phi = allocate_sparsity(np.full(10, 0.2), 0.35)
    np.testing.assert_allclose(phi, 0.35, atol=1e-12)
    np.testing.assert_array_equal(uniform_sparsity(10, 0.35), np.full(10, 0.35))


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_target_is_user_error(target):
    with pytest.raises(UserError):
        allocate_sparsity([0.1, 0.2], target)
    with pytest.raises(UserError):
        uniform_sparsity(4, target)


def test_target_above_cap_is_user_error():
    with pytest.raises(UserError):
        allocate_sparsity([0.1, 0.2], 0.85, max_sparsity=0.8)
    with pytest.raises(UserError):
        allocate_sparsity([0.1, 0.2], 0.3, eps=0.0)


# --------------------------------------------------------------------------------------------------------------
# Widths
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [True, False])
def test_widths_never_keep_less_than_asked_and_round_up_minimally(rope):
    d_int, dh = 1376, 64
    for phi in np.linspace(0.0, 0.95, 96):
        mlp, qk, vo = layer_widths(phi, d_int, dh, rope=rope)
        keep = 1.0 - phi
        assert mlp / d_int >= keep - 1e-9 and (mlp - 1) / d_int < keep
        assert vo / dh >= keep - 1e-9 and (vo - 1) / dh < keep
        assert qk / dh >= keep - 1e-9
        if rope:
            assert qk % 2 == 0 and (qk - 2) / dh < keep  # whole pairs, one pair at most beyond
        else:
            assert (qk - 1) / dh < keep


def test_widths_float_noise_and_extremes():
    # (1 - 0.7) * 100 is 30.000000000000004 in floating point: must keep 30, not 31.
    assert layer_widths(0.7, 100, 100, rope=False) == (30, 30, 30)
    assert layer_widths(0.0, 256, 64) == (256, 64, 64)
    assert layer_widths(1.0, 256, 64) == (1, 2, 1)
    assert layer_widths(0.25, 11008, 128) == (8256, 96, 96)


@pytest.mark.parametrize("multiple", [8, 64, 3])
def test_widths_multiple_round_up_and_cap(multiple):
    d_int, dh = 1000, 64
    for phi in np.linspace(0.0, 0.9, 46):
        mlp, qk, vo = layer_widths(phi, d_int, dh, multiple=multiple)
        base = layer_widths(phi, d_int, dh)
        for got, b, full in zip((mlp, qk, vo), base, (d_int, dh, dh)):
            assert b <= got <= full
            assert got == full or got % multiple == 0
            assert got - b < max(multiple, 2) * (2 if multiple % 2 else 1)  # no more than one step up
        assert qk % 2 == 0
    assert layer_widths(0.01, 1000, 64, multiple=64)[0] == 1000  # 1024 would exceed the full width


def test_block_keeps_at_least_its_share():
    """A block's parameters are linear in each module's hidden dim, so the block keeps >= (1 - phi)."""
    d, d_int, H, G, dh = 256, 688, 8, 2, 32
    for phi in (0.1, 0.33, 0.5, 0.77):
        mlp, qk, vo = layer_widths(phi, d_int, dh, multiple=8)
        full = 3 * d * d_int + (H + G) * dh * d + (G + H) * dh * d
        kept = 3 * d * mlp + (H + G) * qk * d + (G + H) * vo * d
        assert kept / full >= 1 - phi


def test_bad_multiple_is_user_error():
    with pytest.raises(UserError):
        layer_widths(0.3, 100, 64, multiple=0)


class TestSplitBlockSparsity:
    def test_equal_split_is_the_papers_rule(self):
        assert split_block_sparsity(0.3, 1.0, 100, 300) == pytest.approx((0.3, 0.3))

    @pytest.mark.parametrize("scale", [0.0, 0.25, 0.5])
    def test_block_still_loses_its_fraction(self, scale):
        attn, mlp = 884_736, 2_654_208
        phi_a, phi_m = split_block_sparsity(0.36, scale, attn, mlp)
        assert phi_a == pytest.approx(scale * 0.36)
        assert phi_a * attn + phi_m * mlp == pytest.approx(0.36 * (attn + mlp))
        assert phi_m >= 0.36

    def test_mlp_sparsity_is_capped(self):
        _, phi_m = split_block_sparsity(0.9, 0.0, 500, 100, max_mlp_sparsity=0.95)
        assert phi_m == 0.95
