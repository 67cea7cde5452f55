"""Device mesh for the whole project, and moving host arrays onto it.

Every mesh has the same two axes, in this order:

- ``"data"``: calibration rows (the batch dimension) are split over it; statistics are summed over it.
- ``"model"``: optional model parallelism, e.g. sharding a large ``d x d`` statistic along one dimension.

Both axes always exist (unused ones have size 1), so a ``PartitionSpec`` naming either axis is valid on any mesh.
The ``"model"`` axis is the inner one: the devices of one model group are neighbours in ``jax.devices()`` order,
which on a multi-host run keeps them on one host when the ``"model"`` size divides a host's devices (compression
needs that; recovery training also allows groups that span hosts).

The same code runs on 1 CPU, on ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulated devices, on a
GPU box and, after ``jax.distributed.initialize()``, on many processes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modegpt_jax.errors import UserError

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

__all__ = [
    "AXES",
    "DATA",
    "MODEL",
    "batch_sharding",
    "bytes_per_device",
    "compute_device",
    "global_batch",
    "local_blocks",
    "make_mesh",
    "parse_mesh_spec",
    "replicate",
    "replicated",
    "shard_batch",
    "to_compute_device",
    "to_host",
]


def parse_mesh_spec(spec: str | None, device_count: int) -> dict[str, int]:
    """Parse ``"data=4,model=2"`` into ``{"data": 4, "model": 2}`` for ``device_count`` devices.

    ``None`` or an empty string means every device on ``"data"``. An axis that is not named has size 1.
    Raises ``UserError`` for an unknown or repeated axis name, a size that is not a positive integer, or sizes
    whose product is not ``device_count``.
    """
    example = f"e.g. --mesh data={device_count}"
    if spec is None or not spec.strip():
        return {DATA: device_count, MODEL: 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise UserError(f"mesh spec {spec!r}: {part.strip()!r} is not AXIS=SIZE; write it like {example}")
        if name not in AXES:
            raise UserError(
                f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {', '.join(AXES)} ({example})"
            )
        if name in sizes:
            raise UserError(f"mesh spec {spec!r}: axis {name!r} is given twice; name each axis once ({example})")
        size = int(value) if value.isdecimal() else 0
        if size < 1:
            raise UserError(
                f"mesh spec {spec!r}: size {value!r} of axis {name!r} must be a positive integer ({example})"
            )
        sizes[name] = size
    shape = {axis: sizes.get(axis, 1) for axis in AXES}
    if math.prod(shape.values()) != device_count:
        got = " x ".join(f"{a}={s}" for a, s in shape.items())
        raise UserError(
            f"mesh spec {spec!r} uses {math.prod(shape.values())} devices ({got}) but {device_count} are available; "
            f"make the sizes multiply to {device_count} ({example})"
        )
    return shape


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """Build the project's ``("data", "model")`` mesh from a spec string such as ``"data=4,model=2"``.

    Args:
      spec: ``None`` (or ``""``) puts every device on ``"data"`` with ``"model"`` of size 1.
      devices: devices to use; default ``jax.devices()``, i.e. every process's devices in a multi-process run.

    Returns:
      A ``Mesh`` with axis names ``("data", "model")`` and ``Auto`` axis types, so sharding is propagated by the
      compiler from ``jit`` in/out shardings and ``with_sharding_constraint`` (jax 0.10's ``jax.make_mesh``
      defaults to ``Explicit`` axes, which would make sharding part of every array's type).

    Raises:
      UserError: the spec is malformed or does not use exactly all the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_spec(spec, len(devices))
    # jax.make_mesh silently drops devices when the product is smaller; parse_mesh_spec already refused that.
    return jax.make_mesh(
        tuple(shape[a] for a in AXES),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an ``ndim``-dimensional array split over ``"data"`` along ``batch_axis``, replicated elsewhere."""
    spec = [None] * ndim
    spec[batch_axis] = DATA
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole by every device of ``mesh``."""
    return NamedSharding(mesh, P())


def _local_data_shards(mesh: Mesh) -> int:
    """How many distinct ``"data"`` positions this process's devices cover."""
    data_dim = mesh.axis_names.index(DATA)
    local = {d.id for d in jax.local_devices()}
    rows = {idx[data_dim] for idx, d in np.ndenumerate(mesh.devices) if d.id in local}
    return len(rows)


def shard_batch(local_rows, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """Place this process's rows on ``mesh``, split over ``"data"`` along ``batch_axis``.

    In a single-process run ``local_rows`` is the whole batch. In a multi-process run every process passes its
    own, equally sized slice of rows (``[B / process_count, ...]``); the result is one global array of
    ``B`` rows whose order is process 0's rows, then process 1's, and so on.

    Args:
      local_rows: host array (NumPy or anything ``np.asarray`` accepts) ``[B_local, ...]``.
      mesh: a mesh from ``make_mesh``.
      batch_axis: which dimension holds the rows.

    Returns:
      A global ``jax.Array`` ``[B_local * process_count, ...]`` sharded ``P(..., "data", ...)``.

    Raises:
      UserError: the rows cannot be split evenly over this process's ``"data"`` positions, or the mesh puts
        one ``"data"`` position on several processes (its ``"model"`` group spans hosts).
    """
    local_rows = np.asarray(local_rows)
    shards = _local_data_shards(mesh)
    if shards * jax.process_count() != mesh.shape[DATA]:
        raise UserError(
            f"the mesh's model axis ({mesh.shape[MODEL]}) spans processes, so processes cannot feed separate rows; "
            f"choose a model size that divides the {jax.local_device_count()} devices of one process"
        )
    rows = local_rows.shape[batch_axis]
    if rows % shards:
        per_process = "" if jax.process_count() == 1 else " per process"
        raise UserError(
            f"a batch of {rows} rows{per_process} cannot be split evenly over {shards} data shards; "
            f"use a batch size{per_process} that is a multiple of {shards}"
        )
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local_rows.ndim, batch_axis), local_rows)


def global_batch(rows, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """Place a whole batch, the same on every process, on ``mesh``, split over ``"data"`` along ``batch_axis``:
    each process copies to its own devices the rows they take, so any mesh layout works, a ``"model"`` group
    spanning processes included (unlike :func:`shard_batch`, where each process brings different rows).

    Raises:
      UserError: the rows cannot be split evenly over the ``"data"`` axis.
    """
    rows = np.asarray(rows)
    if rows.shape[batch_axis] % mesh.shape[DATA]:
        raise UserError(f"a batch of {rows.shape[batch_axis]} rows cannot be split evenly over the mesh's "
                        f"{mesh.shape[DATA]} data shards; use a batch size that is a multiple of {mesh.shape[DATA]}")
    return jax.make_array_from_callback(rows.shape, batch_sharding(mesh, rows.ndim, batch_axis),
                                        lambda index: rows[index])


def replicate(value, mesh: Mesh) -> jax.Array:
    """Put a host array, identical on every process, whole onto every device of ``mesh``."""
    value = np.asarray(value)
    # make_array_from_callback works for non-addressable devices too; each process fills only its own devices.
    return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])


