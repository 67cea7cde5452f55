"""Global sparsity allocation across decoder blocks, and per-module kept widths.

Pure functions on small host arrays (NumPy float64): one number per layer, nothing worth a device.

* Block importance ``BI_l = 1 - mean_tokens cos(h_l, h_(l+1))`` (residual stream into and out of block ``l``):
  a block that barely turns the residual stream matters little.
* Per-layer sparsity ``phi = L * phi_avg * softmax(-BI / eps)``: important blocks lose less. Clipped to
  ``[0, max_sparsity]`` with the excess redistributed so that ``mean(phi) == phi_avg``.
* All three modules of layer ``l`` lose the same fraction ``phi_l``; each module's parameter count is linear in
  its hidden dimension, so block ``l`` shrinks by ``phi_l`` (up to rounding, which only ever keeps more).
"""

from __future__ import annotations

import math

import numpy as np

from modegpt_jax.errors import UserError

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MAX_SPARSITY",
    "allocate_sparsity",
    "block_importance",
    "layer_widths",
    "uniform_sparsity",
]

#: Softmax temperature of the allocation. Not published; BI values of LLM blocks typically spread over a few
#: hundredths to a few tenths, and 0.1 turns that spread into a clear but not all-or-nothing preference. Tune on
#: calibration data, never on held-out data.
DEFAULT_EPS = 0.1
#: Largest sparsity any one block may get (not published; a starting point).
DEFAULT_MAX_SPARSITY = 0.8

# Relative slack when rounding widths up: (1 - 0.7) * 100 is 30.000000000000004 in floating point and must
# round to 30, not 31. Far below one channel for any real width.
_ROUND_SLACK = 1e-9


def block_importance(cos_sum, count) -> np.ndarray:
    """``BI_l = 1 - cos_sum_l / count_l``: one minus the mean token cosine between a block's input and output.

    Args:
        cos_sum: ``[L]`` per-layer sums of token cosines (see :func:`modegpt_jax.stats.cosine_sum`).
        count: scalar or ``[L]`` token counts, ``> 0``.

    Returns:
        ``[L]`` float64 block importances (0: the block does nothing to the direction of the stream).
    """
    cos_sum = np.asarray(cos_sum, dtype=np.float64)
    count = np.broadcast_to(np.asarray(count, dtype=np.float64), cos_sum.shape)
    if np.any(count <= 0):
        raise ValueError("token counts must be > 0")
    return 1.0 - cos_sum / count


def _check_target(target: float, max_sparsity: float) -> float:
    target = float(target)
    if not 0.0 < target < 1.0:
        raise UserError(f"target sparsity must be in (0, 1), got {target}; e.g. 0.3 removes 30% of block parameters")
    if not 0.0 < max_sparsity < 1.0:
        raise UserError(f"max sparsity must be in (0, 1), got {max_sparsity}")
    if target > max_sparsity:
        raise UserError(f"target sparsity {target} exceeds the per-layer maximum {max_sparsity}: "
                        "no allocation can reach it; raise the maximum or lower the target")
    return target


def uniform_sparsity(n_layers: int, target: float) -> np.ndarray:
    """The same sparsity ``target`` for each of ``n_layers`` blocks (float64 ``[n_layers]``)."""
    target = float(target)
    if not 0.0 < target < 1.0:
        raise UserError(f"target sparsity must be in (0, 1), got {target}; e.g. 0.3 removes 30% of block parameters")
    if int(n_layers) < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return np.full(int(n_layers), target, dtype=np.float64)


def allocate_sparsity(bi, target: float, *, eps: float = DEFAULT_EPS,
                      max_sparsity: float = DEFAULT_MAX_SPARSITY) -> np.ndarray:
    """Per-layer sparsity from block importances: ``phi = L * target * softmax(-bi / eps)``, clipped.

    Layers above ``max_sparsity`` are set to it, and the excess is given to the unclipped layers in proportion
    to their softmax weights (the same as re-running the softmax allocation over the unclipped layers with the
    remaining budget); this repeats until no layer exceeds the cap. The order of the layers by sparsity is the
    reverse of their order by importance, and ``mean(phi) == target`` up to float rounding.

    Args:
        bi: ``[L]`` block importances (higher = more important = lower sparsity).
        target: average sparsity in ``(0, 1)``, at most ``max_sparsity``.
        eps: softmax temperature, ``> 0``; small values concentrate the sparsity on the least important blocks.
        max_sparsity: per-layer cap in ``(0, 1)``.

    Returns:
        ``[L]`` float64 sparsities in ``[0, max_sparsity]``.

    Raises:
        UserError: target outside ``(0, 1)`` or above ``max_sparsity``, or ``max_sparsity`` outside ``(0, 1)``.
    """
    target = _check_target(target, max_sparsity)
    bi = np.asarray(bi, dtype=np.float64)
    if bi.ndim != 1 or bi.size == 0 or not np.all(np.isfinite(bi)):
        raise ValueError(f"bi must be a non-empty 1-D array of finite values, got {bi!r}")
    if not eps > 0:
        raise UserError(f"allocation temperature eps must be > 0, got {eps}")
    n = bi.size
    logits = -bi / eps
    w = np.exp(logits - logits.max())  # stable softmax; the normalisation happens below
    budget = n * target  # sum of phi to reach
    phi = np.zeros(n)
    free = np.ones(n, dtype=bool)
    # Each pass caps at least one more layer or ends, so at most n passes.
    for _ in range(n + 1):
        if not free.any():  # only reachable when target == max_sparsity, up to rounding
            phi = np.full(n, max_sparsity)
            break
        remaining = budget - max_sparsity * np.count_nonzero(~free)
        wf = np.where(free, w, 0.0)
        if wf.sum() > 0:
            phi = np.where(free, remaining * wf / wf.sum(), max_sparsity)
        else:
            # Every free layer's weight underflowed (extreme BI / tiny eps): share the rest equally.
            phi = np.where(free, remaining / np.count_nonzero(free), max_sparsity)
        over = free & (phi > max_sparsity)
        if not over.any():
            break
        free &= ~over
    # target <= max_sparsity guarantees feasibility; clip only rounding noise.
    return np.clip(phi, 0.0, max_sparsity)


