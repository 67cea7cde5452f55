"""Resumable compression: the pipeline's state after each finished layer.

Layout of a resume directory (it is also the run's staging directory, see :mod:`modegpt_jax.staging`)::

    state.json                   fingerprint of the run, allocation, and the finished layers (written last,
                                 atomically)
    block_00007.safetensors      compressed block 7 (written when it is finished; the output is assembled from these)
    hidden_007/process_00000.bin the calibration hidden states after block 7, as this process's device shards, raw,
                                 batch after batch, one copy of each block (they are replicated over "model"; every
                                 process writes its own file): only the latest layer's
                                 are kept, the previous ones are deleted once the new ones are recorded

The hidden states are written raw rather than as orbax checkpoints: they are rewritten after every layer, so
what matters is the cost of one write (SmolLM2, 64 x 512 tokens, 30 layers of 75 MB: 31.4 s with orbax, 24.5 s
raw, on a disk of about 100 MB/s); in a single-process run the write also overlaps the next layer's computation.
Restoring needs the same mesh and processes, which the fingerprint guarantees.

A kill at any moment leaves either the previous ``state.json`` (the half-written layer is redone) or the new one;
each file is written aside and renamed. A run whose fingerprint (settings, calibration tokens, model
configuration, dtype, mesh) differs refuses to resume and names what changed.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from modegpt_jax.activations import HiddenStates
from modegpt_jax.errors import UserError
from modegpt_jax.mesh import local_blocks

STATE = "state.json"


def array_hash(array: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of ``array``'s bytes (C order): what identifies an array in a run's
    fingerprint."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def fingerprint(**parts: Any) -> dict[str, str]:
    """A JSON-able summary of everything that decides the result; arrays are hashed."""
    out = {}
    for key, value in parts.items():
        if isinstance(value, np.ndarray):
            out[key] = array_hash(value) + f"{value.shape}"
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


class ResumeState:
    def __init__(self, directory: str | Path, run_fingerprint: dict[str, str]):
        self.directory = Path(directory).absolute()
        self.fingerprint = run_fingerprint
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="modegpt-resume")
        self._pending: concurrent.futures.Future | None = None
        self.state: dict[str, Any] = {}
        path = self.directory / STATE
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = [k for k in sorted(set(saved["fingerprint"]) | set(run_fingerprint))
                       if saved["fingerprint"].get(k) != run_fingerprint.get(k)]
            if changed:
                raise UserError(
                    f"{self.directory} holds an unfinished run with a different configuration (changed: "
                    f"{', '.join(changed)}); rerun with the same settings to resume, or delete that directory"
                )
            self.state = saved
        elif self.directory.exists() and any(self.directory.iterdir()):
            shutil.rmtree(self.directory)  # killed before its first state was written: nothing to keep

    @property
    def finished_layers(self) -> int:
        return len(self.state.get("layers", []))

    def write_state(self, **updates: Any) -> None:
        self.state.update(updates, fingerprint=self.fingerprint)
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / (STATE + ".tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            os.replace(tmp, self.directory / STATE)

    def _hidden_file(self, layer: int) -> Path:
        return self.directory / f"hidden_{layer:03d}" / f"process_{jax.process_index():05d}.bin"

    def save_layer(self, layer: int, hidden: HiddenStates, record: dict[str, Any]) -> float:
        """Save the hidden states after layer ``layer`` (its block is already in the staging files), then record
        the layer as finished and delete the previous layer's hidden states.

        In a single-process run the hidden states are copied to the host here and written by a background thread
        while the next layer computes (at most one write is in flight; call :meth:`wait` before relying on the
        directory). Returns the seconds the caller was held up (the copy, and waiting for the previous write), which
        is also stored as ``record["report"]["resume_seconds"]``."""
        start = time.perf_counter()
        self.wait()
        batches = []
        for j in range(len(hidden)):
            x = hidden.get(j)
            shards = {s.device: s for s in x.addressable_shards}
            batches.append([np.array(shards[device].data, copy=True)
                            for device, _, first in local_blocks(x.sharding, x.shape) if first])
        held = round(time.perf_counter() - start, 3)
        record["report"]["resume_seconds"] = held
        record = copy.deepcopy(record)
        if jax.process_count() > 1:  # the barrier is a collective: it stays on the main thread
            self._write_layer(layer, batches, record, barrier=True)
        else:
            self._pending = self._writer.submit(self._write_layer, layer, batches, record, False)
        return held

    def wait(self) -> None:
        """Block until the last hidden-state write is on disk and recorded (re-raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_layer(self, layer: int, batches: list[list[np.ndarray]], record: dict[str, Any], barrier: bool):
        path = self._hidden_file(layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for shards in batches:
                for data in shards:
                    f.write(np.ascontiguousarray(data).tobytes())
        os.replace(tmp, path)
        if barrier:  # every process's file exists before the layer is recorded as finished
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"modegpt resume layer {layer}")
        self.write_state(layers=[*self.state.get("layers", []), record])
        previous = self.directory / f"hidden_{layer - 1:03d}"
        if previous.exists() and jax.process_index() == 0:
            shutil.rmtree(previous)

    def restore_hidden(self, layer: int, abstract: list[jax.ShapeDtypeStruct]) -> Iterator[jax.Array]:
        """The hidden states after layer ``layer``, batch by batch, on the devices they were saved from."""
        with open(self._hidden_file(layer), "rb") as f:
            for a in abstract:
                dtype = np.dtype(a.dtype)
                shard_shape = a.sharding.shard_shape(a.shape)
                nbytes = int(np.prod(shard_shape)) * dtype.itemsize
                blocks, arrays = {}, []
                for device, key, first in local_blocks(a.sharding, a.shape):  # the order they were written in
                    if first:
                        blocks[key] = np.frombuffer(f.read(nbytes), dtype).reshape(shard_shape)
                    arrays.append(jax.device_put(blocks[key], device))
                yield jax.make_array_from_single_device_arrays(a.shape, a.sharding, arrays)

    def remove(self) -> None:
        self.wait()
        if jax.process_index() == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
