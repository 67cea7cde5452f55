"""Resumable compression: the pipeline's state after each finished layer, saved with orbax.

Layout of a resume directory (it is also the run's staging directory, see :mod:`modegpt_jax.staging`)::

    state.json               fingerprint of the run, allocation, and the finished layers (written last, atomically)
    block_00007.safetensors  compressed block 7 (written when it is finished; the output is assembled from these)
    hidden_007/              orbax checkpoint of the calibration hidden states after block 7: only the latest is
                             kept, the previous one is deleted once the new one is recorded

A kill at any moment leaves either the previous ``state.json`` (the half-written layer is redone) or the new one;
orbax finalises each checkpoint directory atomically. A run whose fingerprint (settings, calibration tokens,
model configuration, dtype, mesh) differs refuses to resume and names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from modegpt_jax.activations import HiddenStates
from modegpt_jax.errors import UserError

STATE = "state.json"


def fingerprint(**parts: Any) -> dict[str, str]:
    """A JSON-able summary of everything that decides the result; arrays are hashed."""
    out = {}
    for key, value in parts.items():
        if isinstance(value, np.ndarray):
            out[key] = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16] + f"{value.shape}"
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


class ResumeState:
    def __init__(self, directory: str | Path, run_fingerprint: dict[str, str]):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.fingerprint = run_fingerprint
        self._ckpt = ocp.StandardCheckpointer()
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

    def save_layer(self, layer: int, hidden: HiddenStates, entry: dict[str, Any]) -> None:
        """Checkpoint the hidden states after layer ``layer`` (its block is already in the staging files), then
        record the layer as finished and delete the previous layer's hidden states. Batches are saved one at a
        time, so hidden states parked in host memory come onto the devices one batch at a time."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"hidden_{layer:03d}"
        if target.exists():  # left by a kill between this save and its state record
            shutil.rmtree(target)
        for j in range(len(hidden)):
            self._ckpt.save(target / f"batch_{j:04d}", {"h": hidden.get(j)})
            self._ckpt.wait_until_finished()
        self.write_state(layers=[*self.state.get("layers", []), entry])
        previous = self.directory / f"hidden_{layer - 1:03d}"
        if previous.exists() and jax.process_index() == 0:
            shutil.rmtree(previous)

    def restore_hidden(self, layer: int, batch: int, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        """Batch ``batch`` of the hidden states after layer ``layer``."""
        return self._ckpt.restore(self.directory / f"hidden_{layer:03d}" / f"batch_{batch:04d}", {"h": abstract})["h"]

    def remove(self) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
