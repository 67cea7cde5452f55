"""Computes the statistics of ``tests/test_stats.py`` in a fresh JAX process and saves them to ``.npz``.

A fresh process is needed because the device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) and
``jax.distributed`` must be set up before JAX's backend starts, and the pytest process has already started it.

Usage (from the repository root)::

    python -m tests.stats_worker devices OUT.npz MESH [MESH ...]
    python -m tests.stats_worker distributed OUT.npz PORT PROCESS_ID NUM_PROCESSES MESH [MESH ...]

Keys in the ``.npz``: ``"{mesh}/{statistic}"`` plus ``"{mesh}/layout/..."`` facts about output shardings.
"""

from __future__ import annotations

import sys

import numpy as np

# Shapes of the synthetic calibration set: BATCHES batches of [ROWS, SEQ] tokens.
BATCHES, ROWS, SEQ = 2, 8, 12
D, HEADS, DH = 24, 4, 6  # hidden size; heads x head dim of the "query projection"
INT = 40  # "MLP intermediate" width


def batch(i: int) -> dict[str, np.ndarray]:
    """Batch ``i`` of the synthetic calibration set (identical in every process: seeded by ``i``)."""
    rng = np.random.default_rng(1234 + i)
    h_in = rng.standard_normal((ROWS, SEQ, D)).astype(np.float32)
    # An off-centre, unequally scaled input so the Gram matrix is not close to a multiple of the identity.
    x = (rng.standard_normal((ROWS, SEQ, D)) * rng.uniform(0.2, 3.0, D) + 0.5).astype(np.float32)
    q = (rng.standard_normal((ROWS, SEQ, HEADS * DH)) * rng.uniform(0.1, 2.0, HEADS * DH)).astype(np.float32)
    a = np.maximum(rng.standard_normal((ROWS, SEQ, INT)), 0).astype(np.float32)
    h_out = (h_in + 0.7 * rng.standard_normal((ROWS, SEQ, D))).astype(np.float32)
    # Padding: a ragged tail in every row; padded positions hold NaN, which must not leak into masked sums.
    lengths = rng.integers(SEQ // 2, SEQ + 1, ROWS)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    a_padded = np.where(mask[..., None], a, np.nan).astype(np.float32)
    return dict(x=x, q=q, a=a, a_padded=a_padded, mask=mask, h_in=h_in, h_out=h_out)


def compute(mesh, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """All statistics over every batch on ``mesh``; this process contributes rows ``rows`` of each batch."""
    from modegpt_jax import stats
    from modegpt_jax.mesh import shard_batch

    acc = stats.Accumulator()
    for i in range(BATCHES):
        b = {k: shard_batch(v[rows], mesh) for k, v in batch(i).items()}
        acc.add("C", stats.gram(b["x"], mesh=mesh))
        acc.add("C_model", stats.gram(b["x"], mesh=mesh, shard_model=True))
        acc.add("C_s_masked", stats.gram(b["a_padded"], mask=b["mask"], mesh=mesh))
        acc.add("E_q", stats.channel_energy(b["q"], HEADS, mesh=mesh))
        acc.add("E_q_masked", stats.channel_energy(b["q"], HEADS, mask=b["mask"], mesh=mesh))
        acc.add("cos", stats.cosine_sum(b["h_in"], b["h_out"], mesh=mesh))
        acc.add("cos_masked", stats.cosine_sum(b["h_in"], b["h_out"], mask=b["mask"], mesh=mesh))
    device_sums = acc.finalize(to_numpy=False)
    out = {}
    for name, value in acc.finalize().items():
        if isinstance(value, stats.CosineSum):
            out[f"{name}.total"], out[f"{name}.count"] = value.total, value.count
        else:
            out[name] = value
    # Where the sums live: replicated, or split over "model" for shard_model=True.
    out["layout/C_replicated"] = np.array(device_sums["C"].sharding.is_fully_replicated)
    out["layout/C_model_spec"] = np.array(str(device_sums["C_model"].sharding.spec))
    out["layout/devices"] = np.array(len(mesh.devices.flat))
    return out


def main(argv: list[str]) -> None:
    mode, out_path, *rest = argv
    if mode == "distributed":
        port, process_id, num_processes, *meshes = rest
        import jax

        # CPU cross-process collectives need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=int(num_processes), process_id=int(process_id),
            initialization_timeout=60,
        )
        per_process = ROWS // int(num_processes)
        rows = slice(int(process_id) * per_process, (int(process_id) + 1) * per_process)
    elif mode == "devices":
        meshes, rows = rest, slice(None)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    import jax

    from modegpt_jax.mesh import make_mesh

    results = {}
    for spec in meshes:
        for key, value in compute(make_mesh(spec), rows).items():
            results[f"{spec}/{key}"] = value
    if jax.process_index() == 0:
        np.savez(out_path, **results)
    if mode == "distributed":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
