"""Trains a compressed model on a device mesh in a fresh JAX process (the device count must be set before JAX
starts) and saves the trained parameters.

Usage (from the repository root)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.heal_worker OUT.npz STUDENT TEACHER MESH

``STUDENT`` and ``TEACHER``: model directories; ``MESH``: a ``--mesh`` value, or ``none`` for one device.
"""

from __future__ import annotations

import sys


def main(out: str, student: str, teacher: str, mesh_spec: str) -> None:
    import numpy as np
    from flax import nnx

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.heal import HealSettings, heal
    from modegpt_jax.mesh import make_mesh

    settings = HealSettings(steps=3, batch_size=8, grad_accum=2, lr=3e-3, warmup=1, loss="kd+lm", method="lora",
                            lora_rank=4)
    tokens = np.random.default_rng(0).integers(0, 128, (48, 16)).astype(np.int32)
    mesh = None if mesh_spec == "none" else make_mesh(mesh_spec)
    model, report = heal(HFCheckpoint(student).load_model(), HFCheckpoint(teacher).load_model(), tokens, settings,
                         val_tokens=tokens[:4], mesh=mesh, progress=False)
    weights = {".".join(map(str, k)): np.asarray(v.get_value())
               for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(out, **weights, losses=np.asarray([x["loss"] for x in report["history"] if "loss" in x]))


if __name__ == "__main__":
    main(*sys.argv[1:5])
