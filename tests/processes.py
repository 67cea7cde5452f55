"""Fresh JAX processes for tests: a set device count, or several jax.distributed processes on this machine.

The device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) and ``jax.distributed`` must be set up before
JAX's backend starts, and the pytest process has already started it. Every child has a timeout, so a hang fails
its test instead of stopping the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_with_devices(devices: int) -> dict:
    """This environment, with ``devices`` simulated CPU devices and the repository importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(module: str, args_of, processes: int, devices_per_process: int, timeout: float) -> list[str]:
    """Run ``python -m module *args_of(port, i)`` as ``processes`` processes at once; assert that each succeeded
    and return their outputs. A hang or a crash of one side never leaves the others waiting."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *map(str, args_of(port, i))], cwd=REPO,
                              env=env_with_devices(devices_per_process), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
    return logs
