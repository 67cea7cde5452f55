"""The three MoDeGPT module decompositions, as pure functions of arrays.

Nothing here knows about models or files: every function takes weights and calibration statistics and returns
smaller weights. Conventions (see ``docs/method.md``):

* Weights are in ``[in, out]`` orientation (``y = x @ W``). A PyTorch ``Linear.weight`` is the transpose.
* ``d`` hidden size, ``d_int`` MLP width, ``H`` query heads, ``G`` key/value heads, ``g = H / G`` query heads per
  KV group (query head ``i`` belongs to group ``i // g``), ``dh`` head dim.
* Fused head layouts: ``w_q`` is ``[d, H*dh]`` with head ``i`` in columns ``i*dh:(i+1)*dh``; ``w_k``/``w_v`` are
  ``[d, G*dh]`` (group ``g`` in columns ``g*dh:(g+1)*dh``); ``w_o`` is ``[H*dh, d]`` (head ``i`` in rows
  ``i*dh:(i+1)*dh``).
* Per-head work is batched (reshapes + batched linalg), never a Python loop over heads.

Precision
---------
The method runs the decompositions in float64 where the backend has it. JAX keeps 64-bit types off unless
``jax_enable_x64`` is set; setting it globally would change the dtype of every Python scalar and ``arange`` in the
rest of the program. Instead, each public function here enters ``jax.enable_x64(True)`` -- in jax 0.10.2 a
*context manager* on the thread-local config state that is part of the jit cache key -- only around its own
computation, casts its inputs to float64 inside, and casts the results back to the input weight dtype before
returning. Outside the call nothing changes. ``precision64=None`` (the default) means "float64 unless the default
backend is a TPU" (TPUs have no native float64); ``precision64=False`` computes in float32. In both modes matmuls run
at ``"highest"`` precision (TF32 on GPU or bf16 passes on TPU would spoil the statistics), and every factorisation is
regularised by a ridge *relative to the scale of the matrix* (a fraction of the mean of its diagonal), larger in
float32 (``1e-4``) than in float64 (``1e-8``), so that Cholesky factorisations of rank-deficient Gram matrices
(dead ReLU channels, fewer tokens than channels) succeed.

Placement
---------
Every factorisation runs on one device, this process's first (:func:`modegpt_jax.mesh.compute_device`), whatever
the sharding of its inputs: a sharded or replicated input is copied there first (gathered from the other processes
when this process does not hold all of it). The factorisations are small next to the calibration passes, and
running them on a mesh can deadlock on CPU (see :func:`modegpt_jax.mesh.to_compute_device`). Results are host-side
NumPy copies turned back into arrays on the default device; in a multi-process run every process computes the same
result from the same inputs on the same kind of device (the pipeline checks this, layer by layer).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from modegpt_jax import cholesky
from modegpt_jax.mesh import to_compute_device as _placed, to_host

__all__ = [
    "DEFAULT_LEVERAGE_ALPHA",
    "RIDGE_FLOAT32",
    "RIDGE_FLOAT64",
    "apply_qk_selection",
    "compute_context",
    "cr_qk_select",
    "fold_value_bias",
    "nystrom_mlp",
    "resolve_precision64",
    "ridge_leverage_scores",
    "vo_svd",
]

#: Ridge of the leverage scores, ``lam = alpha * mean(diag(C_s))``. With ``alpha = 1`` ``lam`` is the mean eigenvalue
#: of ``C_s``: channels whose variance lies in directions above the average count fully, those in weaker
#: directions partially. The two limits are useless: ``alpha -> 0`` gives every channel of a full-rank ``C_s`` a
#: score of 1 (no ranking), ``alpha -> inf`` ranks by ``C_jj`` alone (plain activation energy, blind to
#: redundancy between channels).
DEFAULT_LEVERAGE_ALPHA = 1.0
#: Relative ridge (fraction of the mean diagonal) of the Cholesky factorisations, by compute precision. It only
#: has to make the factorisation succeed; it biases the result only in directions whose energy is below this
#: fraction of the average, which contribute nothing measurable to the reconstruction.
RIDGE_FLOAT64 = 1e-8
RIDGE_FLOAT32 = 1e-4

_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------------------
# Precision handling
# --------------------------------------------------------------------------------------------------------------


def resolve_precision64(precision64: bool | None) -> bool:
    """``precision64`` with ``None`` resolved: float64 unless the default backend is a TPU."""
    if precision64 is None:
        return jax.default_backend() != "tpu"
    return bool(precision64)


@contextlib.contextmanager
def compute_context(precision64: bool | None = None) -> Iterator[Any]:
    """Context in which the decompositions run; yields the compute dtype (``jnp.float64`` or ``jnp.float32``).

    Enables 64-bit types locally (``jax.enable_x64``) when float64 is asked for, and sets the default matmul
    precision to ``"highest"`` in either case. Both settings are restored on exit.
    """
    use64 = resolve_precision64(precision64)
    with contextlib.ExitStack() as stack:
        if use64:
            stack.enter_context(jax.enable_x64(True))
        stack.enter_context(jax.default_matmul_precision("highest"))
        yield jnp.float64 if use64 else jnp.float32


def _ridge(value: float | None, dtype: Any) -> float:
    if value is None:
        return RIDGE_FLOAT64 if dtype == jnp.float64 else RIDGE_FLOAT32
    if not (value >= 0.0):
        raise ValueError(f"ridge must be >= 0, got {value}")
    return float(value)


def _out_dtype(x: Any) -> Any:
    """Dtype a result is cast back to: ``x``'s if floating (float32 otherwise), as the current mode can hold it.

    Called inside :func:`compute_context`: a float64 input keeps float64 in float64 mode and becomes float32 in
    float32 mode (without JAX's truncation warning).
    """
    dt = getattr(x, "dtype", np.float32)
    if not jnp.issubdtype(dt, jnp.floating):
        dt = np.float32
    return jax.dtypes.canonicalize_dtype(dt)


#: How far the ridge of a factorisation may grow when it fails: statistics summed in float32 over fewer tokens than
#: channels are singular, and float32 rounding can leave them slightly indefinite, below the default ridge.
_RIDGE_GROWTH, _RIDGE_LIMIT = 100.0, 1e-2


def _with_growing_ridge(what: str, solve, ridge: float):
    """``solve(ridge)``, retried with a 100x larger relative ridge (up to 1e-2) while its result is not finite."""
    while True:
        out = solve(ridge)
        finite = all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out))
        if finite:
            return out
        if ridge >= _RIDGE_LIMIT:
            _check_finite(what, *jax.tree.leaves(out))  # raises: the result is not finite
        ridge = min(max(ridge, 1e-12) * _RIDGE_GROWTH, _RIDGE_LIMIT)


def _check_finite(what: str, *arrays: jax.Array) -> None:
    for a in arrays:
        if a is not None and not np.isfinite(np.asarray(a)).all():
            raise FloatingPointError(
                f"{what}: non-finite result (a Cholesky factorisation failed or the statistics contain inf/nan); "
                "check the calibration statistics, or use precision64=True or a larger ridge"
            )


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _scale(diag: jax.Array) -> jax.Array:
    """Mean of a (batch of) diagonal(s), with 1 substituted for an all-zero matrix so the ridge stays positive."""
    m = jnp.mean(diag, axis=-1)
    return jnp.where(m > 0, m, jnp.ones_like(m))


# --------------------------------------------------------------------------------------------------------------
# Type I: MLP, Nystrom approximation with ridge leverage scores
# --------------------------------------------------------------------------------------------------------------


def _leverage_columns(operands, s: int, e: int) -> jax.Array:
    """Columns ``s:e`` of ``C + lam I`` from row ``s`` down, symmetrised (accumulated statistics are symmetric only
    up to rounding), in ``lam``'s dtype (``C`` may be narrower)."""
    C, lam = operands
    n, dt = C.shape[0], lam.dtype
    part = 0.5 * (C[s:, s:e].astype(dt) + C[s:e, s:].T.astype(dt))
    return part + lam * jnp.eye(n - s, e - s, dtype=dt)


@jax.jit
def _leverage_ridge(C: jax.Array, alpha: jax.Array) -> jax.Array:
    return alpha * _scale(jnp.diagonal(C).astype(alpha.dtype))


@jax.jit
def _scores(lam: jax.Array, inverse_diagonal: jax.Array) -> jax.Array:
    # Exact scores lie in [0, 1); rounding can push them a hair outside.
    return jnp.clip(1.0 - lam * inverse_diagonal, 0.0, 1.0)


def _leverage(C: jax.Array, alpha: jax.Array) -> jax.Array:
    """``s_j = [C (C + lam I)^-1]_jj = 1 - lam [(C + lam I)^-1]_jj`` with one Cholesky factorisation.

    With ``C + lam I = L L^T``: ``(C + lam I)^-1 = L^-T L^-1``, whose diagonal is the column sums of squares of
    ``L^-1``. Computed in ``alpha``'s dtype; ``C`` may be narrower (see :func:`nystrom_mlp`). The factor is built in
    column panels from ``C``'s own columns (:mod:`modegpt_jax.cholesky`), so neither a wide copy of ``C`` nor a
    full square factor ever exists.
    """
    lam = _leverage_ridge(C, alpha)
    factor = cholesky.factor(_leverage_columns, (C, lam), C.shape[0])
    return _scores(lam, cholesky.inverse_diagonal(factor))


def ridge_leverage_scores(C: jax.Array, alpha: float = DEFAULT_LEVERAGE_ALPHA, *,
                          precision64: bool | None = None) -> jax.Array:
    """Ridge leverage scores of the channels of a Gram matrix.

    ``s_j = [C (C + lam I)^-1]_jj`` with ``lam = alpha * mean(diag(C))`` (the ridge is relative to the scale of
    ``C``, so scores do not depend on how many tokens were summed). ``sum_j s_j`` is the effective dimension
    ``sum_i mu_i / (mu_i + lam)`` over the eigenvalues ``mu_i`` of ``C``. A channel with ``C_jj = 0`` scores 0.

    Args:
        C: ``[n, n]`` symmetric positive semi-definite, e.g. ``sum A^T A``.
        alpha: relative ridge, ``> 0``.
        precision64: see the module docstring.

    Returns:
        ``[n]`` scores in ``[0, 1]``, in ``C``'s dtype (float32 for non-float input).
    """
    C = C if hasattr(C, "dtype") else np.asarray(C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [n, n], got shape {C.shape}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    with compute_context(precision64) as cdt:
        s = _leverage(_placed(C, cdt), _placed(alpha, cdt))
        _check_finite("ridge_leverage_scores", s)
        return s.astype(_out_dtype(C))


def width_bucket(width: int, full: int, parts: int = 16, multiple: int = 1) -> int:
    """The smallest of ``parts`` evenly spaced sizes up to ``full`` that holds ``width`` (a multiple of
    ``multiple``). Kernels compiled for a bucket serve every width in it: widths differ from layer to layer, and
    one compilation per bucket instead of per width is what keeps compile time from growing with depth."""
    step = -(-full // parts)
    step = -(-step // multiple) * multiple
    return min(-(-width // step) * step, full)


#: Rows of ``C[S] W`` made at a time by the Nystrom refit.
REFIT_ROWS = 1024


@jax.jit
def _descending(scores: jax.Array) -> jax.Array:
    return jnp.argsort(-scores, stable=True)  # ties keep the lower index


def _leverage_order(C: jax.Array, alpha: jax.Array) -> jax.Array:
    """Channels by ridge leverage score, best first."""
    return _descending(_leverage(C, alpha))


@partial(jax.jit, static_argnames=("slots",))
def _refit_slots(C: jax.Array, order: jax.Array, delta: jax.Array, width: jax.Array, slots: int):
    """The kept channels in ``slots >= width`` channel slots (ascending, then the inert slots past ``width``),
    which slots are valid, and what the refit adds on the diagonal: the ridge ``delta * mean(diag(C_SS))`` on
    valid slots, 1 on inert ones (identity rows)."""
    n = C.shape[0]
    valid = jnp.arange(slots) < width
    ranked = order[:slots]
    kept = jnp.sort(jnp.where(valid, ranked, ranked + n))
    kept = jnp.where(kept >= n, kept - n, kept)
    diag = jnp.where(valid, C[kept, kept].astype(delta.dtype), 0.0)
    mean = jnp.sum(diag) / width
    ridge = delta * jnp.where(mean > 0, mean, 1.0)
    return kept, valid, jnp.where(valid, ridge, 1.0).astype(delta.dtype)


def _refit_columns(operands, s: int, e: int) -> jax.Array:
    """Columns ``s:e`` of ``C_SS + ridge I`` from row ``s`` down: symmetrised, identity in the inert slots."""
    C, kept, valid, on_diagonal = operands
    dt, slots = on_diagonal.dtype, kept.shape[0]
    r, c = kept[s:], kept[s:e]
    part = 0.5 * (C[r[:, None], c[None, :]].astype(dt) + C[c[:, None], r[None, :]].T.astype(dt))
    part = jnp.where(valid[s:, None] & valid[None, s:e], part, 0.0)
    return part + jnp.eye(slots - s, e - s, dtype=dt) * on_diagonal[None, s:e]


@jax.jit
def _refit_rhs(C: jax.Array, w_down: jax.Array, kept: jax.Array, valid: jax.Array,
               on_diagonal: jax.Array) -> jax.Array:
    """``C[S, ~S] W_D[~S]`` (zero in the inert slots), in ``on_diagonal``'s dtype, ``REFIT_ROWS`` rows at a time:
    the rows ``C[S]`` are never gathered as one ``[slots, n]`` block."""
    n, slots, dt = C.shape[0], kept.shape[0], on_diagonal.dtype
    is_kept = jnp.zeros(n, bool).at[kept].set(valid)
    dropped_w = jnp.where(is_kept[:, None], 0.0, w_down.astype(dt))
    per = min(REFIT_ROWS, slots)
    chunks = -(-slots // per)
    rows = jnp.pad(kept, (0, chunks * per - slots)).reshape(chunks, per)

    def rhs_rows(r):  # C[r] W, with C symmetrised
        return _mm(0.5 * (C[r].astype(dt) + C[:, r].T.astype(dt)), dropped_w)

    rhs = lax.map(rhs_rows, rows).reshape(chunks * per, -1)[:slots]
    return jnp.where(valid[:, None], rhs, 0.0)


@jax.jit
def _refit_rows(w_down: jax.Array, kept: jax.Array, correction: jax.Array) -> jax.Array:
    return w_down[kept].astype(correction.dtype) + correction


def _nystrom_refit(C: jax.Array, w_down: jax.Array, order: jax.Array, delta: jax.Array, width: jax.Array,
                   slots: int):
    """The refit in ``slots >= width`` channel slots (a width bucket): slots past ``width`` are inert (identity
    rows in the solve, zero right-hand side). Returns the kept channels (ascending, then the inert slots) and the
    refitted rows; the first ``width`` of each are the result.

    ``argmin_W ||A_S W - A W_D||^2 + ridge ||W - W_D[S]||^2 = W_D[S] + (C_SS + ridge I)^-1 C[S, ~S] W_D[~S]``: only
    the dropped channels' contribution is solved for, so the full width returns ``W_D`` bit for bit. Run after the
    ranking (:func:`_leverage_order`), so the ranking's factor is gone before this one's exists; ``C_SS`` is never
    gathered whole (its factor is built in panels, :mod:`modegpt_jax.cholesky`). ``C`` may be narrower than the
    compute dtype (``delta``'s): what is used of it is cast."""
    kept, valid, on_diagonal = _refit_slots(C, order, delta, width, slots)
    factor = cholesky.factor(_refit_columns, (C, kept, valid, on_diagonal), slots)
    correction = cholesky.solve(factor, _refit_rhs(C, w_down, kept, valid, on_diagonal))
    return kept, _refit_rows(w_down, kept, correction)


# A factorisation of one panel gains nothing from separate steps: small matrices run each kernel as one compiled
# call (the same code under one jit), which compiles once per width bucket instead of once per step.
_leverage_order_one_call = jax.jit(_leverage_order)
_nystrom_refit_one_call = jax.jit(_nystrom_refit, static_argnames=("slots",))


def _one_call(n: int) -> bool:
    return len(cholesky.panel_bounds(n)) == 1


def nystrom_mlp(C_s: jax.Array, w_up: jax.Array, w_down: jax.Array, width: int, *,
                w_gate: jax.Array | None = None, b_up: jax.Array | None = None,
                alpha: float = DEFAULT_LEVERAGE_ALPHA, delta: float | None = None,
                precision64: bool | None = None, buckets: int = 16) -> dict[str, jax.Array | None]:
    """Type I (MLP) compression: keep ``width`` intermediate channels and refit the down projection.

    Module: ``f(x) = A W_D`` with ``A = s(x W_U + b_U)`` (OPT) or ``A = silu(x W_G) * (x W_U)`` (gated MLP);
    ``C_s = sum A^T A`` over calibration tokens.

    1. Channels ``S`` = the ``width`` highest ridge leverage scores of ``C_s`` (:func:`ridge_leverage_scores`).
    2. ``W_U[:, S]``, ``W_G[:, S]``, ``b_U[S]``: column selection commutes with the elementwise nonlinearity,
       so the kept channels of ``A`` are reproduced exactly.
    3. Least-squares refit of the down projection, ``argmin_W sum ||A_S W - A W_D||^2 + delta' ||W - W_D[S]||^2``:
       ``W_D <- (C_s[S,S] + delta' I)^-1 (C_s[S,:] W_D + delta' W_D[S])
              = W_D[S] + (C_s[S,S] + delta' I)^-1 C_s[S,~S] W_D[~S]``,
       with ridge ``delta' = delta * mean(diag(C_s[S,S]))`` (relative to the scale of the kept block; default
       :data:`RIDGE_FLOAT64` or :data:`RIDGE_FLOAT32` by compute precision). As ``delta -> 0`` this is the
       method's ``(C_s[S,S])^-1 C_s[S,:] W_D``; the ridge pulls towards the original rows rather than towards
       zero, so directions the calibration data does not excite keep their original weights and ``width = d_int``
       returns ``W_D`` exactly. The down-projection bias is unchanged.

    Args:
        C_s: ``[d_int, d_int]`` Gram matrix of the down-projection input.
        w_up: ``[d, d_int]``. w_gate: ``[d, d_int]`` or None. w_down: ``[d_int, d]``. b_up: ``[d_int]`` or None.
        width: channels to keep, ``1 <= width <= d_int``.
        alpha: leverage ridge (relative), see :data:`DEFAULT_LEVERAGE_ALPHA`.
        delta: refit ridge (relative); None for the precision's default.
        precision64: see the module docstring.
        buckets: the refit is solved in ``width_bucket(width, d_int, buckets)`` slots (one compilation per
            bucket, not per width); the result does not depend on it beyond rounding.

    Returns:
        ``{"w_up": [d, width], "w_gate": [d, width] | None, "w_down": [width, d], "b_up": [width] | None,
        "kept": int32 [width] ascending}``, weights in their input dtypes.
    """
    d_int = w_down.shape[0]
    if C_s.shape != (d_int, d_int):
        raise ValueError(f"C_s must be [d_int, d_int] = {(d_int, d_int)}, got {C_s.shape}")
    if w_up.ndim != 2 or w_up.shape[1] != d_int:
        raise ValueError(f"w_up must be [d, {d_int}], got {w_up.shape}")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate must have w_up's shape {w_up.shape}, got {w_gate.shape}")
    if b_up is not None and b_up.shape != (d_int,):
        raise ValueError(f"b_up must be [{d_int}], got {b_up.shape}")
    width = int(width)
    if not 1 <= width <= d_int:
        raise ValueError(f"width must be in [1, {d_int}], got {width}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")

    slots = width_bucket(width, d_int, parts=buckets)
    with compute_context(precision64) as cdt:
        # C_s stays in its own precision (float32 statistics gain nothing from a float64 copy, which would be the
        # largest buffer of a wide MLP: 1 GB at width 11008); the kernels cast what they use.
        wide = cdt == jnp.float64 and np.dtype(getattr(C_s, "dtype", np.float64)) == np.float64
        C_c = _placed(C_s, jnp.float64 if wide else jnp.float32)
        rank, refit = ((_leverage_order_one_call, _nystrom_refit_one_call) if _one_call(d_int)
                       else (_leverage_order, _nystrom_refit))
        order = rank(C_c, _placed(alpha, cdt))  # the ranking does not depend on the refit's ridge
        w_c = _placed(w_down)  # cast to the compute dtype inside the refit, not kept as a second copy
        kept, w_d = _with_growing_ridge(
            "nystrom_mlp",
            lambda r: refit(C_c, w_c, order, _placed(r, cdt), _placed(width, jnp.int32), slots=slots),
            _ridge(delta, cdt),
        )
        # Everything sized by the width is cut and gathered on the host: an eager JAX op would compile once per
        # width, i.e. once per layer.
        kept = np.asarray(kept)[:width].astype(np.int32)

        def take(w, axis):  # exact column selection, in the weight's own dtype
            return None if w is None else jnp.asarray(np.take(to_host(w).astype(_out_dtype(w)), kept, axis=axis))

        return {"w_up": take(w_up, 1), "w_gate": take(w_gate, 1),
                "w_down": jnp.asarray(np.asarray(w_d)[:width].astype(_out_dtype(w_down))),
                "b_up": take(b_up, 0), "kept": jnp.asarray(kept)}


# --------------------------------------------------------------------------------------------------------------
# Type II: key-query, CR decomposition (column selection by per-channel energies)
# --------------------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("rope",))
def _cr_scores(energy_q: jax.Array, energy_k: jax.Array, rope: bool):
    """CR score of every pair (RoPE) or channel, per KV group: ``[G, dh/2]`` or ``[G, dh]``."""
    H, dh = energy_q.shape
    G = energy_k.shape[0]
    half = dh // 2
    if rope:
        # Score whole pairs: E(p) + E(p + dh/2) is invariant under the RoPE rotation of the pair.
        energy_q = energy_q[:, :half] + energy_q[:, half:]
        energy_k = energy_k[:, :half] + energy_k[:, half:]
    n = energy_q.shape[1]
    # sqrt(a) * sqrt(b) rather than sqrt(a * b): sums of squares over many tokens can overflow float32 when
    # multiplied. Negative energies can only be rounding noise.
    sq = jnp.sqrt(jnp.maximum(energy_q, 0.0)).reshape(G, H // G, n)  # query head i -> group i // g
    sk = jnp.sqrt(jnp.maximum(energy_k, 0.0))
    return jnp.sum(sq, axis=1) * sk  # [G, n]


def cr_qk_select(energy_q: jax.Array, energy_k: jax.Array, qk_dim: int, *,
                 rope: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Type II (key-query) channel selection, one selection per KV group shared by its query heads.

    The CR score of channel ``j`` is ``||C_q^(1/2)[:, j]|| ||C_k^(1/2)[:, j]|| = sqrt(C_q,jj C_k,jj)``, so only
    the per-channel energies ``E(j) = sum_tokens q_j^2`` (pre-RoPE) are needed.

    * ``rope=True``: RoPE rotates the pairs ``(p, p + dh/2)`` (Hugging Face ``rotate_half`` layout). Pair energy
      ``P(p) = E(p) + E(p + dh/2)``; score of pair ``p`` in group ``g``: ``sum_{i in g} sqrt(P_q,i(p) P_k,g(p))``.
      The top ``qk_dim/2`` pairs are kept; ``channels = concat(pairs, pairs + dh/2)``, so the compressed head is
      again in ``rotate_half`` layout, and pair ``t`` of the compressed head must use the original frequency
      ``theta[pairs[t]]`` (and the softmax keeps ``1/sqrt(dh_original)``).
    * ``rope=False``: score ``sum_{i in g} sqrt(E_q,i(j) E_k,g(j))`` per channel, top ``qk_dim`` channels.

    Args:
        energy_q: ``[H, dh]`` per query head. energy_k: ``[G, dh]`` per KV head; ``H % G == 0``.
        qk_dim: kept head dim, ``1..dh`` (even and ``>= 2`` with RoPE).

    Returns:
        ``(channels int32 [G, qk_dim], pairs int32 [G, qk_dim/2] or None)``; pairs sorted ascending, channels
        sorted within each half (without RoPE: sorted).
    """
    # A ranking only: float32 is ample, no float64 needed.
    energy_q = _placed(energy_q, jnp.float32)
    energy_k = _placed(energy_k, jnp.float32)
    if energy_q.ndim != 2 or energy_k.ndim != 2 or energy_q.shape[1] != energy_k.shape[1]:
        raise ValueError(f"energy_q [H, dh] and energy_k [G, dh] expected, got {energy_q.shape}, {energy_k.shape}")
    H, dh = energy_q.shape
    G = energy_k.shape[0]
    if G == 0 or H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({G})")
    qk_dim = int(qk_dim)
    if rope:
        if dh % 2:
            raise ValueError(f"RoPE head dim must be even, got {dh}")
        if qk_dim % 2 or not 2 <= qk_dim <= dh:
            raise ValueError(f"with RoPE qk_dim must be even and in [2, {dh}], got {qk_dim}")
    elif not 1 <= qk_dim <= dh:
        raise ValueError(f"qk_dim must be in [1, {dh}], got {qk_dim}")
    score = np.asarray(_cr_scores(energy_q, energy_k, bool(rope)))
    # The top of each row, on the host (its size changes from layer to layer); ties keep the lower index.
    sel = np.sort(np.argsort(-score, axis=-1, kind="stable")[:, : qk_dim // 2 if rope else qk_dim], axis=-1)
    sel = sel.astype(np.int32)
    if rope:
        return jnp.asarray(np.concatenate([sel, sel + dh // 2], axis=-1)), jnp.asarray(sel)
    return jnp.asarray(sel), None


def apply_qk_selection(w_q: jax.Array, w_k: jax.Array, channels: jax.Array, n_heads: int, *,
                       b_q: jax.Array | None = None, b_k: jax.Array | None = None) -> dict[str, jax.Array | None]:
    """Gather the kept Q/K columns: key head ``g`` keeps ``channels[g]``, query head ``i`` its group's
    ``channels[i // (H/G)]``. Exact on the kept channels (plain column selection, biases carried along).

    Args:
        w_q: ``[d, H*dh]``. w_k: ``[d, G*dh]``. channels: int ``[G, k]`` (from :func:`cr_qk_select`).
        n_heads: ``H``. b_q: ``[H*dh]`` or None. b_k: ``[G*dh]`` or None.

    Returns:
        ``{"w_q": [d, H*k], "w_k": [d, G*k], "b_q": [H*k] | None, "b_k": [G*k] | None}``.
    """
    channels = np.asarray(channels, np.int32)
    if channels.ndim != 2:
        raise ValueError(f"channels must be [G, k], got {channels.shape}")
    G, k = channels.shape
    H = int(n_heads)
    if H % G:
        raise ValueError(f"n_heads ({H}) must be a multiple of the KV groups in channels ({G})")
    if w_k.shape[1] % G:
        raise ValueError(f"w_k columns ({w_k.shape[1]}) not divisible by G={G}")
    dh = w_k.shape[1] // G
    if w_q.shape != (w_k.shape[0], H * dh):
        raise ValueError(f"w_q must be [{w_k.shape[0]}, {H * dh}], got {w_q.shape}")
    idx_q = np.repeat(channels, H // G, axis=0)  # [H, k]: query head i uses group i // g

    # Gathered on the host: the result's size changes from layer to layer (an eager JAX gather compiles per size).
    def gather(w, idx, heads):  # w [d, heads*dh] -> [d, heads*k]
        w = to_host(w)
        d = w.shape[0]
        return jnp.asarray(np.take_along_axis(w.reshape(d, heads, dh), idx[None], axis=2).reshape(d, heads * k))

    def gather_b(b, idx, heads):
        if b is None:
            return None
        return jnp.asarray(np.take_along_axis(to_host(b).reshape(heads, dh), idx, axis=1).reshape(heads * k))

    return {"w_q": gather(w_q, idx_q, H), "w_k": gather(w_k, channels, G),
            "b_q": gather_b(b_q, idx_q, H), "b_k": gather_b(b_k, channels, G)}


# --------------------------------------------------------------------------------------------------------------
# Type III: value-output, joint SVD in the whitened space
# --------------------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("slots", "n_heads"))
def _vo_kernel(C: jax.Array, w_v: jax.Array, w_o: jax.Array, eps: jax.Array, rank: jax.Array, slots: int,
               n_heads: int):
    """The factors in ``slots >= rank`` columns per group (a rank bucket); columns past ``rank`` are zero.
    Returns ``V' [G, d, slots]`` and ``O' [G, slots, g*d]``."""
    d = C.shape[0]
    H = n_heads
    dh = w_o.shape[0] // H
    G = w_v.shape[1] // dh
    g = H // G
    C = 0.5 * (C + C.T)
    wv = w_v.reshape(d, G, dh).transpose(1, 0, 2)  # [G, d, dh]
    cw = _mm(C, w_v).reshape(d, G, dh).transpose(1, 0, 2)  # C W_V,g
    K = jnp.einsum("gdi,gdj->gij", wv, cw, precision=_HIGHEST)  # W_V,g^T C W_V,g, [G, dh, dh]
    K = 0.5 * (K + jnp.swapaxes(K, 1, 2))
    ridge = eps * _scale(jnp.diagonal(K, axis1=1, axis2=2))  # [G]
    eye = jnp.eye(dh, dtype=C.dtype)
    R = jnp.swapaxes(jnp.linalg.cholesky(K + ridge[:, None, None] * eye), 1, 2)  # upper: K + eps I = R^T R
    # [W_O,i for i in group g] side by side: [G, dh, g*d].
    wo = w_o.reshape(G, g, dh, d).transpose(0, 2, 1, 3).reshape(G, dh, g * d)
    M = _mm(R, wo)
    U, s, Vh = jnp.linalg.svd(M, full_matrices=False)  # U [G, dh, dh], s descending
    keep = (jnp.arange(slots) < rank).astype(C.dtype)
    Uk = U[:, :, :slots] * keep
    v_new = _mm(wv, jsl.solve_triangular(R, Uk, lower=False))  # W_V R^-1 U_k, [G, d, slots]
    o_new = (s[:, :slots] * keep)[:, :, None] * Vh[:, :slots, :]  # U_k^T M = S_k V_k^T, [G, slots, g*d]
    return v_new, o_new


def vo_svd(C: jax.Array, w_v: jax.Array, w_o: jax.Array, rank: int, n_heads: int, *,
           eps: float | None = None, precision64: bool | None = None) -> dict[str, jax.Array]:
    """Type III (value-output) compression: per KV group, a shared rank-``rank`` value basis.

    Minimises ``sum_{i in g} ||C^(1/2) (W_V,g W_O,i - V'_g O'_i)||_F^2`` (the calibration reconstruction error
    of ``x W_V,g W_O,i``) over ``V'_g [d, rank]`` and ``O'_i [rank, d]``, without any matrix square root:

    1. ``R_g`` = upper Cholesky factor of ``W_V,g^T C W_V,g + eps' I`` (``[dh, dh]``), with
       ``eps' = eps * mean(diag(W_V,g^T C W_V,g))`` (relative ridge; default :data:`RIDGE_FLOAT64` or
       :data:`RIDGE_FLOAT32` by compute precision).
    2. ``M_g = R_g [W_O,i for i in g]`` (``[dh, g*d]``); ``U_k`` = its top-``rank`` left singular vectors.
    3. ``V'_g = W_V,g R_g^-1 U_k``, ``O'_i = U_k^T R_g W_O,i``.

    With ``rank = dh``, ``V'_g O'_i = W_V,g W_O,i`` exactly whatever ``eps`` is. With ``g = 1`` this is the
    per-head whitened SVD.

    Args:
        C: ``[d, d]`` Gram matrix ``sum x^T x`` of the V projection's input.
        w_v: ``[d, G*dh]``. w_o: ``[H*dh, d]``. rank: ``1..dh``. n_heads: ``H``.

    Returns:
        ``{"w_v": [d, G*rank], "w_o": [H*rank, d]}`` in the input weights' dtypes.
    """
    H = int(n_heads)
    if w_o.ndim != 2 or w_o.shape[0] % H:
        raise ValueError(f"w_o must be [H*dh, d] with H={H}, got {w_o.shape}")
    dh = w_o.shape[0] // H
    d = w_o.shape[1]
    if w_v.ndim != 2 or w_v.shape[0] != d or w_v.shape[1] % dh:
        raise ValueError(f"w_v must be [{d}, G*{dh}], got {w_v.shape}")
    G = w_v.shape[1] // dh
    if H % G:
        raise ValueError(f"n_heads ({H}) must be a multiple of the KV heads ({G})")
    if C.shape != (d, d):
        raise ValueError(f"C must be [{d}, {d}], got {C.shape}")
    rank = int(rank)
    if not 1 <= rank <= dh:
        raise ValueError(f"rank must be in [1, {dh}], got {rank}")
    slots = width_bucket(rank, dh, parts=8)
    with compute_context(precision64) as cdt:
        C_c, wv_c, wo_c = _placed(C, cdt), _placed(w_v, cdt), _placed(w_o, cdt)
        v_new, o_new = _with_growing_ridge(
            "vo_svd",
            lambda r: _vo_kernel(C_c, wv_c, wo_c, _placed(r, cdt), _placed(rank, jnp.int32), slots, H),
            _ridge(eps, cdt),
        )
        # Cut to the rank and laid out on the host (sizes that change per layer would compile per layer).
        g = H // G
        v_new = np.asarray(v_new)[:, :, :rank].transpose(1, 0, 2).reshape(d, G * rank)
        o_new = np.asarray(o_new)[:, :rank].reshape(G, rank, g, d).transpose(0, 2, 1, 3).reshape(H * rank, d)
        return {"w_v": jnp.asarray(v_new.astype(_out_dtype(w_v))), "w_o": jnp.asarray(o_new.astype(_out_dtype(w_o)))}


def fold_value_bias(b_v: jax.Array, w_o: jax.Array, b_o: jax.Array | None, n_heads: int, *,
                    precision64: bool | None = None) -> jax.Array:
    """Fold the value bias into the output bias: ``b_O + sum_i b_V,g(i) W_O,i``.

    Exact because every attention row sums to one, so ``softmax(.) (1 b_V) = 1 b_V``. Call before
    :func:`vo_svd`, then drop ``b_V``.

    Args:
        b_v: ``[G*dh]``. w_o: ``[H*dh, d]``. b_o: ``[d]`` or None (zero). n_heads: ``H``.

    Returns:
        New ``b_O [d]`` in ``b_o``'s dtype (``w_o``'s if ``b_o`` is None).
    """
    H = int(n_heads)
    if w_o.ndim != 2 or w_o.shape[0] % H:
        raise ValueError(f"w_o must be [H*dh, d] with H={H}, got {w_o.shape}")
    dh = w_o.shape[0] // H
    d = w_o.shape[1]
    if b_v.ndim != 1 or b_v.shape[0] % dh or H % (b_v.shape[0] // dh):
        raise ValueError(f"b_v must be [G*{dh}] with G dividing {H}, got {b_v.shape}")
    if b_o is not None and b_o.shape != (d,):
        raise ValueError(f"b_o must be [{d}], got {b_o.shape}")
    G = b_v.shape[0] // dh
    with compute_context(precision64) as cdt:
        # Head i reads group i // g's value bias.
        b_rep = jnp.repeat(_placed(b_v, cdt).reshape(G, dh), H // G, axis=0).reshape(H * dh)
        new = _mm(b_rep, _placed(w_o, cdt))
        if b_o is not None:
            new = new + _placed(b_o, cdt)
        return new.astype(_out_dtype(w_o if b_o is None else b_o))
