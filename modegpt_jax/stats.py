"""Calibration statistics, accumulated batch by batch on a device mesh.

MoDeGPT needs only a few sums over every calibration token (see docs/method.md):

- ``gram``: ``C = sum x~^T x~`` of the attention input (value-output SVD) and ``C_s = sum A^T A`` of the MLP
  intermediate (Nystrom ridge leverage scores and the down-projection refit).
- ``channel_energy``: per-channel energies ``E(j) = sum y_j^2`` of the pre-RoPE query and key projections
  (key-query CR scores; the RoPE pair energy is ``E(p) + E(p + dh/2)``).
- ``cosine_sum``: ``sum cos(h_l, h_(l+1))`` and the token count, for block influence ``BI = 1 - mean cos``.

The functions take activations the caller already computed (the pipeline reuses its own projections), so no
model code lives here. Each one is jitted; rows are split over the mesh's ``"data"`` axis along the batch
dimension, every device sums its own rows and one all-reduce over ``"data"`` gives the replicated total.
Sums are float32 by default (float64 on request, where ``jax_enable_x64`` is on); matmuls run at
``Precision.HIGHEST`` with the accumulation type requested explicitly, because the TPU default is a single bf16
pass and low-precision inputs (bf16 models) would otherwise accumulate in bf16.

``Accumulator`` adds the per-batch results up on device and checks them for NaN/Inf when read back.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modegpt_jax.errors import UserError
from modegpt_jax.mesh import DATA, MODEL, to_host

__all__ = [
    "Accumulator",
    "CosineSum",
    "channel_energy",
    "cosine_sum",
    "gram",
    "to_host",
    "to_host_tree",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class CosineSum(NamedTuple):
    """Sum of per-token cosine similarities and how many tokens it covers (a pytree: ``Accumulator`` adds it)."""

    total: Any  # scalar, accumulation dtype
    count: Any  # scalar int32: exact however many tokens (a float32 count stops being exact at 2**24)

    def mean(self) -> float:
        """Mean cosine over the counted tokens (host float; use after ``Accumulator.finalize``)."""
        return float(np.asarray(self.total) / np.asarray(self.count))


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _acc_dtype(dtype) -> np.dtype:
    """The accumulation dtype: float32, or float64 when JAX has 64-bit types switched on."""
    dt = np.dtype(dtype)
    if dt == np.float64 and not jax.config.jax_enable_x64:
        raise UserError(
            "float64 statistics need 64-bit JAX: set JAX_ENABLE_X64=1 (or call "
            "jax.config.update('jax_enable_x64', True) at startup), or use float32 statistics"
        )
    if dt not in (np.float32, np.float64):
        raise UserError(f"statistics accumulate in float32 or float64, not {dt}; pass dtype='float32'")
    return dt


def _matmul_input(x: jax.Array, acc: np.dtype) -> jax.Array:
    """Input for an ``acc``-accumulating matmul.

    A float narrower than ``acc`` (bf16/f16 activations, or f32 under f64 statistics) is kept as it is: each
    product is exact in ``acc`` and ``preferred_element_type`` makes the sum run in ``acc``, without an upcast
    copy of the activations. Anything else is cast to ``acc``.
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < np.finfo(acc).bits:
        return x
    return x.astype(acc)


def _resolve_mesh(mesh: Mesh | None, x) -> Mesh | None:
    """``mesh`` if given, else the mesh of ``x`` when it is already sharded on one with a ``"data"`` axis."""
    if mesh is not None:
        return mesh
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and DATA in sharding.mesh.axis_names:
        return sharding.mesh
    return None


def _constrain(x, mesh: Mesh | None, *spec):
    """``with_sharding_constraint`` on ``mesh`` (inside jit); no-op without a mesh (single-device use)."""
    if mesh is None or x is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _bool_mask(mask):
    """Any nonzero entry keeps its token (so int and float 0/1 masks mean the same as bool ones)."""
    return None if mask is None else mask.astype(bool)