def local_blocks(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[tuple[jax.Device, tuple, bool]]:
    """This process's devices in id order, each with the block of the array it holds (``(start, stop)`` per
    dimension) and whether it is the first of them to hold that block: an array replicated over an axis (hidden
    states over ``"model"``) needs only the first holder's copy kept, written or read, the others are copies."""
    out, seen = [], set()
    for device, index in sorted(sharding.addressable_devices_indices_map(tuple(shape)).items(),
                                key=lambda item: item[0].id):
        key = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
        out.append((device, key, key not in seen))
        seen.add(key)
    return out


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``, also when ``x`` is a global array spread over several processes.

    When this process's devices hold every part of ``x`` (replicated, or sharded over a ``"model"`` group that
    lies within the process), the copy is assembled from them locally. Otherwise it is gathered from the other
    processes, a collective: every process must then call this for the same array.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    # Shards of a NamedSharding are disjoint blocks (or replicas of one): distinct blocks summing to x.size cover x.
    shards = {s.device: s for s in x.addressable_shards}
    firsts = [(device, key) for device, key, first in local_blocks(x.sharding, x.shape) if first]
    if sum(int(np.prod([b - a for a, b in key])) for _, key in firsts) == x.size:
        out = np.empty(x.shape, x.dtype)
        for device, _ in firsts:
            out[shards[device].index] = np.asarray(shards[device].data)
        return out
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute_device() -> jax.Device:
    """The device small dense linear algebra (factorisations, error metrics) runs on: this process's first."""
    return jax.local_devices()[0]


def to_compute_device(x, dtype=None) -> jax.Array:
    """``x`` (an array of any sharding, or anything NumPy takes) on :func:`compute_device`, cast to ``dtype``.

    Anything that calls LAPACK (SVD, Cholesky, triangular solves, pseudo-inverses) takes its inputs through this
    rather than running on the mesh. On CPU, jaxlib's LAPACK kernels split a batch over XLA's intra-op thread pool
    and wait for the pieces from inside that pool; when several CPU devices run such a kernel at once (inputs
    replicated or sharded over a mesh), every pool thread can end up waiting and none is left to do the work. With
    two simulated devices on a two-core machine the first value-output SVD of SmolLM2 hung for good.
    """
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        if x.sharding.device_set != {compute_device()}:
            x = jax.device_put(x, compute_device())
        return x if dtype is None else x.astype(dtype)
    host = to_host(x)  # multi-process arrays via the host
    return jax.device_put(host if dtype is None else host.astype(dtype), compute_device())


def bytes_per_device(tree) -> int:
    """The most bytes that any one of this process's devices holds of the arrays in ``tree`` (a pytree; leaves
    that are not ``jax.Array`` count nothing): what sharding saves, measured on the arrays themselves."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
