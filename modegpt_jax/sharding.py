"""Where weights live on the mesh: tensor parallelism over the ``"model"`` axis.

With ``model > 1`` every large weight is split over the ``"model"`` devices the Megatron way, so that the passes
need one collective per projection pair:

- ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``: by output columns (``P(None, "model")``), their
  biases to match (``P("model")``);
- ``o_proj``, ``down_proj``: by input rows (``P("model", None)``); their biases whole;
- the token embeddings by vocabulary rows (``P("model", None)``) and an untied head by vocabulary columns;
- norms, biases of the output projections, learned positions and RoPE frequency tables whole on every device.

A dimension that the ``"model"`` size does not divide stays whole (replicated): XLA shards only evenly. Hidden
states are split over ``"data"`` (:func:`modegpt_jax.mesh.batch_sharding`) and whole over ``"model"``. With
``model == 1`` every weight is replicated, as data parallelism needs.

Arrays are made with :func:`jax.make_array_from_callback`, each device taking only its slice of a host copy, so a
weight is never gathered whole on one device first, and the same call works when the mesh spans processes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modegpt_jax.mesh import MODEL, to_host

__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "make_sharded", "param_spec", "param_sharding", "place"]

#: Projections split by output columns (their outputs are sharded over "model").
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
#: Projections split by input rows (they consume column-parallel outputs; XLA sums their partial products).
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


def param_spec(path: tuple, shape: tuple[int, ...], model_size: int) -> P:
    """The ``PartitionSpec`` of the parameter at ``path`` (an NNX path such as ``("attn", "q_proj", "kernel")``,
    with or without a ``("layers", i)`` prefix) of shape ``shape`` on a mesh whose ``"model"`` axis has
    ``model_size`` devices."""
    names = [str(p) for p in path if str(p) != "base"]  # a wrapped projection (LoRA) is sharded as itself
    leaf, owner = names[-1], (names[-2] if len(names) > 1 else "")
    spec: tuple = ()
    if model_size > 1:
        if owner in COLUMN_PARALLEL:
            spec = (None, MODEL) if leaf == "kernel" else (MODEL,)
        elif owner in ROW_PARALLEL and leaf == "kernel":
            spec = (MODEL, None)
        elif leaf == "embed_tokens":
            spec = (MODEL, None)
        elif owner == "lm_head" and leaf == "kernel":
            spec = (None, MODEL)
    if len(spec) != len(shape) or any(axis and dim % model_size for dim, axis in zip(shape, spec)):
        return P()
    return P(*spec)


def param_sharding(mesh: Mesh, path: tuple, shape: tuple[int, ...]) -> NamedSharding:
    """:func:`param_spec` on ``mesh``."""
    return NamedSharding(mesh, param_spec(path, tuple(shape), mesh.shape[MODEL]))


def make_sharded(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
                 read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` with ``sharding`` whose device slices come from ``read(index)`` (a host slice of
    the whole value, cast to ``dtype`` slice by slice)."""
    return jax.make_array_from_callback(tuple(shape), sharding,
                                        lambda index: np.asarray(read(index), dtype=dtype))


def place(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Put every parameter and buffer of ``module`` (a block, a compressed module or a model; abstract leaves are
    skipped) on ``mesh`` with the sharding of :func:`param_spec`, in place; returns ``module``. A leaf that
    already has that sharding is left as it is."""
    state = nnx.state(module)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if not isinstance(value, (jax.Array, np.ndarray)):
            continue  # abstract (shape-only) leaves, e.g. the blocks of a model shell
        sharding = param_sharding(mesh, tuple(path), value.shape)
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            continue
        host = to_host(value)
        var.set_value(make_sharded(host.shape, host.dtype, sharding, lambda index, h=host: h[index]))
    nnx.update(module, state)
    return module

