"""Cholesky factorisation in column panels, for the wide Gram matrices of the MLP decomposition.

``jnp.linalg.cholesky`` of an ``n x n`` matrix holds two ``n x n`` buffers at once (the operand and the factor:
the LAPACK result is copied out to zero its upper triangle and mark failures), and the operand is itself made
from the statistic it comes from (cast to float64, symmetrised, ridge added). At Llama-2-7B's MLP width in float64
that is 2 x 0.9 GB on top of the float32 statistic. Here the lower factor ``L`` is built panel by panel
(left-looking): panel ``j`` holds the columns ``s_j:e_j`` from row ``s_j`` down, made from the operand's own
columns (asked of a ``columns`` function, so the operand never exists whole) minus the earlier panels'
contribution. The panels together hold ``n^2 / 2`` numbers plus a band, never the full square; besides them only
one panel's work exists at a time.

Every panel step is its own jitted call. Within one ``jit`` XLA is free to start on several panels at once and
hold all their intermediates (measured: ``1.6 n^2`` float64 temporaries for an 8-panel factorisation and inverse
diagonal, barely less than the dense ``2 n^2``); separate calls bound what exists to one step's work. The steps
depend only on shapes and the panel bounds, so each compiles once per matrix size and serves every layer.
``columns`` must be a module-level function (it is a static argument: a new closure per call would compile
again).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["MIN_PANEL", "PANELS", "Panels", "factor", "inverse_diagonal", "panel_bounds", "solve"]

#: A factorisation is cut into at most this many column panels ...
PANELS = 8
#: ... each at least this wide: matrices up to this size are one panel, a plain Cholesky factorisation.
MIN_PANEL = 2048

_HIGHEST = lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


class Panels:
    """The lower Cholesky factor ``L`` of an ``n x n`` matrix in column panels ``j`` with columns ``s_j:e_j``
    (``bounds[j]``): ``tops[j] = L[s_j:e_j, s_j:e_j]`` (lower triangular) and ``rests[j] = L[e_j:, s_j:e_j]`` (the
    rows below; ``[0, e_j - s_j]`` for the last panel)."""

    def __init__(self, tops: list[jax.Array], rests: list[jax.Array], bounds: list[tuple[int, int]]):
        self.tops, self.rests, self.bounds = tops, rests, bounds

    @property
    def n(self) -> int:
        return self.bounds[-1][1]


def panel_bounds(n: int) -> list[tuple[int, int]]:
    """Column ranges of the panels of an ``n``-wide factorisation."""
    width = max(MIN_PANEL, -(-n // PANELS))
    return [(s, min(s + width, n)) for s in range(0, n, width)]


@partial(jax.jit, static_argnames=("columns", "s", "e", "rest_bounds"))
def _factor_step(columns, operands, rests, s: int, e: int, rest_bounds):
    p = columns(operands, s, e)
    for (_, e_l), rest in zip(rest_bounds, rests):  # left-looking: minus L[s:, l] L[s:e, l]^T of each earlier panel
        below = rest[s - e_l:]
        p = p - _mm(below, below[: e - s].T)
    top = jnp.linalg.cholesky(p[: e - s])
    # L[e:, s:e] = A'[e:, s:e] L_top^-T
    return top, lax.linalg.triangular_solve(top, p[e - s:], left_side=False, lower=True, transpose_a=True)


def factor(columns: Callable[[Any, int, int], jax.Array], operands: Any, n: int) -> Panels:
    """Lower Cholesky factor of a symmetric positive definite ``A`` given by ``columns(operands, s, e) =
    A[s:, s:e]`` (the lower part of the columns ``s:e``, ``[n - s, e - s]``, in the compute dtype, diagonal ridge
    included; ``operands`` is a pytree of the arrays it is made from).

    A failed factorisation (not positive definite) gives NaNs, as ``jnp.linalg.cholesky`` does."""
    bounds = panel_bounds(n)
    tops, rests = [], []
    for (s, e) in bounds:
        top, rest = _factor_step(columns, operands, rests, s, e, tuple(bounds[: len(rests)]))
        tops.append(top)
        rests.append(rest)
    return Panels(tops, rests, bounds)


@partial(jax.jit, static_argnames=("s", "e"))
def _forward_step(top, rest, rhs, s: int, e: int):
    """Rows ``s:e`` of ``L y = r`` (``rhs`` from row ``s`` down, the earlier row blocks already subtracted):
    returns them and the rows below with this block's contribution subtracted."""
    y = lax.linalg.triangular_solve(top, rhs[: e - s], left_side=True, lower=True)
    return y, rhs[e - s:] - _mm(rest, y)


@partial(jax.jit, static_argnames=("s", "e", "lower_bounds"))
def _backward_step(top, rest, y, xs, s: int, e: int, lower_bounds):
    for (s_l, e_l), x in zip(lower_bounds, xs):  # L^T couples row block j to the row blocks below it
        y = y - _mm(rest[s_l - e: e_l - e].T, x)
    return lax.linalg.triangular_solve(top, y, left_side=True, lower=True, transpose_a=True)


def solve(f: Panels, rhs: jax.Array) -> jax.Array:
    """``A x = rhs`` with ``A = L L^T`` (``rhs`` ``[n, m]``)."""
    ys = []
    for j, (s, e) in enumerate(f.bounds):
        y, rhs = _forward_step(f.tops[j], f.rests[j], rhs, s, e)
        ys.append(y)
    xs: list[jax.Array] = []
    for j in reversed(range(len(f.bounds))):
        s, e = f.bounds[j]
        xs.insert(0, _backward_step(f.tops[j], f.rests[j], ys[j], xs, s, e, tuple(f.bounds[j + 1:])))
    return jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]


#: Columns of ``L^-1`` solved at a time within a panel by :func:`inverse_diagonal`.
INVERSE_COLUMNS = 512


@partial(jax.jit, static_argnames=("j", "bounds"))
def _inverse_norms(tops, rests, j: int, bounds):
    """Squared norms of the columns ``s_j:e_j`` of ``L^-1``: zero above row ``s_j``, ``L_jj^-1`` in the panel's
    own rows, and below it the forward solve of ``-L[e_j:, s_j:e_j] L_jj^-1``; ``INVERSE_COLUMNS`` at a time."""
    s, e = bounds[j]
    w = e - s
    per = min(INVERSE_COLUMNS, w)
    count = -(-w // per)

    def chunk(c):  # columns c*per ... of the panel (past w: zero columns, zero norms)
        unit = (jnp.arange(w)[:, None] == c * per + jnp.arange(per)[None, :]).astype(tops[j].dtype)
        y = lax.linalg.triangular_solve(tops[j], unit, left_side=True, lower=True)
        norms = jnp.sum(y * y, axis=0)
        rhs = -_mm(rests[j], y)
        for l in range(j + 1, len(bounds)):
            s_l, e_l = bounds[l]
            y = lax.linalg.triangular_solve(tops[l], rhs[: e_l - s_l], left_side=True, lower=True)
            norms = norms + jnp.sum(y * y, axis=0)
            rhs = rhs[e_l - s_l:] - _mm(rests[l], y)
        return norms

    return lax.map(chunk, jnp.arange(count)).reshape(-1)[:w]


def inverse_diagonal(f: Panels) -> jax.Array:
    """``diag(A^-1)`` with ``A = L L^T``: the squared norms of the columns of ``L^-1``, a panel of columns per
    call."""
    bounds = tuple(f.bounds)
    parts = [_inverse_norms(f.tops, f.rests, j, bounds) for j in range(len(bounds))]
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
