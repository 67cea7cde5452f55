"""Compresses a checkpoint on a mesh in a fresh JAX process and records how the work was divided.

A fresh process is needed because the device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) and
``jax.distributed`` must be set up before JAX's backend starts, and the pytest process has already started it.

Usage (from the repository root)::

    python -m tests.mesh_worker OUT_DIR CHECKPOINT MESH[@memory] [PORT PROCESS_ID NUM_PROCESSES]

``MESH@memory`` loads the whole model, shards it on the mesh itself and passes the model to ``compress`` (the Python
API with a sharded in-memory model) instead of streaming the checkpoint.

Writes to ``OUT_DIR``:

- ``process_{i}.json``: the report's per-layer checksums, and for every call of the pipeline's jitted passes the
  sharding of each weight it received and of each statistic it returned (``layout``);
- ``attention_statistics.hlo``: the compiled HLO text of the attention statistics step (one-process runs);
- ``weights.npz``: the compressed model's parameters (process 0).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

# Calibration set: SAMPLES sequences of SEQ tokens, in batches of BATCH sequences (all processes together).
SAMPLES, SEQ, BATCH = 16, 24, 8


def _tokens(vocab: int, process: int, processes: int):
    """This process's rows, chosen so that every global batch holds the same rows as in a one-process run."""
    import numpy as np

    rows = np.random.default_rng(0).integers(0, vocab, (SAMPLES, SEQ)).astype(np.int32)
    per = BATCH // processes
    return np.concatenate([rows[b + process * per: b + (process + 1) * per] for b in range(0, SAMPLES, BATCH)])


def _describe(x) -> dict:
    return {"shape": list(x.shape), "spec": str(getattr(x.sharding, "spec", None)),
            "shard_shape": list(x.addressable_shards[0].data.shape),
            "replicated": bool(x.sharding.is_fully_replicated), "devices": len(x.sharding.device_set)}


def _record(layout: list, name: str, fn):
    """Wrap a jitted pass: note the sharding of every array in its module-state arguments and its outputs."""
    import jax
    from flax import nnx

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        entry = {"pass": name, "weights": {}, "outputs": {}}
        for k, arg in enumerate(args):
            if isinstance(arg, nnx.State):
                for path, var in nnx.to_flat_state(arg):
                    entry["weights"][f"{k}:" + ".".join(map(str, path))] = _describe(var.get_value())
        out = fn(*args, **kwargs)
        for path, leaf in jax.tree_util.tree_leaves_with_path(out):
            entry["outputs"][jax.tree_util.keystr(path)] = _describe(leaf)
        layout.append(entry)
        return out

    return wrapper


def main(argv: list[str]) -> None:
    out, checkpoint, (mesh_spec, _, source) = Path(argv[0]), argv[1], argv[2].partition("@")
    import jax

    if len(argv) > 3:
        port, process, processes = int(argv[3]), int(argv[4]), int(argv[5])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=process)
    import numpy as np
    from flax import nnx

    from converters.hf_import import HFCheckpoint
    from modegpt_jax import pipeline, sharding
    from modegpt_jax.mesh import make_mesh, to_host

    mesh = make_mesh(mesh_spec)
    layout: list = []
    for name in ("_attention_statistics", "_attention_pass", "_mlp_pass", "_influence_pass"):
        setattr(pipeline, name, _record(layout, name, getattr(pipeline, name)))

    ckpt = HFCheckpoint(checkpoint)
    tokens = _tokens(ckpt.config.vocab_size, jax.process_index(), jax.process_count())
    settings = pipeline.CompressionSettings(ratio=0.3, batch_size=BATCH)
    out.mkdir(parents=True, exist_ok=True)
    if source == "memory":
        model = sharding.place(ckpt.load_model(), mesh)
        model, report = pipeline.compress(model, tokens, settings, mesh=mesh, progress=False)
    else:
        result = pipeline.compress_streamed(ckpt, tokens, settings, out / "staging", mesh=mesh, progress=False)
        model, report = result.load_model(), result.report
    record = {"checksums": [x["checksum"] for x in report["layers"]], "layout": layout,
              "mesh": report["devices"]["mesh"], "processes": jax.process_count(),
              "peak_bytes_per_device": report["devices"]["peak_bytes_per_device"]}
    (out / f"process_{jax.process_index()}.json").write_text(json.dumps(record))
    if jax.process_count() == 1:
        block = ckpt.load_block(0, mesh=mesh)
        graphdef, state = nnx.split(block)
        h = jax.numpy.zeros((BATCH, SEQ, ckpt.config.hidden_size), jax.numpy.float32,
                            device=pipeline.batch_sharding(mesh, 3))
        hlo = pipeline._attention_statistics.__wrapped__.lower(graphdef, state, h, mesh=mesh).compile().as_text()
        (out / "attention_statistics.hlo").write_text(hlo)
    weights = {".".join(map(str, p)): to_host(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if jax.process_index() == 0:
        np.savez(out / "weights.npz", **weights)


if __name__ == "__main__":
    main(sys.argv[1:])
