"""Relative calibration reconstruction errors of the compressed MLP and value-output modules, in closed form.

Pure jitted functions of the calibration statistics and the (rank-sized) weight factors; they run on the device
with ``jax.numpy``, never form a per-head ``[d, d]`` product, and allocate nothing larger than one statistic.
Conventions as in :mod:`modegpt_jax.decompose` (weights ``[in, out]``, ``y = x @ W``; query head ``i`` belongs to
KV group ``i // g``; head ``i``'s rows of ``w_o`` are ``i*r:(i+1)*r``).

Precision
---------
Both functions compute in the promoted dtype of their inputs, at least float32: float64 inputs (under
``jax_enable_x64``) are computed in float64, float32/bfloat16 inputs in float32. Matmuls run at ``HIGHEST`` precision.
The numerator of a relative error is a quadratic form ``||x Delta||^2`` of a small residual, and the textbook
expansion ``ref - 2 cross + new`` subtracts totals of the size of ``ref``: in float32 that leaves an absolute
error of ``~eps * ref``-sized terms. Both functions instead build the residual *coefficients* first, so that the
terms that are added are of the size of the residual itself:

* MLP: ``A W_D - A[:, S] W_D' = A E`` with ``E = W_D - scatter_S(W_D')`` (rows ``S``: ``W_D[S] - W_D'``, dropped
  rows: ``W_D[D]``), and the error is ``<E, C_s E>`` -- one matmul, no gather of ``C_s``, exact for any ``S``.
* VO: per KV group, ``W_V W_O,i - V' O'_i = W_V D_i - V_perp O'_i`` with ``T = pinv(W_V) V'`` (Euclidean
  least-squares coefficients of ``V'`` on ``W_V``, ``[r, k]``), ``V_perp = V' - W_V T`` and ``D_i = W_O,i - T O'_i``.
  The identity holds for *any* ``T``, so rounding in ``T`` costs no exactness; the error is then
  ``sum_g <P_g, sum_i D_i D_i^T> - 2 <W_V^T C V_perp, sum_i D_i O'_i^T> + <V_perp^T C V_perp, sum_i O'_i O'_i^T>``
  with ``P_g = W_V,g^T C W_V,g``, all built from differences taken in the small ``r``/``k`` spaces. For the factors
  :func:`~modegpt_jax.decompose.vo_svd` returns, ``V'`` lies in ``span(W_V)``: ``V_perp ~ 0`` and
  ``D_i = R^-1 (I - U_k U_k^T) R W_O,i`` is exactly the truncated part. (The C-weighted least-squares ``T`` would
  make the two parts C-orthogonal, but ``W_V^T C W_V`` is far worse conditioned than ``W_V``, and in float32 its
  ``T`` spoils the split: measured deviations up to 3e-4.) Cost ``O(d^2 G (r + k) + H d (r + k)^2)``; the largest
  temporaries are ``D`` (the size of ``w_o``) and ``C W_V``: at Llama-2-7B attention size (``d = 4096, H = 32,
  G = 8, r = 128``) XLA's temporaries total 2x ``C``, against 2 GiB for the ``[H, d, d]`` products.

Measured float32 accuracy (absolute deviation of the relative error from a float64 reference on the explicit
activations, inputs rounded to float32; decaying activation spectra with and without a large mean; see
``tests/test_reconstruction.py``):

* MLP, ``d_int = 1536, d = 576, k = 1000``, Nystrom-refitted ``W_D'``: <= 1.2e-8 (textbook form: <= 1.1e-7).
* VO, ``d = 512 .. 1024, H = 4 .. 8, G = 1 .. 4``, whitened-SVD factors: <= 5e-8 (textbook: <= 8e-7); where the true
  error is ~0 (``k = r``), <= 1e-13 (textbook: 4e-7). Arbitrary factors (errors 0.06 .. 18): relative deviation
  <= 5e-7, like the textbook form.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["mlp_relative_error", "vo_relative_error"]

_HIGHEST = lax.Precision.HIGHEST


def _compute_dtype(*arrays) -> jnp.dtype:
    """The promoted floating dtype of ``arrays``, at least float32 (float64 only as the JAX mode allows)."""
    dt = jnp.result_type(*arrays)
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.float32
    return jnp.dtype(jnp.promote_types(dt, jnp.float32))


def _einsum(spec: str, *ops) -> jax.Array:
    return jnp.einsum(spec, *ops, precision=_HIGHEST)


def _total(x: jax.Array) -> jax.Array:
    """Sum of all elements as a two-level reduction (per row, then the rows), for a smaller rounding error."""
    return jnp.sum(jnp.sum(x.reshape(x.shape[0], -1), axis=1))


@jax.jit
def mlp_relative_error(C_s, w_down, kept, w_down_new) -> jax.Array:
    """``||A W_D - A[:, kept] W_D'||_F^2 / ||A W_D||_F^2`` over the calibration tokens, from ``C_s = A^T A``.

    Args:
        C_s: ``[d_int, d_int]`` Gram matrix of the down-projection input ``A``.
        w_down: ``[d_int, d]`` original down projection ``W_D``.
        kept: int ``[k]`` indices of the kept intermediate channels (a traced array is fine; repeated indices are
            counted as often as they occur, as ``A[:, kept]`` would).
        w_down_new: ``[k, d]`` refitted down projection ``W_D'``.

    Returns:
        A scalar of the compute dtype (see the module docstring), clipped at 0 below. ``O(d_int^2 d)`` work.
    """
    d_int, d = w_down.shape
    k = kept.shape[0]
    if C_s.shape != (d_int, d_int):
        raise ValueError(f"C_s must be [d_int, d_int] = {(d_int, d_int)}, got {C_s.shape}")
    if w_down_new.shape != (k, d):
        raise ValueError(f"w_down_new must be [k, d] = {(k, d)}, got {w_down_new.shape}")
    dt = _compute_dtype(C_s, w_down, w_down_new)
    C = jnp.asarray(C_s).astype(dt)
    W = jnp.asarray(w_down).astype(dt)
    Wn = jnp.asarray(w_down_new).astype(dt)
    # A W_D - A[:, S] W_D' = A E: rows S of E are W_D[S] - W_D', the dropped rows are W_D[D].
    E = W.at[jnp.asarray(kept)].add(-Wn)
    both = jnp.concatenate([W, E], axis=1)  # one [d_int, 2d] matmul for the reference and the residual
    C_both = jnp.matmul(C, both, precision=_HIGHEST)
    ref = _total(W * C_both[:, :d])
    num = _total(E * C_both[:, d:])
    return jnp.maximum(num, 0.0) / ref


@partial(jax.jit, static_argnames=("n_heads",))
def vo_relative_error(C, w_v, w_o, w_v_new, w_o_new, n_heads: int) -> jax.Array:
    """``sum_i ||x (W_V,g(i) W_O,i - V'_g(i) O'_i)||^2 / sum_i ||x W_V,g(i) W_O,i||^2`` from ``C = x^T x``.

    Args:
        C: ``[d, d]`` Gram matrix of the V projection's input.
        w_v: ``[d, G*r]``, w_o: ``[H*r, d]``: the original value and output projections.
        w_v_new: ``[d, G*k]``, w_o_new: ``[H*k, d]``: the compressed ones (any ``k``, also ``k > r``).
        n_heads: ``H`` (static); ``G`` and the group size ``g = H / G`` follow from the shapes.

    Returns:
        A scalar of the compute dtype, clipped at 0 below. ``O(d^2 G (r + k) + H d (r + k)^2)`` work; the largest
        array is ``C`` itself.
    """
    H = int(n_heads)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [d, d], got {C.shape}")
    d = C.shape[0]
    if w_o.ndim != 2 or w_o.shape[1] != d or w_o.shape[0] % H:
        raise ValueError(f"w_o must be [H*r, {d}] with H={H}, got {w_o.shape}")
    if w_o_new.ndim != 2 or w_o_new.shape[1] != d or w_o_new.shape[0] % H:
        raise ValueError(f"w_o_new must be [H*k, {d}] with H={H}, got {w_o_new.shape}")
    r, k = w_o.shape[0] // H, w_o_new.shape[0] // H
    if w_v.ndim != 2 or w_v.shape[0] != d or w_v.shape[1] % r:
        raise ValueError(f"w_v must be [{d}, G*{r}], got {w_v.shape}")
    G = w_v.shape[1] // r
    if G == 0 or H % G:
        raise ValueError(f"n_heads ({H}) must be a multiple of the KV heads ({G})")
    if w_v_new.shape != (d, G * k):
        raise ValueError(f"w_v_new must be [{d}, {G}*{k}], got {w_v_new.shape}")
    g = H // G
    dt = _compute_dtype(C, w_v, w_o, w_v_new, w_o_new)
    C = jnp.asarray(C).astype(dt)
    wv = jnp.asarray(w_v).astype(dt)
    vn = jnp.asarray(w_v_new).astype(dt).reshape(d, G, k)
    wo = jnp.asarray(w_o).astype(dt).reshape(H, r, d)  # per-head layouts: batched matmuls without transposes
    on = jnp.asarray(w_o_new).astype(dt).reshape(H, k, d)

    cw = jnp.matmul(C, wv, precision=_HIGHEST).reshape(d, G, r)  # C W_V,g
    wv = wv.reshape(d, G, r)
    P = _einsum("dgr,dgs->grs", wv, cw)  # W_V,g^T C W_V,g  [G, r, r]
    # T = Euclidean least-squares coefficients of V'_g on W_V,g (any T keeps the split exact; this one makes
    # V_perp ~ 0 whenever V' lies in span(W_V), and is as well conditioned as W_V itself, not as W_V^T C W_V).
    pinv = jnp.linalg.pinv(jnp.transpose(wv, (1, 0, 2)))  # [G, r, d]
    T = _einsum("grd,dgk->grk", pinv, vn)  # [G, r, k]
    T = jnp.where(jnp.all(jnp.isfinite(T), axis=(1, 2), keepdims=True), T, 0.0)
    v_perp = vn - _einsum("dgr,grk->dgk", wv, T)  # V' - W_V T  [d, G, k]
    c_perp = jnp.matmul(C, v_perp.reshape(d, G * k), precision=_HIGHEST).reshape(d, G, k)
    B = _einsum("dgr,dgk->grk", cw, v_perp)  # W_V^T C V_perp  [G, r, k]
    K = _einsum("dgk,dgl->gkl", v_perp, c_perp)  # V_perp^T C V_perp  [G, k, k]
    # Residual of head i: W_V,g W_O,i - V'_g O'_i = W_V D_i - V_perp O'_i with D_i = W_O,i - T O'_i.
    D = wo - _einsum("hrk,hkd->hrd", jnp.repeat(T, g, axis=0), on)  # [H, r, d]

    def group_sum(x):  # [H, a, b] per-head Grams -> [G, a, b] sums over each group's heads
        return jnp.sum(x.reshape(G, g, *x.shape[1:]), axis=1)

    num = (
        _total(P * group_sum(_einsum("hrd,hsd->hrs", D, D)))
        - 2.0 * _total(B * group_sum(_einsum("hrd,hkd->hrk", D, on)))
        + _total(K * group_sum(_einsum("hkd,hld->hkl", on, on)))
    )
    ref = _total(P * group_sum(_einsum("hrd,hsd->hrs", wo, wo)))
    return jnp.maximum(num, 0.0) / ref
