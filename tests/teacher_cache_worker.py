"""Fills a teacher cache and trains on it in one of several ``jax.distributed`` processes (gloo), on the mesh
``data=2,model=4`` over all their devices; process 0 saves the trained parameters.

Usage (from the repository root)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.teacher_cache_worker OUT.npz STUDENT TEACHER \
        CACHE PORT PROCESS_ID NUM_PROCESSES

``CACHE`` may hold ``{process}``, replaced by the process index (a directory each process sees alone). A refused
cache (:class:`~modegpt_jax.errors.UserError`) is written to ``OUT.npz.error-PROCESS_ID`` and exits 0.
"""

from __future__ import annotations

import sys


def main(out: str, student: str, teacher: str, cache: str, port: str, process: str, processes: str) -> None:
    import dataclasses

    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(processes), process_id=int(process))
    from flax import nnx

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.errors import UserError
    from modegpt_jax.heal import digest, heal
    from modegpt_jax.mesh import make_mesh, to_host
    from modegpt_jax.teacher_cache import open_teacher_cache
    from tests.test_teacher_cache import SETTINGS, WINDOWS

    dense = HFCheckpoint(teacher)
    try:
        hidden, reused = open_teacher_cache(cache.format(process=process), {"windows": digest(WINDOWS)}, dense,
                                            WINDOWS, batch_size=4, progress=False, poll_seconds=0.1)
    except UserError as error:
        with open(f"{out}.error-{process}", "w") as f:
            f.write(str(error))
        return
    head_only = dense.load_shell(dataclasses.replace(dense.config, layers=()))
    model, _ = heal(HFCheckpoint(student).load_model(), head_only, WINDOWS, SETTINGS, mesh=make_mesh("data=2,model=4"),
                    teacher_hidden=hidden, progress=False)
    weights = {".".join(map(str, k)): to_host(v.get_value())
               for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if jax.process_index() == 0:
        np.savez(out, **weights, reused=np.asarray(reused))


if __name__ == "__main__":
    main(*sys.argv[1:])