def _ceil_kept(frac_kept: float, full: int, multiple: int, minimum: int) -> int:
    x = frac_kept * full
    k = max(math.ceil(x - _ROUND_SLACK * max(1.0, x)), minimum)
    k = -(-k // multiple) * multiple  # round up to the multiple
    return min(k, full)


def layer_widths(phi_l: float, d_int: int, head_dim: int, *, rope: bool = True,
                 multiple: int = 1) -> tuple[int, int, int]:
    """Kept hidden dims of the three modules of a block with sparsity ``phi_l``.

    Every kept width is ``ceil((1 - phi_l) * full)`` (so the kept fraction is never below ``1 - phi_l``), at
    least 1, then rounded *up* to ``multiple`` and capped at the full width:

    * MLP channels: ``(1 - phi_l) d_int``.
    * Q/K dim: with RoPE whole pairs, ``2 * ceil((1 - phi_l) dh / 2)`` (at least 2; the multiple is taken of the
      dim, and made even); without RoPE ``(1 - phi_l) dh``.
    * V/O rank: ``(1 - phi_l) dh``.

    Args:
        phi_l: sparsity of the block, in ``[0, 1]``.
        d_int: full MLP width. head_dim: full head dim (even with RoPE).
        rope: whether Q/K select RoPE pairs.
        multiple: round each width up to a multiple of this (e.g. 8, 64, 128 for hardware efficiency).

    Returns:
        ``(mlp_width, qk_dim, vo_rank)``.
    """
    phi_l = float(phi_l)
    if not 0.0 <= phi_l <= 1.0:
        raise ValueError(f"phi_l must be in [0, 1], got {phi_l}")
    multiple = int(multiple)
    if multiple < 1:
        raise UserError(f"width multiple must be >= 1, got {multiple}")
    d_int, head_dim = int(d_int), int(head_dim)
    if d_int < 1 or head_dim < 1:
        raise ValueError(f"d_int and head_dim must be >= 1, got {d_int}, {head_dim}")
    keep = 1.0 - phi_l
    mlp = _ceil_kept(keep, d_int, multiple, 1)
    vo = _ceil_kept(keep, head_dim, multiple, 1)
    if rope:
        if head_dim % 2:
            raise ValueError(f"RoPE head dim must be even, got {head_dim}")
        # Round the pair count up, then the dim up to an even multiple; head_dim is even, so the cap stays even.
        pairs = _ceil_kept(keep, head_dim // 2, 1, 1)
        step = multiple * 2 // math.gcd(multiple, 2)
        qk = min(-(-2 * pairs // step) * step, head_dim)
    else:
        qk = _ceil_kept(keep, head_dim, multiple, 1)
    return mlp, qk, vo


def split_block_sparsity(phi_l: float, attention_scale: float, attn_params: int, mlp_params: int,
                         max_mlp_sparsity: float = 0.95) -> tuple[float, float]:
    """Sparsities ``(phi_attention, phi_mlp)`` of one block that together remove the fraction ``phi_l`` of it.

    ``attention_scale = 1`` is the paper's rule: every module loses ``phi_l``. A smaller scale gives the
    key-query and value-output modules ``attention_scale * phi_l`` and lets the MLP make up the difference,
    ``phi_mlp = phi_l + (phi_l - phi_attention) * attn_params / mlp_params`` (capped at ``max_mlp_sparsity``).
    Why: per parameter removed, the attention modules cost several times more perplexity than the MLP (measured
    on the validation split, see the README), so moving the budget towards the MLP helps at the same ratio.
    """
    if attention_scale < 0 or attention_scale * phi_l > 1:
        raise UserError(
            f"--attention-scale must be >= 0 and keep the attention sparsity <= 1, got {attention_scale}"
        )
    phi_attn = attention_scale * phi_l
    phi_mlp = phi_l + (phi_l - phi_attn) * attn_params / mlp_params
    return phi_attn, min(max(phi_mlp, 0.0), max_mlp_sparsity)
