"""Finished compressed blocks on disk, one safetensors file per layer, so no run holds more than one of them.

Layout of a staging directory::

    block_00007.safetensors     compressed block 7: keys are the NNX state paths inside a Block joined by "."
                                (``attn.q_proj.kernel``, ``mlp_norm.weight``, ``attn.rope_freqs``), arrays in
                                this project's ``[in, out]`` orientation and the model's parameter dtype

The pipeline writes a block as soon as it is finished and drops it; the final Hugging Face directory is assembled
from these files tensor by tensor (:func:`converters.hf_export.save_staged_model`), and small models are read
back into memory with :func:`read_block`. A file is written aside and renamed, so a killed run never leaves a
half-written block under the final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.model import Block
from modegpt_jax.stats import to_host


def block_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"block_{layer:05d}.safetensors"


def array_key(path: tuple) -> str:
    """The key of a block's array in its file: its NNX state path inside the block, joined by "."."""
    return ".".join(str(p) for p in path)


def block_arrays(block: Block) -> dict[str, np.ndarray]:
    """Every array of a block (parameters and buffers) under its dotted path, as host arrays."""
    return {array_key(path): np.ascontiguousarray(to_host(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(block))}


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """A digest of a block's arrays (names, dtypes, shapes and bytes): equal digests mean identical weights."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(arrays):
        a = arrays[key]
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def write_block(directory: str | Path, layer: int, block: Block | dict[str, np.ndarray]) -> Path:
    """Write compressed block ``layer`` (a block, or its :func:`block_arrays`). Every process must call this:
    reading a sharded array is a collective; only process 0 writes."""
    from safetensors.numpy import save_file

    arrays = block if isinstance(block, dict) else block_arrays(block)
    path = block_file(directory, layer)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        os.replace(tmp, path)
    return path


def read_block(directory: str | Path, layer: int, cfg: ModelConfig, spec: LayerSpec, dtype: Any) -> Block:
    """Compressed block ``layer`` back from its file, as a Block of widths ``spec``."""
    from safetensors import safe_open

    block = nnx.eval_shape(lambda: Block(cfg, spec, dtype=dtype, rngs=nnx.Rngs(0)))
    state = nnx.state(block)
    with safe_open(str(block_file(directory, layer)), framework="numpy") as f:
        for path, var in nnx.to_flat_state(state):
            array = f.get_tensor(array_key(path))
            if tuple(array.shape) != tuple(var.shape):
                raise ValueError(f"staged block {layer}: {path} has shape {array.shape}, expected {var.shape}")
            var.set_value(jax.numpy.asarray(array, dtype=var.dtype))
    nnx.update(block, state)
    return block
