"""The panel Cholesky factorisation (modegpt_jax.cholesky) against NumPy, and what one of its steps may hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modegpt_jax import cholesky
from modegpt_jax.decompose import compute_context


def _columns(A, s, e):
    return A[s:, s:e]


def _spd(rng, n):
    X = rng.standard_normal((2 * n, n))
    return X.T @ X + 0.1 * np.eye(n)


def _dense(f: cholesky.Panels) -> np.ndarray:
    L = np.zeros((f.n, f.n))
    for (s, e), top, rest in zip(f.bounds, f.tops, f.rests):
        L[s:e, s:e] = np.asarray(top)
        L[e:, s:e] = np.asarray(rest)
    return L


@pytest.mark.parametrize("n, min_panel, panels", [(41, 5, 8), (64, 16, 4), (30, 64, 8)])
def test_panels_match_numpy(monkeypatch, n, min_panel, panels):
    monkeypatch.setattr(cholesky, "MIN_PANEL", min_panel)
    monkeypatch.setattr(cholesky, "INVERSE_COLUMNS", 3)  # several chunks of columns per panel, the last partial
    monkeypatch.setattr(cholesky, "PANELS", panels)
    rng = np.random.default_rng(n)
    A = _spd(rng, n)
    rhs = rng.standard_normal((n, 3))
    with compute_context(True):
        f = cholesky.factor(_columns, jnp.asarray(A), n)
        assert len(f.bounds) == len(cholesky.panel_bounds(n)) == -(-n // max(min_panel, -(-n // panels)))
        np.testing.assert_allclose(_dense(f), np.linalg.cholesky(A), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(cholesky.inverse_diagonal(f)), np.diag(np.linalg.inv(A)),
                                   rtol=1e-10)
        np.testing.assert_allclose(np.asarray(cholesky.solve(f, jnp.asarray(rhs))), np.linalg.solve(A, rhs),
                                   rtol=1e-9, atol=1e-12)


def test_not_positive_definite_gives_nan(monkeypatch):
    monkeypatch.setattr(cholesky, "MIN_PANEL", 4)
    A = np.eye(12)
    A[9, 9] = -1.0  # fails in the third panel
    with compute_context(True):
        f = cholesky.factor(_columns, jnp.asarray(A), 12)
        assert np.isnan(np.asarray(cholesky.inverse_diagonal(f))).any()


def test_no_step_holds_a_square_buffer(monkeypatch):
    """The point of the panels: every jitted step's buffers (temporaries and outputs) stay well below one
    ``n x n`` float64 matrix, where ``jnp.linalg.cholesky`` alone holds two."""
    n = 2048
    monkeypatch.setattr(cholesky, "MIN_PANEL", 256)
    monkeypatch.setattr(cholesky, "PANELS", 8)
    monkeypatch.setattr(cholesky, "INVERSE_COLUMNS", 64)
    square = n * n * 8
    with compute_context(True):
        A = jax.ShapeDtypeStruct((n, n), jnp.float64)
        dense = jax.jit(jnp.linalg.cholesky).lower(A).compile().memory_analysis()
        assert dense.temp_size_in_bytes + dense.output_size_in_bytes >= 1.9 * square  # what the panels avoid

        bounds = cholesky.panel_bounds(n)
        tops = [jax.ShapeDtypeStruct((e - s, e - s), jnp.float64) for s, e in bounds]
        rests = [jax.ShapeDtypeStruct((n - e, e - s), jnp.float64) for s, e in bounds]
        for j, (s, e) in enumerate(bounds):
            step = cholesky._factor_step.lower(_columns, A, rests[:j], s=s, e=e, rest_bounds=tuple(bounds[:j]))
            m = step.compile().memory_analysis()
            assert m.temp_size_in_bytes + m.output_size_in_bytes < 0.4 * square, (j, m)
            norms = cholesky._inverse_norms.lower(tops, rests, j=j, bounds=tuple(bounds))
            assert norms.compile().memory_analysis().temp_size_in_bytes < 0.4 * square, j
