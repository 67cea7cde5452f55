"""Trains a compressed model on a device mesh in a fresh JAX process (the device count must be set before JAX
starts) and saves the trained parameters.

Usage (from the repository root)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.heal_worker OUT.npz STUDENT TEACHER MESH \
        METHOD [PORT PROCESS_ID NUM_PROCESSES]

``STUDENT`` and ``TEACHER``: model directories; ``MESH``: a ``--mesh`` value, or ``none`` for one device;
``METHOD``: ``lora`` or ``full``. With the last three, one of several ``jax.distributed`` processes (gloo);
process 0 writes ``OUT.npz``.
"""

from __future__ import annotations

import sys

#: The runs' peak learning rate (the tests compare trained weights within it).
LR = 3e-3


def main(out: str, student: str, teacher: str, mesh_spec: str, method: str, port: str | None = None,
         process: str | None = None, processes: str | None = None) -> None:
    import jax
    import numpy as np
    from flax import nnx

    if port is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(processes), process_id=int(process))
    from modegpt_jax.mesh import to_host

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.heal import HealSettings, heal
    from modegpt_jax.mesh import make_mesh

    settings = HealSettings(steps=3, batch_size=8, grad_accum=2, lr=LR, warmup=1, loss="kd+lm", method=method,
                            lora_rank=4, eval_every=1, keep_best=True, checkpoint_every=1)
    tokens = np.random.default_rng(0).integers(0, 128, (48, 16)).astype(np.int32)
    mesh = None if mesh_spec == "none" else make_mesh(mesh_spec)
    model, report = heal(HFCheckpoint(student).load_model(), HFCheckpoint(teacher).load_model(), tokens, settings,
                         val_tokens=tokens[:4], mesh=mesh, checkpoint_dir=f"{out}.checkpoints", progress=False)
    weights = {".".join(map(str, k)): to_host(v.get_value())
               for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # whether some "model" group of the mesh holds devices of more than one process
    spans = mesh is not None and any(len({d.process_index for d in group}) > 1 for group in mesh.devices)
    if jax.process_index() == 0:
        np.savez(out, **weights, losses=np.asarray([x["loss"] for x in report["history"] if "loss" in x]),
                 model_spans_processes=np.asarray(spans))


if __name__ == "__main__":
    main(*sys.argv[1:])