def _token_mask(mask, batch_shape: tuple[int, int]):
    """Validate a ``[B, T]`` token mask outside jit (clear error, not a broadcasting failure deep in XLA)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(f"token mask has shape {tuple(mask.shape)}, expected [B, T] = {tuple(batch_shape)}")
    return mask


# ----------------------------------------------------------------------------------------------------------------
# statistics (one batch each)


#: A Gram matrix at least this wide is computed in GRAM_BLOCKS x GRAM_BLOCKS blocks, the upper triangle only (its
#: lower blocks are transposes): 10 of 16 block products, 37.5% fewer FLOPs than one full product.
GRAM_BLOCK_MIN_WIDTH = 512
GRAM_BLOCKS = 4


def _symmetric_product(x, acc):
    """``x^T x`` for ``x [tokens, n]``, from the blocks on and above the diagonal; exactly symmetric when blocked."""
    n = x.shape[-1]

    def dot(a, b):
        return jnp.einsum("tn,tm->nm", a, b, precision=_HIGHEST, preferred_element_type=acc)

    if n < GRAM_BLOCK_MIN_WIDTH:
        return dot(x, x)
    edges = [round(i * n / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    parts = [x[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    upper = {(i, j): dot(parts[i], parts[j]) for i in range(GRAM_BLOCKS) for j in range(i, GRAM_BLOCKS)}
    for i in range(GRAM_BLOCKS):
        # A diagonal block's own halves may differ in the last bit (the CPU kernels tile them differently): its
        # upper triangle mirrored makes the whole result exactly symmetric.
        block = upper[(i, i)]
        upper[(i, i)] = jnp.triu(block) + jnp.triu(block, 1).T
    rows = [jnp.concatenate([upper[(i, j)] if j >= i else upper[(j, i)].T for j in range(GRAM_BLOCKS)], axis=1)
            for i in range(GRAM_BLOCKS)]
    return jnp.concatenate(rows, axis=0)


@functools.partial(jax.jit, static_argnames=("mesh", "acc", "shard_model"))
def _gram(x, mask, *, mesh, acc, shard_model):
    x = _constrain(x, mesh, DATA)
    mask = _bool_mask(_constrain(mask, mesh, DATA))
    x = _matmul_input(x, acc)
    if mask is not None:
        # where(), not x * mask: padding may hold NaN/Inf, and 0 * NaN is NaN.
        x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    out = _symmetric_product(x.reshape(-1, x.shape[-1]), acc)
    # Sharding the output rows over "model" also splits the matmul: each model device computes only its rows.
    return _constrain(out, mesh, MODEL if shard_model else None, None)


def gram(
    x,
    *,
    mask=None,
    mesh: Mesh | None = None,
    dtype="float32",
    shard_model: bool = False,
) -> jax.Array:
    """Uncentred correlation ``sum_{b,t} x[b,t]^T x[b,t]`` of one batch.

    Used for the attention input correlation ``C`` (``n = d``) and the MLP intermediate correlation ``C_s``
    (``n = d_int``).

    Args:
      x: activations ``[B, T, n]``, any float dtype (bf16 activations are summed exactly in ``dtype``).
      mask: optional ``[B, T]`` bool; tokens where it is False (padding) contribute nothing.
      mesh: mesh to run on (``B`` split over ``"data"``); default: the mesh ``x`` is sharded on, if any.
      dtype: accumulation dtype, ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
      shard_model: return the ``[n, n]`` result sharded over ``"model"`` along its first dimension instead of
        replicated (for large ``d_int x d_int`` matrices on a mesh with a ``"model"`` axis).

    Returns:
      ``[n, n]`` in ``dtype``; replicated over the mesh unless ``shard_model``.
    """
    if x.ndim != 3:
        raise ValueError(f"gram expects activations [B, T, n], got shape {tuple(x.shape)}")
    mask = _token_mask(mask, x.shape[:2])
    return _gram(x, mask, mesh=_resolve_mesh(mesh, x), acc=_acc_dtype(dtype), shard_model=shard_model)


@functools.partial(jax.jit, static_argnames=("mesh", "acc"))
def _channel_energy(y, mask, *, mesh, acc):
    y = _constrain(y, mesh, DATA)
    mask = _bool_mask(_constrain(mask, mesh, DATA))
    sq = jnp.square(y.astype(acc))  # fused into the reduction by XLA: no [B, T, heads, dh] float copy is kept
    if mask is not None:
        sq = jnp.where(mask[..., None, None], sq, jnp.zeros((), acc))
    return _constrain(jnp.sum(sq, axis=(0, 1)), mesh)


def channel_energy(
    y,
    n_heads: int | None = None,
    *,
    mask=None,
    mesh: Mesh | None = None,
    dtype="float32",
) -> jax.Array:
    """Per-head, per-channel energy ``E[h, j] = sum_{b,t} y[b,t,h,j]^2`` of one batch.

    Used on the pre-RoPE query (``heads = H``) and key (``heads = G``) projections for the key-query CR scores.

    Args:
      y: projections ``[B, T, heads, dh]``, or ``[B, T, heads * dh]`` together with ``n_heads``.
      n_heads: number of heads when ``y`` is flat (the usual ``x @ W_Q`` output); must divide its last dimension.
      mask: optional ``[B, T]`` bool; tokens where it is False contribute nothing.
      mesh: mesh to run on; default: the mesh ``y`` is sharded on, if any.
      dtype: accumulation dtype, ``"float32"`` or ``"float64"``.

    Returns:
      ``[heads, dh]`` in ``dtype``, replicated over the mesh.
    """
    if y.ndim == 3:
        if n_heads is None or n_heads < 1 or y.shape[-1] % n_heads:
            raise ValueError(
                f"channel_energy of flat projections {tuple(y.shape)} needs n_heads dividing {y.shape[-1]}"
            )
        y = y.reshape(*y.shape[:2], n_heads, y.shape[-1] // n_heads)
    elif y.ndim != 4 or (n_heads is not None and n_heads != y.shape[2]):
        raise ValueError(f"channel_energy expects [B, T, heads, dh] or [B, T, heads*dh], got shape {tuple(y.shape)}")
    mask = _token_mask(mask, y.shape[:2])
    return _channel_energy(y, mask, mesh=_resolve_mesh(mesh, y), acc=_acc_dtype(dtype))


@functools.partial(jax.jit, static_argnames=("mesh", "acc"))
def _cosine_sum(h_in, h_out, mask, *, mesh, acc):
    h_in = _constrain(h_in, mesh, DATA).astype(acc)
    h_out = _constrain(h_out, mesh, DATA).astype(acc)
    mask = _bool_mask(_constrain(mask, mesh, DATA))
    dot = jnp.sum(h_in * h_out, axis=-1)
    # Norms multiplied separately (not sqrt(|a|^2 |b|^2)): the product of squared norms of large residual
    # streams can overflow float32. A zero vector has cosine 0 rather than NaN.
    norms = jnp.linalg.norm(h_in, axis=-1) * jnp.linalg.norm(h_out, axis=-1)
    cos = dot / jnp.maximum(norms, jnp.finfo(acc).tiny)
    if mask is None:
        total, count = jnp.sum(cos), jnp.int32(cos.size)
    else:
        total = jnp.sum(jnp.where(mask, cos, jnp.zeros((), acc)))
        count = jnp.sum(mask, dtype=jnp.int32)
    return CosineSum(_constrain(total, mesh), _constrain(count, mesh))


def cosine_sum(
    h_in,
    h_out,
    *,
    mask=None,
    mesh: Mesh | None = None,
    dtype="float32",
) -> CosineSum:
    """Sum over tokens of ``cos(h_in[b,t], h_out[b,t])``, and the token count, for one batch.

    Block influence of layer ``l`` is ``1 - total / count`` with ``h_in``/``h_out`` the residual stream entering
    and leaving the block (see ``CosineSum.mean``).

    Args:
      h_in, h_out: hidden states ``[B, T, d]``.
      mask: optional ``[B, T]`` bool; tokens where it is False are neither summed nor counted.
      mesh: mesh to run on; default: the mesh ``h_in`` is sharded on, if any.
      dtype: accumulation dtype, ``"float32"`` or ``"float64"``.

    Returns:
      ``CosineSum(total, count)``: scalars, ``total`` in ``dtype``, ``count`` int32, replicated over the mesh.
    """
    if h_in.ndim != 3 or h_in.shape != h_out.shape:
        raise ValueError(f"cosine_sum expects two [B, T, d] arrays of one shape, got {h_in.shape} and {h_out.shape}")
    mask = _token_mask(mask, h_in.shape[:2])
    return _cosine_sum(h_in, h_out, mask, mesh=_resolve_mesh(mesh, h_in), acc=_acc_dtype(dtype))


# ----------------------------------------------------------------------------------------------------------------
# accumulation across batches


@functools.partial(jax.jit, donate_argnums=0)
def _add_in_place(total, batch):
    # The running sum is donated: a d_int x d_int statistic is updated without a second copy of it.
    return jax.tree.map(jnp.add, total, batch)


_add = jax.jit(lambda total, batch: jax.tree.map(jnp.add, total, batch))


@jax.jit
def _non_finite_counts(tree):
    return jax.tree.map(lambda leaf: jnp.sum(~jnp.isfinite(leaf), dtype=jnp.int32), tree)


class Accumulator:
    """Named running sums of per-batch statistics, kept on device.

    A value may be any pytree of arrays (e.g. ``CosineSum``); later values under the same name must have the
    same structure, shapes and dtypes, and are added leaf by leaf. Sums keep the sharding of the values
    (replicated, or ``"model"``-sharded from ``gram(..., shard_model=True)``).

    Example::

        acc = Accumulator()
        for batch in batches:
            x = norm(batch)
            acc.add("C", gram(x, mesh=mesh))
            acc.add("E_q", channel_energy(x @ w_q, n_heads, mesh=mesh))
        stats = acc.finalize(where=f"layer {i}")   # {"C": np.ndarray, "E_q": np.ndarray}
    """

    def __init__(self):
        self._sums: dict[str, Any] = {}
        # Whether each sum is an array this object made (safe to donate) or still the caller's first value.
        self._owned: dict[str, bool] = {}

    def add(self, name: str, value) -> None:
        """Add one batch's ``value`` to the sum called ``name`` (the first value starts the sum)."""
        if name not in self._sums:
            self._sums[name] = value
            self._owned[name] = False
            return
        total = self._sums[name]
        if jax.tree.structure(total) != jax.tree.structure(value) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(value))
        ):
            raise ValueError(f"statistic {name!r}: a batch value does not match the shapes/dtypes summed so far")
        # Never donate the caller's own first array: they may still be using it.
        self._sums[name] = (_add_in_place if self._owned[name] else _add)(total, value)
        self._owned[name] = True

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    @property
    def names(self) -> list[str]:
        """Names of the statistics added so far, in order of first addition."""
        return list(self._sums)

    def get(self, name: str):
        """The running sum ``name`` as device arrays (no finiteness check)."""
        return self._sums[name]

    def reset(self) -> None:
        """Forget every sum (e.g. before the next layer)."""
        self._sums.clear()
        self._owned.clear()

    def finalize(self, *, where: str = "", to_numpy: bool = True) -> dict[str, Any]:
        """Check every sum for NaN/Inf and return them.

        Args:
          where: context for the error message, e.g. ``"layer 3"``.
          to_numpy: return host NumPy arrays (default) rather than the device arrays. In a multi-process run
            every process must call this (reading a sharded sum is a collective); each process gets the full value.

        Returns:
          ``{name: value}`` with each value in the structure it was added in.

        Raises:
          UserError: a statistic holds NaN or Inf; the message names it.
        """
        bad = to_host_tree(_non_finite_counts(self._sums)) if self._sums else {}
        for name, counts in bad.items():
            n_bad = int(sum(np.sum(c) for c in jax.tree.leaves(counts)))
            if n_bad:
                at = f" ({where})" if where else ""
                raise UserError(
                    f"statistic {name!r}{at} has {n_bad} NaN/Inf values: the model's activations overflowed or its "
                    "weights are broken; load the model in float32 or bfloat16 (not float16) and check the checkpoint"
                )
        return to_host_tree(self._sums) if to_numpy else dict(self._sums)


def to_host_tree(tree):
    """``to_host`` on every leaf of a pytree."""
    return jax.tree.map(to_host, tree)
